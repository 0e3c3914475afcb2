"""A model.py with only DJL's @input_formatter / @output_formatter, served by the real server over a tiny
Llama: the built-in engine parses what the input formatter returns and every response (whole body,
stream line, SSE event) goes out through the output formatter."""

from __future__ import annotations

import json
import textwrap

import pytest
from support import ServerProcess, tiny_model_script

MODEL_PY = """
    from djl_python.input_parser import input_formatter
    from djl_python.output_formatter import output_formatter


    @input_formatter
    def accept_questions(decoded_payload, tokenizer=None, **kwargs):
        if "question" not in decoded_payload:
            return decoded_payload  # LMI and OpenAI bodies pass unchanged
        if not decoded_payload["question"]:
            raise ValueError("question is empty")
        return {
            "inputs": "Q: " + decoded_payload["question"] + "\\nA:",
            "parameters": {"max_new_tokens": 4},
            "stream": decoded_payload.get("stream", False),
        }


    @output_formatter
    def add_version(response_data):
        return {**response_data, "model_version": "v7"}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("formatted"), seed=0)
    (folder / "model.py").write_text(textwrap.dedent(MODEL_PY), encoding="utf-8")
    env = {"OPTION_MAX_ROLLING_BATCH_SIZE": "4", "OPTION_MAX_MODEL_LEN": "256"}
    with ServerProcess(folder, env) as srv:
        srv.wait_ready(timeout_s=180)
        yield srv


def test_custom_request_shape_and_formatted_answer(server):
    resp = server.post(json_body={"question": "What is the capital of France?"})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["model_version"] == "v7"
    assert isinstance(answer["generated_text"], str)
    plain = server.post(
        json_body={"inputs": "Q: What is the capital of France?\nA:", "parameters": {"max_new_tokens": 4}}
    )
    assert plain.json() == answer  # the same generation once the formatter reshaped the request


def test_every_stream_line_is_formatted(server):
    with server.post(json_body={"question": "Why?", "stream": True}, stream=True) as resp:
        assert resp.status_code == 200, resp.text
        assert resp.headers["Content-Type"].startswith("application/jsonlines")
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert len(lines) == 4
    assert all(line["model_version"] == "v7" for line in lines)
    assert "generated_text" in lines[-1]


def test_openai_sse_events_are_formatted_and_done_is_kept(server):
    body = {"prompt": "Hello", "max_tokens": 3, "stream": True}
    with server.post("/v1/completions", json_body=body, stream=True) as resp:
        assert resp.status_code == 200, resp.text
        events = [line.decode() for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert chunks
    assert all(chunk["model_version"] == "v7" and chunk["object"] == "text_completion" for chunk in chunks)


def test_text_plain_bodies_are_decoded_before_the_formatter(server):
    resp = server.post(data=b"Once upon a time", headers={"Content-Type": "text/plain"})
    assert resp.status_code == 200, resp.text
    (answer,) = resp.json()  # decode() gives {"inputs": [text]}: a list of one prompt, answered as a list
    assert answer["model_version"] == "v7"


def test_a_failing_input_formatter_is_a_424_with_its_message(server):
    resp = server.post(json_body={"question": ""})
    assert resp.status_code == 424
    assert "accept_questions failed: ValueError: question is empty" in resp.json()["message"]
