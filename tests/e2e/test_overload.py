"""Overload through the real server: more clients than slots and than the queue holds.

Every request must end with a 200 or an immediate refusal in its dialect (503 LMI, 429 OpenAI/TGI),
nothing may hang, and the broker (a thread of the server's main process) must stay nearly idle:
under overload it once scanned the whole wait queue per worker message and took a core from the
model.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import json
import os
import time

import pytest
import requests
from support import ROOT, ServerProcess

SLOTS, QUEUE, CLIENTS, TOKENS = 4, 8, 64, 32


def _tiny_llama(dest):
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "scripts" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny_model("llama", dest, seed=0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = _tiny_llama(tmp_path_factory.mktemp("llama"))
    env = {
        "OPTION_MAX_ROLLING_BATCH_SIZE": str(SLOTS),
        "OPTION_MAX_MODEL_LEN": "128",
        "SERVING_JOB_QUEUE_SIZE": str(QUEUE),
    }
    with ServerProcess(path, env) as srv:
        srv.wait_ready(timeout_s=180)
        yield srv


def one_request(srv: ServerProcess, index: int) -> tuple[str, bool, int, float, str]:
    """Alternate the three dialects; stream half of them. Returns (api, stream, status, seconds, body)."""
    api = ("lmi", "openai", "tgi")[index % 3]
    stream = index % 2 == 0
    if api == "lmi":
        path = "/invocations"
        body = {"inputs": f"request {index}", "parameters": {"max_new_tokens": TOKENS, "ignore_eos": True}}
        body["stream"] = stream
    elif api == "openai":
        path = "/v1/completions"
        body = {"prompt": f"request {index}", "max_tokens": TOKENS, "ignore_eos": True, "stream": stream}
    else:
        path = "/generate_stream" if stream else "/generate"
        body = {"inputs": f"request {index}", "parameters": {"max_new_tokens": TOKENS}}
    started = time.monotonic()
    with srv.post(path, json_body=body, stream=True, timeout=120) as resp:
        text = resp.content.decode()
    elapsed = time.monotonic() - started
    return api, stream, resp.status_code, elapsed, text


def test_overload_refuses_at_once_serves_the_rest_and_keeps_the_broker_idle(server):
    pid = server.proc.pid
    cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
    with cf.ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda i: one_request(server, i), range(CLIENTS)))
    wall = time.monotonic() - wall_before
    broker_share = (cpu_seconds(pid) - cpu_before) / wall

    refused = {"lmi": 503, "openai": 429, "tgi": 429}
    served = [r for r in results if r[2] == 200]
    rejected = [r for r in results if r[2] != 200]
    assert rejected, "the load must overflow the queue for this test to mean anything"
    for api, _, status, elapsed, text in rejected:
        assert status == refused[api], (api, status, text)
        assert elapsed < 5.0, f"a refusal must come at once, took {elapsed:.1f} s"  # bounded, not a benchmark
        assert "job_queue_size" in text  # the body says what was full and how to fix it
    # Everything that fit the slots and the queue was served, and completely.
    assert len(served) >= SLOTS + QUEUE, [r[2] for r in results]
    for api, stream, _, _, text in served:  # every served stream ended with its final event
        if not stream:
            assert isinstance(json.loads(text), dict), text[:200]
        elif api == "openai":
            assert text.rstrip().endswith("data: [DONE]"), text[-200:]
        elif api == "tgi":
            last = json.loads(text.strip().split("\n\n")[-1].removeprefix("data:"))
            assert isinstance(last["generated_text"], str), text[-200:]
        else:
            assert isinstance(json.loads(text.strip().splitlines()[-1])["generated_text"], str), text[-200:]
    # The server's main process (broker thread + supervisor) stayed nearly idle under the load.
    assert broker_share < 0.35, f"main process used {broker_share:.2f} of a core"
    assert server.ping().status_code == 200


def test_after_overload_the_server_serves_normally(server):
    resp = requests.post(
        server.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 4}, timeout=60
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 4
