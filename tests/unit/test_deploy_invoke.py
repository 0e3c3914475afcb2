"""lmi invoke's pieces: request bodies, token streams cut anywhere, and inference-component names."""

from __future__ import annotations

import io
import json

import pytest

from serving.deploy import parse_spec
from serving.deploy.invoke import InvokeError, endpoint_params, print_stream, request_body
from serving.deploy.invoke_cli import _component
from serving.deploy.stream import TokenStream

LMI_LINES = (
    b'{"token": {"id": 5, "text": "Hello", "log_prob": -0.1}}\n'
    b'{"token": {"id": 6, "text": " w\xc3\xb6rld", "log_prob": -0.2}}\n'
    b'{"token": {"id": 2, "text": "</s>", "log_prob": -0.3, "special_token": true}, '
    b'"generated_text": "Hello w\xc3\xb6rld"}\n'
)


def test_lmi_jsonlines_give_the_same_text_however_the_bytes_are_cut():
    for size in range(1, 12):
        stream, text = TokenStream(), ""
        for start in range(0, len(LMI_LINES), size):
            text += stream.feed(LMI_LINES[start : start + size])
        assert text + stream.close() == "Hello wörld"
        assert stream.error is None


def test_server_sent_events_tgi_and_openai():
    tgi = b'data: {"token": {"id": 1, "text": "a", "special": false}}\n\ndata: {"token": {"text": "b"}}\n\n'
    chat = b'data: {"choices": [{"delta": {"content": "c"}}]}\n\ndata: {"choices": [{"text": "d"}]}\n\n'
    stream = TokenStream()
    text = stream.feed(b": keep-alive\nevent: message\n" + tgi + chat + b"data: [DONE]\n\n")
    assert text == "abcd"


def test_error_lines_are_kept_and_other_lines_shown_as_they_came():
    stream = TokenStream()
    out = stream.feed(b'{"token": {"text": "x"}}\nnot json\n[1, 2]\n{"unknown": 1}\n')
    assert out == 'xnot json\n[1, 2]\n{"unknown": 1}\n'
    stream.feed(b'{"token": {"id": -1, "text": ""}, "error": "CUDA out of memory", "code": 507}')
    assert stream.close() == ""
    assert stream.error == "CUDA out of memory"
    openai = TokenStream()
    openai.feed(b'data: {"error": {"message": "bad", "type": "invalid_request_error"}}\n')
    assert openai.error == "bad"


def test_print_stream_writes_as_it_goes_and_raises_the_streams_error():
    out = io.StringIO()
    print_stream([b'{"token": {"text": "a"}}\n{"tok', b'en": {"text": "b"}}'], out)
    assert out.getvalue() == "ab\n"
    with pytest.raises(InvokeError, match="the stream ended with an error: boom"):
        print_stream([b'{"token": {"text": "a"}}\n{"error": "boom"}\n'], io.StringIO())


def test_request_bodies(tmp_path):
    assert json.loads(request_body("Hi", None, 8, stream=False)) == {
        "inputs": "Hi",
        "parameters": {"max_new_tokens": 8},
    }
    assert json.loads(request_body("Hi", None, 8, stream=True))["stream"] is True
    assert request_body(None, '{"inputs": "x"}', 8, stream=False) == b'{"inputs": "x"}'
    assert json.loads(request_body(None, '{"inputs": "x"}', 8, stream=True)) == {
        "inputs": "x",
        "stream": True,
    }
    assert json.loads(request_body(None, '{"stream": false}', 8, stream=True)) == {"stream": False}
    assert request_body(None, "plain text", 8, stream=True) == b"plain text"
    body = tmp_path / "body.json"
    body.write_text('{"messages": []}')
    assert request_body(None, f"@{body}", 8, stream=False) == b'{"messages": []}'


def test_endpoint_params_name_the_component_only_when_given():
    assert endpoint_params("ep", None, b"{}", "application/json", None) == {
        "EndpointName": "ep",
        "Body": b"{}",
        "ContentType": "application/json",
    }
    params = endpoint_params("ep", "ep-chat", b"{}", "application/json", "application/jsonlines")
    assert (params["InferenceComponentName"], params["Accept"]) == ("ep-chat", "application/jsonlines")


def test_component_names_resolve_from_the_spec():
    base = {
        "endpoint": "ep",
        "role": "arn:aws:iam::123456789012:role/r",
        "image": "i",
        "instance_type": "ml.m5.large",
    }
    two = parse_spec(
        {**base, "components": [{"name": "chat", "memory_mb": 256}, {"name": "embed", "memory_mb": 256}]}
    )
    assert _component(two, "chat") == "ep-chat"
    assert _component(two, "ep-embed") == "ep-embed"
    with pytest.raises(ValueError, match="choose one of the spec's inference components: chat, embed"):
        _component(two, None)
    one = parse_spec({**base, "components": [{"name": "chat", "memory_mb": 256}]})
    assert _component(one, None) == "ep-chat"
    single = parse_spec(base)
    assert _component(single, None) is None
    with pytest.raises(ValueError, match="no inference components"):
        _component(single, "chat")
