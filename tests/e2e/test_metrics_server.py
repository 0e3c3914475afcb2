"""/metrics and the structured logs through the real server on a tiny model: metric values move by what
the requests did (across the HTTP, broker and worker processes, and across a worker restart), every log
line is JSON with SERVING_LOG_FORMAT=json, and prompts reach the logs only with SERVING_LOG_REQUESTS."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support import ServerProcess, tiny_model_script

MODEL_ENV = {
    "OPTION_KERNELS": "torch",  # nothing to compile: the test is about the server, not the kernels
    "OPTION_MAX_MODEL_LEN": "256",
    "OPTION_MAX_ROLLING_BATCH_SIZE": "4",
}
SECRET = "zebra quartz"
"""In every prompt: it must reach the logs only when SERVING_LOG_REQUESTS=true."""

Samples = dict[tuple[str, frozenset], float]


def scrape(srv: ServerProcess) -> Samples:
    resp = requests.get(srv.url + "/metrics", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/plain")
    families = text_string_to_metric_families(resp.text)
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels`` (all models)."""
    wanted = set(labels.items())
    return sum(v for (n, series), v in samples.items() if n == name and wanted <= series)


def wait_for(check, timeout_s: float = 10.0):  # noqa: ANN001, ANN201 - a predicate returning a value
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def model_workers(server_pid: int) -> list[int]:
    """Pids of the server's model worker processes (its children running handlers.worker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue  # not a process, or it exited
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == server_pid and b"handlers.worker" in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two servers loading at once: JSON logs; and text logs with bodies and two HTTP workers."""
    model = tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)
    json_logs = ServerProcess(model, {**MODEL_ENV, "SERVING_LOG_FORMAT": "json"})
    bodies = ServerProcess(model, {**MODEL_ENV, "SERVING_LOG_REQUESTS": "true", "SERVING_HTTP_WORKERS": "2"})
    with json_logs, bodies:
        json_logs.wait_ready(timeout_s=120)
        bodies.wait_ready(timeout_s=120)
        yield json_logs, bodies


def lmi(srv: ServerProcess, prompt: str, stream: bool = False) -> int:
    """Generated tokens of one LMI request, as the client counts them."""
    body = {"inputs": f"{SECRET} {prompt}", "parameters": {"max_new_tokens": 5, "details": True}}
    if not stream:
        resp = srv.post(json_body=body)
        assert resp.status_code == 200, resp.text
        return resp.json()["details"]["generated_tokens"]
    with srv.post(json_body={**body, "stream": True}, stream=True) as resp:
        assert resp.status_code == 200, resp.text
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    return sum(1 for line in lines if line.get("token"))


def chat(srv: ServerProcess) -> tuple[int, int]:
    body = {"messages": [{"role": "user", "content": SECRET}], "max_tokens": 3}
    resp = srv.post("/v1/chat/completions", body)
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


def test_metrics_move_by_what_the_requests_did(servers):
    srv, _ = servers
    before = scrape(srv)
    generated = lmi(srv, "one") + lmi(srv, "two", stream=True)
    chat_prompt, chat_generated = chat(srv)
    generated += chat_generated
    bad = srv.post("/v1/chat/completions", {"max_tokens": 3})  # no messages: the worker answers 400
    assert bad.status_code == 400, bad.text

    def moved() -> Samples | None:  # request metrics are written when each response is closed
        after = scrape(srv)
        done = value(after, "lmi_requests_total") - value(before, "lmi_requests_total")
        return after if done >= 4 else None

    after = wait_for(moved)
    assert after is not None, "the request counters did not move"

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    chat_route = {"route": "/v1/chat/completions", "dialect": "openai"}
    assert delta("lmi_requests_total", route="/invocations", dialect="lmi", status="200") == 2
    assert delta("lmi_requests_total", **chat_route, status="200") == 1
    assert delta("lmi_requests_total", **chat_route, status="400") == 1
    assert delta("lmi_requests_total") == 4  # /ping and /metrics are not counted
    assert delta("lmi_generation_tokens_total") == generated
    assert delta("lmi_prompt_tokens_total") > chat_prompt
    assert delta("lmi_time_to_first_token_seconds_count") == 3  # the 400 generated nothing
    assert delta("lmi_inter_token_latency_seconds_count") == 3
    assert delta("lmi_e2e_request_latency_seconds_count", dialect="lmi") == 2
    assert delta("lmi_e2e_request_latency_seconds_count", dialect="openai") == 2
    assert delta("lmi_queue_wait_seconds_count") == 4
    assert delta("lmi_batch_size_sum") >= generated
    assert value(after, "lmi_model_load_seconds") > 0
    assert value(after, "lmi_queue_depth") == 0
    assert value(after, "lmi_worker_restarts_total") == 0


def test_a_killed_worker_counts_one_restart_and_its_gauges_go_with_it(servers):
    srv, _ = servers
    blocks = scrape(srv)
    total = value(blocks, "lmi_kv_cache_blocks_used") + value(blocks, "lmi_kv_cache_blocks_free")
    assert total > 0
    workers = model_workers(srv.proc.pid)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    restarted = wait_for(lambda: value(scrape(srv), "lmi_worker_restarts_total") == 1, timeout_s=10)
    assert restarted, srv.output()
    srv.wait_ready(timeout_s=60)
    assert lmi(srv, "after the restart") > 0

    def sampled() -> Samples | None:  # the new worker samples its engine every 0.5 s
        now = scrape(srv)
        return now if value(now, "lmi_kv_cache_blocks_free") > 0 else None

    now = wait_for(sampled)
    assert now is not None
    # the dead worker's live gauges were dropped: one worker's blocks, not two
    assert value(now, "lmi_kv_cache_blocks_used") + value(now, "lmi_kv_cache_blocks_free") == total
    assert value(now, "lmi_worker_restarts_total") == 1


def test_every_log_line_is_json_and_access_lines_carry_the_request(servers):
    srv, _ = servers
    prompt, generated = chat(srv)
    time.sleep(0.3)  # the access line is written when the response is closed
    srv.stop()
    text = Path(srv.log.name).read_text(errors="replace")
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # each one parses
    assert {"server", "http"} <= {line["role"] for line in lines}
    assert any(line["role"].startswith("w0.") for line in lines)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    access = [line for line in lines if line["logger"] == "serving.access"]
    last = next(line for line in reversed(access) if line["route"] == "/v1/chat/completions")
    assert last["status"] == 200
    assert last["dialect"] == "openai"
    assert last["method"] == "POST"
    assert (last["tokens_in"], last["tokens_out"]) == (prompt, generated)
    assert last["worker"] == "w0.2"  # the restarted worker
    assert last["latency_ms"] > 0
    assert len(last["request_id"]) >= 16
    assert SECRET not in text  # prompts and outputs are not logged by default


def test_bodies_are_logged_when_asked_and_metrics_add_up_over_http_workers(servers):
    _, srv = servers
    for i in range(4):
        lmi(srv, f"request {i}")
    assert wait_for(lambda: value(scrape(srv), "lmi_requests_total") == 4)
    counts = {value(scrape(srv), "lmi_requests_total") for _ in range(6)}  # either HTTP worker answers
    assert counts == {4}
    srv.stop()
    text = Path(srv.log.name).read_text(errors="replace")
    access = [line for line in text.splitlines() if "serving.access: POST /invocations 200" in line]
    assert len(access) == 4
    assert all(SECRET in line and "generated_text" in line for line in access)
