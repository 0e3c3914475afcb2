"""API format layer: request bodies -> ParsedRequest, TokenEvents -> response bytes.

Responses are checked against the real client libraries: openai's pydantic models and its SSE stream
parser (through an httpx MockTransport, no server), and text_generation's models and its client
(its ``requests.post`` swapped for one that answers from our writer).
"""

from __future__ import annotations

import importlib
import io
import itertools
import json
import math
from typing import Any

import pytest
import requests

from engines.types import SamplingParams, TokenEvent
from handlers.builtin.formats import (
    API_CHAT,
    API_COMPLETION,
    API_LMI,
    API_TGI,
    ParsedRequest,
    RequestError,
    ResponseWriter,
    check_token_ids,
    create_writer,
    output_mode,
)
from handlers.builtin.formats import parse_request as parse_for_api
from serving.dialects import api_for_path, error_reply


def parse_request(route: str, body: Any) -> ParsedRequest:
    """Tests name routes by path, as clients do; the worker gets the route's Api."""
    return parse_for_api(api_for_path("/" + route.strip("/")), body)


try:
    import openai
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
except ImportError:  # the client checks need `pip install openai`
    openai = None
try:
    import text_generation
    import text_generation.client
    import text_generation.errors
    from text_generation.types import Parameters
    from text_generation.types import Request as TgiRequest
    from text_generation.types import Response as TgiResponse
    from text_generation.types import StreamResponse as TgiStreamResponse
except ImportError:  # the client checks need `pip install text-generation`
    text_generation = None

needs_openai = pytest.mark.skipif(openai is None, reason="needs the openai client: pip install openai")
needs_tgi = pytest.mark.skipif(
    text_generation is None, reason="needs text_generation: pip install text-generation"
)

PROMPT = "Say hi"
PROMPT_TOKENS = 3


# ---------------------------------------------------------------------------- helpers


def script(texts: list[str], finish: str = "length", final_token: bool = True) -> list[TokenEvent]:
    """Events for ``texts``; the last carries ``finish`` (on its own token-less event if not final_token)."""
    events = [TokenEvent("r", 100 + i, text, -0.25 * (i + 1)) for i, text in enumerate(texts)]
    if final_token:
        events[-1].finish_reason = finish
    else:
        events.append(TokenEvent("r", -1, "", 0.0, finish_reason=finish))
    return events


def with_top(events: list[TokenEvent], alternatives: list[list[tuple[int, str, float]]]) -> list[TokenEvent]:
    """``events`` with top alternatives (id, text, logprob) attached, as an engine reports them."""
    for event, alts in zip(events, alternatives, strict=True):
        event.top_logprobs = tuple((i, lp) for i, _, lp in alts)
        event.top_texts = tuple(text for _, text, _ in alts)
    return events


def writer_for(
    route: str, body: dict[str, Any], output_formatter: str | None = None, tgi_compat: bool = False
) -> ResponseWriter:
    parsed = parse_request(route, body)
    return create_writer(parsed, "req-1", "test-model", PROMPT, PROMPT_TOKENS, output_formatter, tgi_compat)


def run(writer: ResponseWriter, events: list[TokenEvent]) -> tuple[list[bytes], bytes]:
    """(bytes returned by each on_event, bytes returned by finish)."""
    return [writer.on_event(e) for e in events], writer.finish()


def sse_payloads(data: bytes) -> list[str]:
    """Strict SSE framing check: every event is exactly ``data: <payload>`` followed by a blank line."""
    assert data.endswith(b"\n\n"), data
    frames = data[:-2].split(b"\n\n")
    for frame in frames:
        assert frame.startswith(b"data: "), frame
        assert b"\n" not in frame, frame
    return [frame[len(b"data: ") :].decode() for frame in frames]


def jsonlines(data: bytes) -> list[dict[str, Any]]:
    assert data.endswith(b"\n"), data
    return [json.loads(line) for line in data.decode().splitlines()]


def error_of(body: dict[str, Any], route: str = "invocations") -> str:
    with pytest.raises(RequestError) as info:
        parse_request(route, body)
    return str(info.value)


# ---------------------------------------------------------------------------- LMI requests


def test_lmi_defaults() -> None:
    parsed = parse_request("/invocations", b'{"inputs": "hello"}')
    assert parsed.api == API_LMI
    assert parsed.prompt == "hello"
    assert parsed.messages is None
    assert parsed.params == SamplingParams(max_new_tokens=30)
    assert not parsed.stream
    assert not parsed.details
    assert not parsed.max_new_tokens_set


def test_lmi_parameters_map_to_sampling_params() -> None:
    body = {
        "inputs": "hello",
        "stream": True,
        "parameters": {
            "max_new_tokens": 50,
            "do_sample": True,
            "temperature": 0.7,
            "top_k": 40,
            "top_p": 0.9,
            "repetition_penalty": 1.1,
            "seed": 7,
            "stop_sequences": ["\n\n", "END"],
            "stop": "END",
            "ignore_eos_token": True,
            "min_new_tokens": 5,
            "details": True,
            "return_full_text": True,
            "decoder_input_details": True,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.25,
            "min_p": 0.05,
            "logit_bias": {"17": -100, "3": 2.5},
            "stop_token_ids": [2, 9, 2],
            "top_n_tokens": 3,
            "n": 1,
            "best_of": 1,
            # known but unsupported: accepted and ignored
            "truncate": 100,
            "watermark": True,
            "typical_p": 0.5,
        },
    }
    parsed = parse_request("invocations", body)
    assert parsed.params == SamplingParams(
        max_new_tokens=50,
        do_sample=True,
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        repetition_penalty=1.1,
        seed=7,
        stop_sequences=("\n\n", "END"),
        ignore_eos=True,
        min_new_tokens=5,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        min_p=0.05,
        logit_bias=((3, 2.5), (17, -100.0)),
        stop_token_ids=(2, 9),
        top_logprobs=3,
    )
    assert parsed.stream
    assert parsed.details
    assert parsed.return_full_text
    assert parsed.decoder_input_details
    assert parsed.max_new_tokens_set


def test_lmi_greedy_ignores_temperature_zero() -> None:
    parsed = parse_request("invocations", {"inputs": "x", "parameters": {"temperature": 0}})
    assert not parsed.params.do_sample
    assert parsed.params.temperature == 1.0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"inputs": ["a", "b"]}, ["`inputs` is a list of 2 prompts", "one prompt per request"]),
        ({"parameters": {}}, ["Missing `inputs`", '"inputs": "<prompt>"']),
        ({"inputs": ""}, ["`inputs` must be a non-empty string"]),
        ({"inputs": 5}, ["`inputs` must be a non-empty string, got 5"]),
        (
            {"inputs": "x", "params": {}},
            ["Unknown field `params`", "Supported fields: inputs, parameters, stream"],
        ),
        ({"inputs": "x", "parameters": []}, ["`parameters` must be a JSON object"]),
        (
            {"inputs": "x", "parameters": {"max_new_token": 5}},
            ["Unknown field `parameters.max_new_token`", "max_new_tokens", "stop_sequences"],
        ),
        (
            {"inputs": "x", "parameters": {"best_of": 17}},
            ["`parameters.best_of` must be <= 16, got 17", "at most 16 completions"],
        ),
        ({"inputs": "x", "parameters": {"n": True}}, ["`parameters.n` must be an integer, got True"]),
        (
            {"inputs": "x", "parameters": {"n": 3, "best_of": 2}},
            ["`parameters.best_of` (2) must be >= `parameters.n` (3)"],
        ),
        (
            {"inputs": "x", "stream": True, "parameters": {"n": 2}},
            ["`parameters.n`=2 works only without streaming", "best_of_sequences"],
        ),
        (
            {"inputs": "x", "stream": True, "parameters": {"best_of": 2}},
            ["`parameters.best_of`=2 > `parameters.n`=1 cannot be streamed"],
        ),
        (
            {"inputs": "x", "parameters": {"presence_penalty": -2.5}},
            ["`parameters.presence_penalty` must be >= -2 and <= 2, got -2.5", "0 for no penalty"],
        ),
        (
            {"inputs": "x", "parameters": {"min_p": 1.5}},
            ["`parameters.min_p` must be >= 0 and <= 1, got 1.5"],
        ),
        (
            {"inputs": "x", "parameters": {"stop_token_ids": [1, -2]}},
            ["`parameters.stop_token_ids` must be a list of token ids (integers >= 0), got [1, -2]"],
        ),
        (
            {"inputs": "x", "parameters": {"top_n_tokens": 21}},
            ["`parameters.top_n_tokens` must be <= 20, got 21"],
        ),
        (
            {"inputs": "x", "parameters": {"max_new_tokens": 0}},
            ["`parameters.max_new_tokens` must be >= 1, got 0"],
        ),
        (
            {"inputs": "x", "parameters": {"max_new_tokens": "9"}},
            ["`parameters.max_new_tokens` must be an integer"],
        ),
        ({"inputs": "x", "parameters": {"max_new_tokens": 5.0}}, ["must be an integer, got 5.0"]),
        (
            {"inputs": "x", "parameters": {"do_sample": "yes"}},
            ["`parameters.do_sample` must be true or false"],
        ),
        (
            {"inputs": "x", "parameters": {"do_sample": True, "temperature": 0}},
            ["`parameters.temperature` must be > 0 when sampling, got 0", "do_sample=false"],
        ),
        (
            {"inputs": "x", "parameters": {"temperature": -1}},
            ["`parameters.temperature` must be >= 0, got -1"],
        ),
        (
            {"inputs": "x", "parameters": {"top_p": 0}},
            ["`parameters.top_p` must be > 0 and <= 1, got 0", "1.0"],
        ),
        ({"inputs": "x", "parameters": {"top_p": 1.5}}, ["`parameters.top_p` must be > 0 and <= 1, got 1.5"]),
        ({"inputs": "x", "parameters": {"top_k": -1}}, ["`parameters.top_k` must be >= 0, got -1"]),
        (
            {"inputs": "x", "parameters": {"repetition_penalty": 0}},
            ["`parameters.repetition_penalty` must be > 0"],
        ),
        ({"inputs": "x", "parameters": {"seed": -3}}, ["`parameters.seed` must be >= 0, got -3"]),
        ({"inputs": "x", "parameters": {"temperature": math.nan}}, ["must be a finite number, got nan"]),
        ({"inputs": "x", "parameters": {"stop_sequences": ["ok", ""]}}, ["list of non-empty strings"]),
        (
            {"inputs": "x", "parameters": {"min_new_tokens": 40}},
            ["`parameters.min_new_tokens` (40) must not exceed `parameters.max_new_tokens` (30)"],
        ),
        ({"inputs": "x", "parameters": {"grammar": {"type": "json"}}}, ["`parameters.grammar`", "null"]),
    ],
)
def test_lmi_validation_errors(body: dict[str, Any], expected: list[str]) -> None:
    message = error_of(body)
    for part in expected:
        assert part in message, message


def test_request_error_is_a_value_error_with_status_400() -> None:
    assert issubclass(RequestError, ValueError)
    assert RequestError.status == 400


@pytest.mark.parametrize(
    ("raw", "expected"), [(b"{not json", "not valid JSON"), (b"[1, 2]", "must be a JSON object, got list")]
)
def test_malformed_bodies(raw: bytes, expected: str) -> None:
    with pytest.raises(RequestError, match=expected):
        parse_request("invocations", raw)


def test_lmi_body_with_messages_is_chat() -> None:
    parsed = parse_request("invocations", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    assert parsed.api == API_CHAT
    assert parsed.route == "invocations"
    assert parsed.messages == [{"role": "user", "content": "hi"}]
    assert parsed.prompt is None
    assert parsed.params.max_new_tokens == 8


def test_v1_chat_route_without_messages_reads_lmi_body() -> None:
    assert parse_request("/v1/chat/completions", {"inputs": "hi"}).api == API_LMI


def test_tgi_root_route_reads_lmi_bodies() -> None:
    assert parse_request("/", {"inputs": "hi"}).api == API_LMI


# ---------------------------------------------------------------------------- OpenAI requests


def test_completion_defaults_and_fields() -> None:
    parsed = parse_request("/v1/completions", {"prompt": "p", "model": "m"})
    assert parsed.api == API_COMPLETION
    assert parsed.model == "m"
    assert parsed.params.max_new_tokens == 16
    assert parsed.params.do_sample
    assert parsed.params.temperature == 1.0
    body = {
        "prompt": "p",
        "max_tokens": 5,
        "temperature": 0,
        "stop": "x",
        "echo": True,
        "n": 1,
        "seed": 3,
        "user": "u",
        "stream": True,
        "stream_options": {"include_usage": True},
        "top_k": -1,
        "ignore_eos": True,
        "min_tokens": 2,
    }
    parsed = parse_request("/v1/completions", body)
    assert parsed.params == SamplingParams(
        max_new_tokens=5, do_sample=False, seed=3, stop_sequences=("x",), ignore_eos=True, min_new_tokens=2
    )
    assert parsed.return_full_text
    assert parsed.include_usage
    assert parsed.stream


def test_include_usage_needs_stream() -> None:
    body = {"prompt": "p", "stream_options": {"include_usage": True}}
    assert not parse_request("/v1/completions", body).include_usage


def test_chat_fields() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None},
        ],
        "max_tokens": 100,
        "max_completion_tokens": 9,
        "logprobs": True,
        "top_logprobs": 1,
        "temperature": 0.5,
        "tool_choice": "none",
        "tools": [],
        "response_format": {"type": "text"},
    }
    parsed = parse_request("/v1/chat/completions", body)
    assert parsed.api == API_CHAT
    assert parsed.route == "v1"
    assert [m["content"] for m in parsed.messages or []] == ["be brief", "ab", ""]
    assert parsed.params.max_new_tokens == 9
    assert parsed.params.temperature == 0.5
    assert parsed.logprobs == 1
    default = parse_request("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert default.logprobs is None
    assert not default.max_new_tokens_set


CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("route", "body", "expected"),
    [
        ("v1/completions", {"prompt": ["a", "b"]}, ["`prompt` is a list of 2 prompts"]),
        ("v1/completions", {}, ["Missing `prompt`"]),
        ("v1/completions", {"prompt": "p", "n": 17}, ["`n` must be <= 16, got 17", "at most 16 completions"]),
        ("v1/completions", {"prompt": "p", "n": 0}, ["`n` must be >= 1, got 0"]),
        ("v1/completions", {"prompt": "p", "logprobs": 6}, ["`logprobs` must be <= 5, got 6"]),
        (
            "v1/completions",
            {"prompt": "p", "n": 3, "best_of": 2},
            ["`best_of` (2) must be >= `n` (3)", "raise best_of"],
        ),
        (
            "v1/completions",
            {"prompt": "p", "n": 2, "best_of": 3, "stream": True},
            ["`best_of`=3 > `n`=2 cannot be streamed", "stream to false"],
        ),
        ("v1/completions", {"prompt": "p", "echo": True, "logprobs": 1}, ["`echo` with `logprobs`"]),
        ("v1/completions", {"prompt": "p", "temperature": 3}, ["`temperature` must be >= 0 and <= 2, got 3"]),
        ("v1/completions", {"prompt": "p", "max_tokens": 0}, ["`max_tokens` must be >= 1"]),
        (
            "v1/completions",
            {"prompt": "p", "min_tokens": 20},
            ["`min_tokens` (20) must not exceed `max_tokens`"],
        ),
        (
            "v1/completions",
            {"prompt": "p", "presence_penalty": 2.5},
            ["`presence_penalty` must be >= -2 and <= 2, got 2.5", "Use 0 for no penalty"],
        ),
        (
            "v1/completions",
            {"prompt": "p", "frequency_penalty": "high"},
            ["`frequency_penalty` must be a finite number, got 'high'"],
        ),
        (
            "v1/completions",
            {"prompt": "p", "logit_bias": {"50256": 101}},
            ['`logit_bias["50256"]` must be a number from -100 to 100, got 101'],
        ),
        (
            "v1/completions",
            {"prompt": "p", "logit_bias": {"the": 1}},
            ["`logit_bias` key 'the' is not a token id", '"50256"'],
        ),
        ("v1/completions", {"prompt": "p", "logit_bias": [1]}, ["`logit_bias` must map token ids to biases"]),
        ("v1/completions", {"prompt": "p", "min_p": -0.1}, ["`min_p` must be >= 0 and <= 1, got -0.1"]),
        (
            "v1/completions",
            {"prompt": "p", "stop_token_ids": 2},
            ["`stop_token_ids` must be a list of token ids"],
        ),
        ("v1/completions", {"prompt": "p", "stream_options": {"x": 1}}, ["Unknown field `stream_options.x`"]),
        (
            "v1/completions",
            {"prompt": "p", "max_new_tokens": 4},
            ["Unknown field `max_new_tokens`", "max_tokens"],
        ),
        ("v1/chat/completions", {"messages": []}, ["`messages` must be a non-empty list"]),
        ("v1/chat/completions", {"messages": ["hi"]}, ["`messages[0]` must be an object"]),
        (
            "v1/chat/completions",
            {"messages": [{"role": "bot", "content": "x"}]},
            ["`messages[0].role`", "'bot'"],
        ),
        ("v1/chat/completions", {"messages": [{"role": "user"}]}, ["`messages[0].content` is required"]),
        (
            "v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
            ["`messages[0].content[0]`", "only text parts"],
        ),
        ("v1/chat/completions", {"messages": CHAT, "top_logprobs": 1}, ["requires `logprobs`: true"]),
        (
            "v1/chat/completions",
            {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
            ["`top_logprobs` must be <= 20, got 21"],
        ),
        ("v1/chat/completions", {"messages": CHAT, "best_of": 2}, ["Unknown field `best_of`"]),
        (
            "v1/chat/completions",
            {"messages": CHAT, "tools": [{"type": "function"}]},
            ["`tools`", "not supported"],
        ),
        (
            "v1/chat/completions",
            {"messages": CHAT, "max_completion_tokens": 0},
            ["`max_completion_tokens` must"],
        ),
    ],
)
def test_openai_validation_errors(route: str, body: dict[str, Any], expected: list[str]) -> None:
    message = error_of(body, route)
    for part in expected:
        assert part in message, message


# ---------------------------------------------------------------------------- TGI requests


@needs_tgi
def test_tgi_accepts_the_body_text_generation_sends() -> None:
    params = Parameters(max_new_tokens=12, stop=["\n"], details=True, top_p=0.8, seed=5)
    body = TgiRequest(inputs="hello", parameters=params, stream=False).model_dump()
    parsed = parse_request("/generate_stream", body)
    assert parsed.api == API_TGI
    assert parsed.stream
    assert parsed.params == SamplingParams(
        max_new_tokens=12, do_sample=True, top_p=0.8, seed=5, stop_sequences=("\n",)
    )
    assert parsed.details
    assert not parsed.return_full_text


def test_tgi_defaults_and_greedy() -> None:
    parsed = parse_request("/generate", {"inputs": "x"})
    assert not parsed.stream
    assert parsed.params == SamplingParams(max_new_tokens=20)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"temperature": 0}, "`parameters.temperature` must be > 0, got 0"),
        ({"stop_sequences": ["x"]}, "Unknown field `parameters.stop_sequences`"),
        ({"grammar": {"type": "regex", "value": "a+"}}, "`parameters.grammar`"),
        ({"best_of": 2}, "`parameters.best_of` > 1 needs sampling"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, "`parameters.seed` must not be set"),
        ({"best_of": 17, "do_sample": True}, "`parameters.best_of` must be <= 16, got 17"),
        ({"top_n_tokens": -1}, "`parameters.top_n_tokens` must be >= 0, got -1"),
        ({"frequency_penalty": 3}, "`parameters.frequency_penalty` must be >= -2 and <= 2, got 3"),
        ({"presence_penalty": 1}, "Unknown field `parameters.presence_penalty`"),
    ],
)
def test_tgi_validation_errors(params: dict[str, Any], expected: str) -> None:
    assert expected in error_of({"inputs": "x", "parameters": params}, "generate")


# ---------------------------------------------------------------------------- LMI responses


def test_lmi_json_response_with_details() -> None:
    w = writer_for(
        "invocations", {"inputs": PROMPT, "parameters": {"details": True, "decoder_input_details": True}}
    )
    assert w.content_type() == "application/json"
    events = script(["Hel", "lo"], "eos_token")
    assert [w.on_event(e) for e in events] == [b"", b""]
    assert not w.started
    final = w.finish()
    assert w.started
    body = json.loads(final)
    assert body == {
        "generated_text": "Hello",
        "details": {
            "finish_reason": "eos_token",
            "generated_tokens": 2,
            "inputs": PROMPT,
            "tokens": [
                {"id": 100, "text": "Hel", "log_prob": -0.25},
                {"id": 101, "text": "lo", "log_prob": -0.5, "special_token": True},
            ],
            "prefill": [],
        },
    }


def test_lmi_json_plain_and_full_text() -> None:
    w = writer_for("invocations", {"inputs": PROMPT, "parameters": {"return_full_text": True}})
    _, final = run(w, script([" there"]))
    assert json.loads(final) == {"generated_text": PROMPT + " there"}


def test_lmi_jsonlines_stream() -> None:
    w = writer_for("invocations", {"inputs": PROMPT, "stream": True, "parameters": {"details": True}})
    assert w.content_type() == "application/jsonlines"
    chunks, final = run(w, script(["a", "b", "c"], "stop_sequence"))
    assert final == b""
    assert all(c.count(b"\n") == 1 for c in chunks)
    lines = jsonlines(b"".join(chunks))
    assert lines[0] == {"token": {"id": 100, "text": "a", "log_prob": -0.25}}
    assert lines[2]["generated_text"] == "abc"
    assert lines[2]["details"] == {"finish_reason": "stop_sequence", "generated_tokens": 3, "inputs": PROMPT}
    assert "tokens" not in lines[2]["details"]


def test_lmi_stream_final_event_without_token() -> None:
    w = writer_for("invocations", {"inputs": PROMPT, "stream": True})
    chunks, _ = run(w, script(["a", "b"], "length", final_token=False))
    lines = jsonlines(b"".join(chunks))
    assert len(lines) == 3
    assert "generated_text" not in lines[1]
    assert lines[2] == {
        "token": {"id": -1, "text": "", "log_prob": None, "special_token": True},
        "generated_text": "ab",
    }


def test_lmi_sse_output_formatter() -> None:
    w = writer_for("invocations", {"inputs": PROMPT}, output_formatter="sse")
    assert w.content_type() == "text/event-stream"
    chunks, final = run(w, script(["a", "b"]))
    payloads = [json.loads(p) for p in sse_payloads(b"".join(chunks) + final)]
    assert payloads[-1]["generated_text"] == "ab"
    assert payloads[0]["token"]["text"] == "a"


def test_lmi_stream_error_mid_stream() -> None:
    w = writer_for("invocations", {"inputs": PROMPT, "stream": True})
    assert w.on_event(TokenEvent("r", 5, "a", -0.1))
    assert w.started
    tail = w.error("CUDA out of memory", 500)
    line = json.loads(tail)
    assert line == {
        "token": {"id": -1, "text": "", "log_prob": -1, "special_token": True},
        "generated_text": "",
        "details": {"finish_reason": "error", "generated_tokens": 1, "inputs": PROMPT},
        "error": "CUDA out of memory",
        "code": 500,
    }
    assert w.finish() == b""
    assert w.error("again", 500) == b""
    assert w.error_code == 500


def test_error_event_becomes_error_line() -> None:
    w = writer_for("invocations", {"inputs": PROMPT, "stream": True})
    w.on_event(TokenEvent("r", 1, "a", -0.1))
    out = w.on_event(TokenEvent("r", -1, "", 0.0, finish_reason="error", error="engine died"))
    line = json.loads(out)
    assert line["error"] == "engine died"
    assert line["code"] == 424
    assert line["details"]["finish_reason"] == "error"


def test_lmi_json_error_body() -> None:
    w = writer_for("invocations", {"inputs": PROMPT})
    w.on_event(TokenEvent("r", 1, "a", -0.1))
    assert not w.started  # non-stream: nothing sent yet, so the worker may still set an HTTP status
    body = json.loads(w.error("boom", 424))
    assert body == {
        "generated_text": None,
        "error": "boom",
        "code": 424,
        "details": {"finish_reason": "error", "generated_tokens": 1, "inputs": PROMPT},
    }


def test_finish_without_final_event_reports_cancelled() -> None:
    w = writer_for("invocations", {"inputs": PROMPT, "parameters": {"details": True}})
    w.on_event(TokenEvent("r", 1, "a", -0.1))
    assert json.loads(w.finish())["details"]["finish_reason"] == "cancelled"


def test_events_after_the_final_one_are_ignored() -> None:
    w = writer_for("invocations", {"inputs": PROMPT, "stream": True})
    run(w, script(["a"]))
    assert w.on_event(TokenEvent("r", 9, "z", 0.0)) == b""
    assert w.generated_text == "a"


def test_output_formatter_overrides_stream_flag() -> None:
    lmi = parse_request("invocations", {"inputs": "x", "stream": True})
    assert output_mode(lmi, "json", False) == "json"
    assert output_mode(parse_request("invocations", {"inputs": "x"}), "jsonlines", False) == "jsonlines"
    assert output_mode(lmi, None, True) == "sse"
    v1 = parse_request("v1/completions", {"prompt": "x"})
    assert output_mode(v1, "jsonlines", False) == "json"  # /v1 ignores the LMI option
    with pytest.raises(ValueError, match="output_formatter='xml' is not supported"):
        output_mode(lmi, "xml", False)


def test_non_finite_logprob_is_null_json() -> None:
    w = writer_for("invocations", {"inputs": PROMPT, "stream": True})
    out = w.on_event(TokenEvent("r", 1, "a", -math.inf, finish_reason="length"))
    assert json.loads(out)["token"]["log_prob"] is None  # strict JSON parse: no -Infinity literal


def test_unicode_passes_through_unescaped() -> None:
    w = writer_for("invocations", {"inputs": PROMPT})
    _, final = run(w, script(["héllo ", "世界"]))
    assert "世界".encode() in final
    assert json.loads(final)["generated_text"] == "héllo 世界"


# ---------------------------------------------------------------------------- LMI tgi_compat


@needs_tgi
def test_tgi_compat_json_validates_as_text_generation_response() -> None:
    w = writer_for("invocations", {"inputs": PROMPT}, tgi_compat=True)
    _, final = run(w, script(["a", "b"], "eos_token"))
    body = json.loads(final)
    assert isinstance(body, list)
    assert len(body) == 1
    response = TgiResponse.model_validate(body[0])
    assert response.generated_text == "ab"
    assert response.details.finish_reason == "eos_token"
    assert response.details.tokens[1].special
    assert response.details.prefill == []


def test_tgi_compat_respects_explicit_details_false() -> None:
    w = writer_for("invocations", {"inputs": PROMPT, "parameters": {"details": False}}, tgi_compat=True)
    _, final = run(w, script(["a"]))
    assert json.loads(final) == [{"generated_text": "a"}]


@needs_tgi
def test_tgi_compat_stream_is_sse_of_stream_responses() -> None:
    w = writer_for("invocations", {"inputs": PROMPT, "stream": True}, tgi_compat=True)
    assert w.content_type() == "text/event-stream"
    chunks, final = run(w, script(["a", "b"], "cancelled"))
    parsed = [TgiStreamResponse.model_validate_json(p) for p in sse_payloads(b"".join(chunks) + final)]
    assert parsed[0].generated_text is None
    assert parsed[1].generated_text == "ab"
    assert parsed[1].details is not None
    assert parsed[1].details.finish_reason == "length"


def _fake_post(tgi_compat: bool, events: list[TokenEvent], fail: str | None = None):
    """A requests.post stand-in that answers text_generation's client from our parser and writer."""

    def post(url: str, json: dict[str, Any], **kwargs: Any) -> requests.Response:
        writer = writer_for("invocations", json, tgi_compat=tgi_compat)
        body = b"".join(writer.on_event(e) for e in events)
        body += writer.error(fail, 424) if fail else writer.finish()
        response = requests.Response()
        response.status_code, response._content = 200, body
        response.raw, response.encoding = io.BytesIO(body), "utf-8"
        response._content_consumed = not kwargs.get("stream")
        return response

    return post


@needs_tgi
def test_text_generation_client_against_tgi_compat(monkeypatch: pytest.MonkeyPatch) -> None:
    client = text_generation.Client("http://lmi/invocations")
    events = script([" Hello", " world"], "stop_sequence")
    monkeypatch.setattr(text_generation.client.requests, "post", _fake_post(True, events))
    response = client.generate(PROMPT, max_new_tokens=5, stop_sequences=["!"], return_full_text=True)
    assert response.generated_text == PROMPT + " Hello world"
    assert response.details.finish_reason == "stop_sequence"
    assert response.details.generated_tokens == 2
    tokens = list(client.generate_stream(PROMPT, max_new_tokens=5))
    assert [t.token.text for t in tokens] == [" Hello", " world"]
    assert tokens[-1].generated_text == " Hello world"
    assert tokens[-1].details is not None


@needs_tgi
def test_text_generation_client_sees_mid_stream_error(monkeypatch: pytest.MonkeyPatch) -> None:
    client = text_generation.Client("http://lmi/invocations")
    monkeypatch.setattr(text_generation.client.requests, "post", _fake_post(True, script(["a"]), fail="boom"))
    stream = client.generate_stream(PROMPT)
    assert next(stream).token.text == "a"
    with pytest.raises(text_generation.errors.GenerationError, match="boom"):
        next(stream)


# ---------------------------------------------------------------------------- TGI responses


@needs_tgi
def test_tgi_generate_response() -> None:
    body = {"inputs": PROMPT, "parameters": {"details": True, "do_sample": True, "seed": 4}}
    w = writer_for("/generate", body)
    assert w.content_type() == "application/json"
    _, final = run(w, script(["x", "y"], "eos_token"))
    response = TgiResponse.model_validate_json(final)
    assert response.generated_text == "xy"
    assert response.details.seed == 4
    assert [t.logprob for t in response.details.tokens] == [-0.25, -0.5]
    assert json.loads(run(writer_for("generate", {"inputs": PROMPT}), script(["z"]))[1]) == {
        "generated_text": "z"
    }


@needs_tgi
def test_tgi_generate_stream() -> None:
    w = writer_for(
        "/generate_stream", {"inputs": PROMPT, "parameters": {"details": True, "return_full_text": True}}
    )
    assert w.content_type() == "text/event-stream"
    chunks, final = run(w, script(["x", "y"], "stop_sequence"))
    payloads = sse_payloads(b"".join(chunks) + final)
    events = [TgiStreamResponse.model_validate_json(p) for p in payloads]
    assert [json.loads(p)["index"] for p in payloads] == [1, 2]
    assert events[0].generated_text is None
    assert events[0].details is None
    assert events[1].generated_text == PROMPT + "xy"
    assert events[1].details is not None
    assert events[1].details.finish_reason == "stop_sequence"
    assert json.loads(payloads[1])["details"]["input_length"] == PROMPT_TOKENS


def test_tgi_stream_error_event() -> None:
    w = writer_for("/generate_stream", {"inputs": PROMPT})
    w.on_event(TokenEvent("r", 1, "a", -0.1))
    assert sse_payloads(w.error("boom", 424)) == ['{"error":"boom","error_type":"generation"}']
    assert w.finish() == b""


# ---------------------------------------------------------------------------- OpenAI responses


@needs_openai
def test_completion_response_validates() -> None:
    w = writer_for("/v1/completions", {"prompt": PROMPT, "logprobs": 1, "max_tokens": 2})
    _, final = run(w, script(["a", "bc"], "eos_token"))
    completion = Completion.model_validate_json(final)
    assert completion.id == "cmpl-req-1"
    assert completion.model == "test-model"
    choice = completion.choices[0]
    assert choice.text == "abc"
    assert choice.finish_reason == "stop"
    assert choice.logprobs is not None
    assert choice.logprobs.text_offset == [0, 1]
    assert choice.logprobs.top_logprobs == [{"a": -0.25}, {"bc": -0.5}]
    assert choice.logprobs.tokens == ["a", "bc"]
    assert choice.logprobs.token_logprobs == [-0.25, -0.5]
    assert completion.usage is not None
    assert completion.usage.model_dump() == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "completion_tokens_details": None,
        "prompt_tokens_details": None,
    }


@needs_openai
def test_completion_echo_and_length() -> None:
    w = writer_for("/v1/completions", {"prompt": PROMPT, "echo": True})
    _, final = run(w, script(["!"], "length"))
    choice = Completion.model_validate_json(final).choices[0]
    assert choice.text == PROMPT + "!"
    assert choice.finish_reason == "length"


@needs_openai
def test_completion_stream_chunks() -> None:
    body = {"prompt": PROMPT, "stream": True, "echo": True, "stream_options": {"include_usage": True}}
    w = writer_for("/v1/completions", body)
    chunks, final = run(w, script(["a", "", "b"], "stop_sequence"))
    assert chunks[1] == b""  # an empty-text token (incomplete character) sends nothing
    payloads = sse_payloads(b"".join(chunks) + final)
    assert payloads[-1] == "[DONE]"
    objects = [json.loads(p) for p in payloads[:-1]]
    # Completion chunks carry finish_reason null until the last (as OpenAI sends them); the SDK reads
    # them without validation, so validate everything else strictly.
    for obj in objects[:-1]:
        Completion.model_validate(
            {**obj, "choices": [{**c, "finish_reason": "stop"} for c in obj["choices"]]}
        )
    assert [o["choices"][0]["text"] for o in objects[:-1]] == [PROMPT + "a", "b"]
    assert objects[-2]["choices"][0]["finish_reason"] == "stop"
    assert objects[-1]["choices"] == []
    assert objects[-1]["usage"]["total_tokens"] == PROMPT_TOKENS + 3


@needs_openai
def test_chat_response_validates() -> None:
    w = writer_for("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 1})
    alternatives = [[(100, "Hi", -0.25), (7, "Hey", -1.5)], [(8, ".", -0.1), (101, "!", -0.5)]]
    _, final = run(w, with_top(script(["Hi", "!"], "eos_token"), alternatives))
    chat = ChatCompletion.model_validate_json(final)
    assert chat.id == "chatcmpl-req-1"
    assert chat.object == "chat.completion"
    choice = chat.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hi!"
    assert choice.finish_reason == "stop"
    assert choice.logprobs is not None
    assert choice.logprobs.content is not None
    assert [(t.token, t.logprob, t.bytes) for t in choice.logprobs.content] == [
        ("Hi", -0.25, [72, 105]),
        ("!", -0.5, [33]),
    ]
    tops = [[(t.token, t.logprob) for t in entry.top_logprobs] for entry in choice.logprobs.content]
    assert tops == [[("Hi", -0.25)], [(".", -0.1)]]  # the most likely one, not the sampled one
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 2


@needs_openai
def test_chat_stream_chunks() -> None:
    body = {"messages": CHAT, "stream": True, "stream_options": {"include_usage": True}}
    w = writer_for("/v1/chat/completions", body)
    assert w.content_type() == "text/event-stream"
    chunks, final = run(w, script(["Hi", " there"], "length", final_token=False))
    payloads = sse_payloads(b"".join(chunks) + final)
    assert payloads[-1] == "[DONE]"
    parsed = [ChatCompletionChunk.model_validate_json(p) for p in payloads[:-1]]
    assert parsed[0].choices[0].delta.role == "assistant"
    assert parsed[0].choices[0].delta.content == "Hi"
    assert parsed[1].choices[0].delta.role is None
    assert parsed[1].choices[0].delta.content == " there"
    assert parsed[2].choices[0].finish_reason == "length"
    assert parsed[2].choices[0].delta.content is None
    assert parsed[3].choices == []
    assert parsed[3].usage is not None
    assert parsed[3].usage.completion_tokens == 2
    assert all(p.id == "chatcmpl-req-1" for p in parsed)


@needs_openai
def test_chat_through_invocations_streams_jsonlines() -> None:
    w = writer_for("invocations", {"messages": CHAT, "stream": True})
    assert w.content_type() == "application/jsonlines"
    chunks, final = run(w, script(["a", "b"]))
    lines = jsonlines(b"".join(chunks) + final)  # no [DONE] in jsonlines framing
    for line in lines:
        ChatCompletionChunk.model_validate(line)
    assert lines[-1]["choices"][0]["finish_reason"] == "length"
    sse_writer = writer_for("invocations", {"messages": CHAT, "stream": True}, output_formatter="sse")
    assert sse_writer.content_type() == "text/event-stream"
    chunks, final = run(sse_writer, script(["a"]))
    assert sse_payloads(b"".join(chunks) + final)[-1] == "[DONE]"


@needs_openai
def test_chat_non_stream_through_invocations() -> None:
    _, final = run(writer_for("invocations", {"messages": CHAT}), script(["ok"], "eos_token"))
    assert ChatCompletion.model_validate_json(final).choices[0].message.content == "ok"


def test_openai_stream_error_event() -> None:
    w = writer_for("/v1/chat/completions", {"messages": CHAT, "stream": True})
    w.on_event(TokenEvent("r", 1, "a", -0.1))
    payloads = sse_payloads(w.error("engine failed", 500))
    assert json.loads(payloads[0]) == {
        "error": {"message": "engine failed", "type": "server_error", "param": None, "code": 500}
    }
    assert payloads[1] == "[DONE]"


# ---------------------------------------------------------------------------- the openai SDK end to end


def openai_client(events: list[TokenEvent], fail: str | None = None) -> Any:
    """An SDK client whose transport runs our parser and writer instead of a server."""
    # The SDK's own HTTP library (httpx, or httpx2 in newer releases) provides the in-process transport.
    httpx = importlib.import_module(openai.DefaultHttpxClient.__mro__[1].__module__.split(".")[0])

    def handle(request: Any) -> Any:
        try:
            parsed = parse_request(request.url.path, request.content)
        except RequestError as exc:
            status, body = error_reply(api_for_path(request.url.path), 400, str(exc))
            return httpx.Response(status, json=body)
        writer = create_writer(parsed, "req-1", "test-model", PROMPT, PROMPT_TOKENS)
        body = b"".join(writer.on_event(e) for e in events)
        body += writer.error(fail, 500) if fail else writer.finish()
        return httpx.Response(200, content=body, headers={"content-type": writer.content_type()})

    client = openai.DefaultHttpxClient(transport=httpx.MockTransport(handle))
    return openai.OpenAI(api_key="unused", base_url="http://lmi/v1", http_client=client, max_retries=0)


@needs_openai
def test_openai_sdk_chat_and_completions() -> None:
    client = openai_client(script(["Hel", "lo"], "eos_token"))
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert chat.choices[0].message.content == "Hello"
    assert chat.choices[0].finish_reason == "stop"
    completion = client.completions.create(model="m", prompt="hi", max_tokens=4, temperature=0, stop=["\n"])
    assert completion.choices[0].text == "Hello"


@needs_openai
def test_openai_sdk_streams() -> None:
    client = openai_client(script(["Hel", "lo"], "length"))
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == PROMPT_TOKENS + 2
    text = "".join(c.choices[0].text for c in client.completions.create(model="m", prompt="hi", stream=True))
    assert text == "Hello"


@needs_openai
def test_openai_sdk_raises_on_mid_stream_error() -> None:
    client = openai_client(script(["Hel"]), fail="engine failed")
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert next(iter(stream)).choices[0].delta.content == "Hel"
    with pytest.raises(openai.APIError, match="engine failed"):
        list(stream)


@needs_openai
def test_openai_sdk_gets_validation_error() -> None:
    client = openai_client(script(["x"]))
    with pytest.raises(openai.BadRequestError, match="`n` must be <= 16, got 17"):
        client.completions.create(model="m", prompt="hi", n=17)


def test_parsed_request_is_a_plain_dataclass() -> None:
    parsed = ParsedRequest(api=API_LMI, prompt="x")
    assert parsed.params == SamplingParams()
    assert parsed.route == "invocations"


# ---------------------------------------------------------------------------- n, best_of, top alternatives


def completion_events(index: int, texts: list[str], logprobs: list[float], finish: str) -> list[TokenEvent]:
    """Completion ``index`` of request "r": token ids 10*index + i, the last event carries ``finish``."""
    events = [
        TokenEvent("r", 10 * index + i, text, logprob, index=index)
        for i, (text, logprob) in enumerate(zip(texts, logprobs, strict=True))
    ]
    events[-1].finish_reason = finish
    return events


def interleave(*completions: list[TokenEvent]) -> list[TokenEvent]:
    """The events of several completions in engine order: one token of each per step."""
    steps = itertools.zip_longest(*completions)
    return [event for step in steps for event in step if event is not None]


def test_openai_knobs_map_to_sampling_params() -> None:
    body = {
        "prompt": "p",
        "n": 2,
        "best_of": 3,
        "presence_penalty": 1.5,
        "frequency_penalty": -2,
        "logit_bias": {"50256": -100, "11": 3},
        "min_p": 0.1,
        "stop_token_ids": [5],
        "logprobs": 2,
    }
    parsed = parse_request("/v1/completions", body)
    assert parsed.params == SamplingParams(
        max_new_tokens=16,
        do_sample=True,
        n=2,
        best_of=3,
        presence_penalty=1.5,
        frequency_penalty=-2.0,
        min_p=0.1,
        logit_bias=((11, 3.0), (50256, -100.0)),
        stop_token_ids=(5,),
        top_logprobs=2,
    )
    assert parsed.params.num_sequences == 3
    assert parsed.logprobs == 2
    assert parse_request("/v1/completions", {"prompt": "p", "n": 2, "best_of": 2}).params.best_of is None
    chat_body = {"messages": CHAT, "n": 2, "stream": True, "logprobs": True, "top_logprobs": 3}
    chat = parse_request("/v1/chat/completions", chat_body)
    assert (chat.params.n, chat.params.num_sequences, chat.params.top_logprobs, chat.logprobs) == (2, 2, 3, 3)
    plain = parse_request("/v1/chat/completions", {"messages": CHAT, "logprobs": True})
    assert (plain.logprobs, plain.params.top_logprobs) == (0, 0)


def test_lmi_n_and_best_of() -> None:
    body = {"inputs": "x", "parameters": {"n": 2, "best_of": 4, "do_sample": True}}
    params = parse_request("invocations", body).params
    assert (params.n, params.best_of, params.num_sequences) == (2, 4, 4)


def test_tgi_best_of_top_n_tokens_and_frequency_penalty() -> None:
    parameters = {"best_of": 3, "temperature": 0.5, "top_n_tokens": 2, "frequency_penalty": 0.5}
    params = parse_request("/generate", {"inputs": "x", "parameters": parameters}).params
    assert (params.n, params.best_of, params.num_sequences) == (3, None, 3)  # TGI returns all best_of
    assert params.do_sample
    assert (params.top_logprobs, params.frequency_penalty) == (2, 0.5)
    with pytest.raises(RequestError, match="`parameters.best_of` > 1 cannot be streamed"):
        parse_request("/generate_stream", {"inputs": "x", "parameters": parameters})


def test_token_ids_are_checked_against_the_vocabulary() -> None:
    check_token_ids(SamplingParams(logit_bias=((9, 1.0),), stop_token_ids=(0, 9)), vocab_size=10)
    message = r"`logit_bias` names token id 10, but the vocabulary has 10 tokens \(ids 0..9\)"
    with pytest.raises(RequestError, match=message):
        check_token_ids(SamplingParams(logit_bias=((10, 1.0),)), vocab_size=10)
    with pytest.raises(RequestError, match="`stop_token_ids` names token id 12"):
        check_token_ids(SamplingParams(stop_token_ids=(3, 12)), vocab_size=10)


@needs_openai
def test_chat_n2_non_stream() -> None:
    w = writer_for("/v1/chat/completions", {"messages": CHAT, "n": 2})
    first = completion_events(0, ["A", "B"], [-1.0, -1.0], "eos_token")
    second = completion_events(1, ["x", "y", "z"], [-0.5] * 3, "length")
    for event in interleave(first, second):
        assert not w.done
        assert w.on_event(event) == b""
    assert w.done
    chat = ChatCompletion.model_validate_json(w.finish())
    assert [(c.index, c.message.content, c.finish_reason) for c in chat.choices] == [
        (0, "AB", "stop"),
        (1, "xyz", "length"),
    ]
    assert chat.usage is not None
    assert (chat.usage.completion_tokens, chat.usage.total_tokens) == (5, PROMPT_TOKENS + 5)


@needs_openai
def test_chat_n2_stream_carries_each_choice_index_and_ends_once() -> None:
    body = {"messages": CHAT, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    w = writer_for("/v1/chat/completions", body)
    first = completion_events(0, ["A", "B"], [-1.0, -1.0], "eos_token")
    second = completion_events(1, ["x", "y", "z"], [-0.5] * 3, "length")
    data = b"".join(w.on_event(e) for e in interleave(first, second))
    assert w.done
    assert b"[DONE]" not in data  # nothing closes the stream before finish()
    payloads = sse_payloads(data + w.finish())
    assert payloads.count("[DONE]") == 1
    assert payloads[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in payloads[:-1]]
    choices = [c.choices[0] for c in chunks[:-1]]
    assert [c.index for c in choices] == [0, 1, 0, 1, 1]
    assert [c.delta.role for c in choices] == ["assistant", "assistant", None, None, None]
    text = {i: "".join(c.delta.content or "" for c in choices if c.index == i) for i in (0, 1)}
    assert text == {0: "AB", 1: "xyz"}
    assert {c.index: c.finish_reason for c in choices if c.finish_reason} == {0: "stop", 1: "length"}
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


@needs_openai
def test_completion_n2_stream_and_not() -> None:
    first = completion_events(0, ["a"], [-1.0], "length")
    second = completion_events(1, ["b", "c"], [-1.0, -1.0], "stop_sequence")
    w = writer_for("/v1/completions", {"prompt": PROMPT, "n": 2, "echo": True})
    completion = Completion.model_validate_json(run(w, interleave(first, second))[1])
    assert [(c.index, c.text, c.finish_reason) for c in completion.choices] == [
        (0, PROMPT + "a", "length"),
        (1, PROMPT + "bc", "stop"),
    ]
    w = writer_for("/v1/completions", {"prompt": PROMPT, "n": 2, "stream": True})
    chunks, final = run(w, interleave(first, second))
    objects = [json.loads(p) for p in sse_payloads(b"".join(chunks) + final)[:-1]]
    assert [(o["choices"][0]["index"], o["choices"][0]["text"]) for o in objects] == [
        (0, "a"),
        (1, "b"),
        (1, "c"),
    ]
    assert [o["choices"][0]["finish_reason"] for o in objects] == ["length", None, "stop"]


@needs_openai
def test_completion_best_of_returns_the_n_most_likely() -> None:
    w = writer_for("/v1/completions", {"prompt": PROMPT, "n": 2, "best_of": 3})
    events = interleave(
        completion_events(0, ["a", "a"], [-1.0, -1.0], "length"),  # cumulative -2.0
        completion_events(1, ["b"], [-0.5], "eos_token"),  # -0.5
        completion_events(2, ["c", "c"], [-0.1, -0.2], "length"),  # -0.3
    )
    completion = Completion.model_validate_json(run(w, events)[1])
    assert [(c.index, c.text) for c in completion.choices] == [(0, "cc"), (1, "b")]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5  # every generated token counts, as OpenAI bills


@needs_openai
def test_chat_top_logprobs_3() -> None:
    body = {"messages": CHAT, "stream": True, "logprobs": True, "top_logprobs": 3}
    w = writer_for("/v1/chat/completions", body)
    alternatives = [[(100, "Hi", -0.25), (7, "Hey", -2.5), (8, "Yo", -3.0), (9, "x", -9.0)]]
    chunks, final = run(w, with_top(script(["Hi"]), alternatives))
    chunk = ChatCompletionChunk.model_validate_json(sse_payloads(b"".join(chunks) + final)[0])
    logprobs = chunk.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    top = [(t.token, t.logprob, t.bytes) for t in logprobs.content[0].top_logprobs]
    assert top == [("Hi", -0.25, [72, 105]), ("Hey", -2.5, [72, 101, 121]), ("Yo", -3.0, [89, 111])]


@needs_openai
def test_completion_logprobs_2_is_the_legacy_block() -> None:
    w = writer_for("/v1/completions", {"prompt": PROMPT, "logprobs": 2})
    alternatives = [
        [(100, "a", -0.25), (5, "b", -2.0), (6, "c", -3.0)],
        [(7, "x", -0.1), (101, "yz", -0.5), (8, "w", -4.0)],
    ]
    _, final = run(w, with_top(script(["a", "yz"]), alternatives))
    logprobs = Completion.model_validate_json(final).choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["a", "yz"]
    assert logprobs.token_logprobs == [-0.25, -0.5]
    assert logprobs.text_offset == [0, 1]
    # the sampled token plus the 2 most likely (up to logprobs + 1 entries, as OpenAI documents)
    assert logprobs.top_logprobs == [{"a": -0.25, "b": -2.0}, {"yz": -0.5, "x": -0.1}]


def test_lmi_n2_returns_best_of_sequences() -> None:
    w = writer_for("invocations", {"inputs": PROMPT, "parameters": {"n": 2, "do_sample": True}})
    first = completion_events(0, ["He", "llo"], [-0.5, -0.5], "length")
    second = completion_events(1, ["I", " am"], [-0.1, -0.2], "eos_token")
    assert json.loads(run(w, interleave(first, second))[1]) == {
        "generated_text": "I am",
        "details": {
            "finish_reason": "eos_token",
            "generated_tokens": 2,
            "inputs": PROMPT,
            "tokens": [
                {"id": 10, "text": "I", "log_prob": -0.1},
                {"id": 11, "text": " am", "log_prob": -0.2, "special_token": True},
            ],
            "best_of_sequences": [
                {
                    "finish_reason": "length",
                    "generated_tokens": 2,
                    "tokens": [
                        {"id": 0, "text": "He", "log_prob": -0.5},
                        {"id": 1, "text": "llo", "log_prob": -0.5},
                    ],
                    "generated_text": "Hello",
                }
            ],
        },
    }


def test_lmi_top_n_tokens() -> None:
    alternatives = [[(100, "a", -0.25), (3, "b", -1.0)]]
    w = writer_for("invocations", {"inputs": PROMPT, "parameters": {"top_n_tokens": 2, "details": True}})
    details = json.loads(run(w, with_top(script(["a"]), alternatives))[1])["details"]
    assert details["top_tokens"] == [
        [{"id": 100, "text": "a", "log_prob": -0.25}, {"id": 3, "text": "b", "log_prob": -1.0}]
    ]
    w = writer_for("invocations", {"inputs": PROMPT, "stream": True, "parameters": {"top_n_tokens": 1}})
    line = jsonlines(b"".join(run(w, with_top(script(["a"]), alternatives))[0]))[0]
    assert line["top_tokens"] == [{"id": 100, "text": "a", "log_prob": -0.25}]


@needs_tgi
def test_tgi_best_of_and_top_n_tokens_validate() -> None:
    parameters = {"best_of": 2, "do_sample": True, "details": True, "top_n_tokens": 1}
    w = writer_for("/generate", {"inputs": PROMPT, "parameters": parameters})
    first = with_top(completion_events(0, ["x"], [-2.0], "length"), [[(4, "q", -0.5)]])
    second = with_top(completion_events(1, ["y"], [-1.0], "eos_token"), [[(10, "y", -1.0)]])
    response = TgiResponse.model_validate_json(run(w, interleave(first, second))[1])
    assert response.generated_text == "y"
    assert response.details is not None
    assert response.details.finish_reason == "eos_token"
    assert [[(t.id, t.text) for t in step] for step in response.details.top_tokens or []] == [[(10, "y")]]
    others = response.details.best_of_sequences or []
    assert [(o.generated_text, o.finish_reason, o.generated_tokens) for o in others] == [("x", "length", 1)]
    w = writer_for("/generate_stream", {"inputs": PROMPT, "parameters": {"top_n_tokens": 1}})
    chunks, final = run(w, with_top(script(["x"]), [[(100, "x", -0.25)]]))
    event = TgiStreamResponse.model_validate_json(sse_payloads(b"".join(chunks) + final)[0])
    assert [(t.id, t.text, t.logprob) for t in event.top_tokens or []] == [(100, "x", -0.25)]


def test_writer_done_waits_for_every_completion() -> None:
    w = writer_for("/v1/completions", {"prompt": PROMPT, "n": 2, "stream": True})
    w.on_event(TokenEvent("r", 1, "a", -0.1, "length", index=1))
    assert not w.done
    w.on_event(TokenEvent("r", 2, "b", -0.1, index=0))
    assert not w.done
    # the client went away before completion 0 finished: it is closed as cut short ("length")
    objects = [json.loads(p) for p in sse_payloads(w.finish())[:-1]]
    assert [(o["choices"][0]["index"], o["choices"][0]["finish_reason"]) for o in objects] == [(0, "length")]


def test_writer_error_ends_every_completion() -> None:
    w = writer_for("/v1/completions", {"prompt": PROMPT, "n": 2})
    w.on_event(TokenEvent("r", 1, "a", -0.1, "length", index=1))
    body = json.loads(w.on_event(TokenEvent("r", -1, "", 0.0, "error", "engine failed", index=0)))
    assert body["error"]["message"] == "engine failed"
    assert w.done
    assert w.error_code == 424
    with pytest.raises(ValueError, match="event index 2 of request r is outside its 2 completions"):
        writer_for("/v1/completions", {"prompt": PROMPT, "n": 2}).on_event(
            TokenEvent("r", 1, "a", 0.0, index=2)
        )
