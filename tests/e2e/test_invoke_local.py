"""``lmi invoke --url`` against the real server with a tiny Llama: answers, token streams, errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from support import ROOT, ServerProcess, free_port, tiny_model_script

from serving.deploy.invoke import InvokeError, invoke_url, request_body

PROMPT = "The capital of France is"
GREEDY = {"max_new_tokens": 12, "ignore_eos": True}


class Writes(io.StringIO):
    """Keeps every write separately, to see that tokens were printed one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)
    env = {"OPTION_DTYPE": "fp32", "OPTION_MAX_MODEL_LEN": "128", "OPTION_MAX_ROLLING_BATCH_SIZE": "2"}
    with ServerProcess(path, env) as srv:
        srv.wait_ready(timeout_s=180)
        yield srv


def lmi_invoke(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "serving", "invoke", *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def whole_answer(server: ServerProcess) -> str:
    resp = server.post(json_body={"inputs": PROMPT, "parameters": GREEDY})
    assert resp.status_code == 200, resp.text
    return resp.json()["generated_text"]


def test_invoke_prints_the_answer(server):
    done = lmi_invoke("--url", server.url, "--body", json.dumps({"inputs": PROMPT, "parameters": GREEDY}))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"generated_text": whole_answer(server)}


def test_invoke_stream_prints_tokens_as_they_arrive(server):
    out = Writes()
    body = request_body(None, json.dumps({"inputs": PROMPT, "parameters": GREEDY}), 0, stream=True)
    invoke_url(server.url + "/invocations", body, "application/json", None, 60, out)
    assert out.getvalue() == whole_answer(server) + "\n"
    assert len([w for w in out.writes if w.strip()]) >= 6  # 12 tokens, printed as their chunks came


def test_invoke_stream_from_the_cli(server):
    done = lmi_invoke(
        "--url", server.url, "--stream", "--body", json.dumps({"inputs": PROMPT, "parameters": GREEDY})
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == whole_answer(server) + "\n"


def test_invoke_stream_of_server_sent_events_on_the_openai_route(server):
    body = {
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        "ignore_eos": True,
        "temperature": 0,
    }
    whole = server.post("/v1/chat/completions", json_body=body)
    assert whole.status_code == 200, whole.text
    done = lmi_invoke("--url", server.url + "/v1/chat/completions", "--stream", "--body", json.dumps(body))
    assert done.returncode == 0, done.stderr
    assert done.stdout == whole.json()["choices"][0]["message"]["content"] + "\n"


def test_refused_request_exits_1_with_the_servers_message(server):
    done = lmi_invoke("--url", server.url, "--stream", "--max-new-tokens", "1000", PROMPT)
    assert done.returncode == 1
    assert "answered 400" in done.stderr
    assert "exceeds option.max_model_len=128" in done.stderr


def test_unreachable_url_is_an_error_not_a_traceback():
    with pytest.raises(InvokeError, match="cannot reach"):
        invoke_url(
            f"http://127.0.0.1:{free_port()}/invocations", b"{}", "application/json", None, 5, io.StringIO()
        )
