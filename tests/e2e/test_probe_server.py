"""The real server (gunicorn + broker + worker processes) driven through a probing handler."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
from support import FIXTURES, ServerProcess

PROBE = FIXTURES / "probe"


@pytest.fixture(scope="module")
def server():
    env = {
        "SERVING_BATCH_SIZE": "8",
        "SERVING_MAX_BATCH_DELAY": "1000",
        "OPTION_PREDICT_TIMEOUT": "2",
        "OPTION_PROBE_KEY": "from-env",
        "SERVING_MAX_REQUEST_SIZE": "1024",
    }
    with ServerProcess(PROBE, env) as srv:
        srv.wait_ready()
        yield srv


def test_invocations_roundtrip_with_properties_and_headers(server):
    resp = server.post(json_body={"echo": "hi", "header": "X-Custom"}, headers={"X-Custom": "abc"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["echo"] == "hi"
    assert body["init_key"] == "from-file"  # serving.properties wins over OPTION_PROBE_KEY
    assert body["header"] == "abc"
    assert resp.headers["X-Probe"] == "1"
    assert resp.headers["x-request-id"]


def test_custom_attributes_become_properties(server):
    headers = {"X-Amzn-SageMaker-Custom-Attributes": "tenant=blue;trace=1"}
    resp = server.post(json_body={"header": "tenant"}, headers=headers)
    assert resp.json()["header"] == "blue"


def test_predictions_route_and_unknown_model(server):
    assert server.post("/predictions/probe", {"echo": 1}).json()["echo"] == 1
    resp = server.post("/predictions/nope", {"echo": 1})
    assert resp.status_code == 404
    assert "nope" in resp.json()["message"]


def test_dynamic_batching_groups_concurrent_requests(server):
    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: server.post(json_body={"sleep": 0.3, "echo": i}), range(12)))
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert [r.json()["echo"] for r in results] == list(range(12))  # each answer to its own request
    assert max(r.json()["batch_size"] for r in results) > 1


def test_lone_request_is_not_held_for_the_batch_delay(server):
    time.sleep(1.2)  # let any earlier wave of load end
    started = time.monotonic()
    resp = server.post(json_body={"echo": "solo"})
    assert resp.json()["batch_size"] == 1
    assert time.monotonic() - started < 0.5  # max_batch_delay is 1 s in this fixture


def test_handler_exception_gives_424_and_next_request_succeeds(server):
    resp = server.post(json_body={"raise": "boom"})
    assert resp.status_code == 424
    assert resp.json() == {"code": 424, "message": "invoke handler failure", "error": "boom"}
    assert server.post(json_body={"echo": "after"}).json()["echo"] == "after"


def test_out_of_memory_gives_507(server):
    resp = server.post(json_body={"oom": True})
    assert resp.status_code == 507
    assert "out of memory" in resp.json()["error"]


def test_none_gives_204(server):
    assert server.post(json_body={"none": True}).status_code == 204


def test_batch_output_size_mismatch_gives_400(server):
    with cf.ThreadPoolExecutor(4) as pool:
        first = pool.submit(server.post, json_body={"sleep": 0.5})
        time.sleep(0.1)
        rest = list(pool.map(lambda _: server.post(json_body={"mismatch": True}), range(3)))
    assert first.result().status_code == 200
    assert all(r.status_code == 400 for r in rest)
    assert "Batch output size mismatch, expected: 3, actual: 2" in rest[0].json()["error"]


def test_bad_requests_get_json_errors(server):
    too_big = server.post(data=b"x" * 4096, headers={"Content-Type": "application/octet-stream"})
    assert too_big.status_code == 413
    assert "max_request_size" in too_big.json()["message"]
    malformed = server.post(data=b"{nope", headers={"Content-Type": "application/json"})
    assert malformed.status_code == 400
    assert "Malformed JSON" in malformed.json()["message"]
    missing = requests.get(server.url + "/does/not/exist", timeout=5)
    assert missing.status_code == 404
    assert missing.json()["code"] == 404
    wrong_method = requests.get(server.url + "/invocations", timeout=5)
    assert wrong_method.status_code == 405


def test_predict_timeout_gives_504_and_worker_keeps_serving(server):
    resp = server.post(json_body={"sleep": 3})
    assert resp.status_code == 504
    assert "predict_timeout" in resp.json()["message"]
    assert server.post(json_body={"echo": "later"}).json()["echo"] == "later"


def test_broker_timeouts_answer_in_the_dialect_of_the_route(server):
    """A 504 from the broker, seen by an OpenAI and a TGI client: each gets its own error shape."""
    openai_style = server.post("/v1/completions", json_body={"sleep": 3})
    assert openai_style.status_code == 504
    error = openai_style.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == 504
    assert "predict_timeout" in error["message"]
    tgi_style = server.post("/generate", json_body={"sleep": 3})
    assert tgi_style.status_code == 504
    assert set(tgi_style.json()) == {"error", "error_type"}
    assert "predict_timeout" in tgi_style.json()["error"]
    lmi_style = server.post(json_body={"sleep": 3})
    assert set(lmi_style.json()) == {"code", "type", "message", "error"}


def test_stream_content_is_relayed_in_chunks(server):
    with server.post(json_body={"stream": 3, "gap": 0.05}, stream=True) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert resp.status_code == 200
    assert lines == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']


def test_stream_error_after_first_chunk_is_reported_in_band(server):
    with server.post(json_body={"stream": 1, "stream_fail": True}, stream=True) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[0] == b'{"n": 0}'
    assert b"stream broke on purpose" in lines[-1]


def test_ping_healthy_and_fast_while_busy(server):
    # More requests in flight than a thread-per-request front would have threads for.
    with cf.ThreadPoolExecutor(150) as pool:
        busy = [pool.submit(server.post, json_body={"sleep": 0.3}) for _ in range(150)]
        time.sleep(1.0)
        started = time.monotonic()
        ping = server.ping()
        elapsed = time.monotonic() - started
        codes = {f.result().status_code for f in busy}
    assert codes <= {200, 504}  # queued past predict_timeout=2 s → 504, never a hang
    assert ping.status_code == 200
    assert ping.json() == {"probe": {"status": "Healthy"}}
    assert elapsed < 2.0


def test_killed_worker_fails_request_with_5xx_then_recovers(server):
    crash = server.post(json_body={"crash": True})
    assert 500 <= crash.status_code < 600
    assert "died" in crash.json()["message"]
    resp = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        resp = server.post(json_body={"echo": "back"})
        if resp.status_code == 200:
            break
        time.sleep(0.3)
    assert resp is not None
    assert resp.json()["echo"] == "back"


def test_sigkill_of_worker_mid_request(server):
    pid = server.post(json_body={"echo": 0}).json()["pid"]
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.post, json_body={"sleep": 1.5})
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        resp = pending.result()
    assert 500 <= resp.status_code < 600
    server.wait_ready(timeout_s=60)
    assert server.post(json_body={"echo": "ok"}).json()["pid"] != pid


def test_queue_full_gives_503():
    env = {"SERVING_JOB_QUEUE_SIZE": "2", "SERVING_BATCH_SIZE": "1"}
    with ServerProcess(PROBE, env) as srv:
        srv.wait_ready()
        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: srv.post(json_body={"sleep": 0.8}), range(8)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) >= 3  # one in the worker + two queued
    refused = [r for r in results if r.status_code == 503]
    assert refused, codes
    assert "job_queue_size" in refused[0].json()["message"]


@pytest.mark.parametrize(("path", "status"), [("/v1/chat/completions", 429), ("/generate", 429)])
def test_queue_full_is_429_for_openai_and_tgi_clients(path, status):
    """Both ecosystems' clients retry a 429 with back-off; a 503 would not be retried by them."""
    env = {"SERVING_JOB_QUEUE_SIZE": "2", "SERVING_BATCH_SIZE": "1"}
    with ServerProcess(PROBE, env) as srv:
        srv.wait_ready()
        body = {"sleep": 0.8, "messages": [{"role": "user", "content": "x"}]}
        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: srv.post(path, json_body=body), range(8)))
    refused = [r for r in results if r.status_code != 200]
    codes = [r.status_code for r in results]
    assert refused, codes
    assert all(r.status_code == status for r in refused), codes
    body = refused[0].json()
    message = body["error"]["message"] if path.startswith("/v1") else body["error"]
    assert "job_queue_size" in message
    if path == "/generate":
        assert body["error_type"] == "overloaded"


def test_ping_pending_while_loading_then_healthy():
    with ServerProcess(PROBE, {"OPTION_INIT_SLEEP": "3"}) as srv:
        pending = srv.wait_ready(expect=503, timeout_s=30)
        assert pending.json() == {"probe": {"status": "PENDING"}}
        assert srv.wait_ready(timeout_s=60).status_code == 200


def test_ping_failed_when_model_cannot_load():
    with ServerProcess(PROBE, {"OPTION_INIT_FAIL": "1"}) as srv:
        failed = srv.wait_ready(expect=500, timeout_s=60)
        assert failed.json()["probe"]["status"] == "FAILED"
        assert "init failed on purpose" in failed.json()["probe"]["reason"]  # /ping says why
        resp = srv.post(json_body={"echo": 1})
        assert resp.status_code == 503
        assert "init failed on purpose" in resp.json()["message"]


def test_workers_replicas_share_load():
    with ServerProcess(PROBE, {"SAGEMAKER_NUM_MODEL_WORKERS": "2", "SERVING_BATCH_SIZE": "1"}) as srv:
        srv.wait_ready()
        with cf.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: srv.post(json_body={"sleep": 0.4}), range(4)))
    assert len({r.json()["pid"] for r in results}) == 2


def test_retry_threshold_exceeded_marks_model_failed():
    with ServerProcess(PROBE, {"SERVING_RETRY_THRESHOLD": "0"}) as srv:
        srv.wait_ready()
        srv.post(json_body={"crash": True})
        assert srv.wait_ready(expect=500, timeout_s=30).json()["probe"]["status"] == "FAILED"


def test_sigterm_drains_in_flight_request():
    srv = ServerProcess(PROBE)
    try:
        srv.wait_ready()
        result: dict = {}
        thread = threading.Thread(
            target=lambda: result.update(r=srv.post(json_body={"sleep": 2, "echo": "d"}))
        )
        thread.start()
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGTERM)
        thread.join(timeout=40)
        assert result["r"].status_code == 200
        assert result["r"].json()["echo"] == "d"
        assert srv.proc.wait(timeout=40) == 0
    finally:
        srv.stop()


def test_sagemaker_serve_entry_reads_sm_model_dir_and_port():
    from support import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "SERVING_", "HF_MODEL"))}
    env.update({"SM_MODEL_DIR": str(PROBE), "SAGEMAKER_BIND_TO_PORT": str(port)})
    code = "from serving.cli import sagemaker_serve; sagemaker_serve()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline, status = time.monotonic() + 60, None
        while status != 200 and time.monotonic() < deadline:
            try:
                status = requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        assert status == 200
        resp = requests.post(f"http://127.0.0.1:{port}/invocations", json={"echo": "sm"}, timeout=30)
        assert resp.json()["echo"] == "sm"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=40) == 0
        finally:
            proc.kill()


def test_model_loading_timeout_marks_model_failed():
    with ServerProcess(PROBE, {"OPTION_INIT_SLEEP": "30", "OPTION_MODEL_LOADING_TIMEOUT": "1"}) as srv:
        assert srv.wait_ready(expect=500, timeout_s=30).json()["probe"]["status"] == "FAILED"
        assert "model_loading_timeout" in srv.post(json_body={"echo": 1}).json()["message"]


def test_hung_worker_is_restarted_after_its_timeout():
    with ServerProcess(PROBE, {"OPTION_PREDICT_TIMEOUT": "1"}) as srv:
        srv.wait_ready()
        pid = srv.post(json_body={"echo": 0}).json()["pid"]
        assert srv.post(json_body={"sleep": 60}).status_code == 504
        deadline = time.monotonic() + 40
        resp = srv.post(json_body={"echo": 1})
        while resp.status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
            resp = srv.post(json_body={"echo": 1})
        assert resp.status_code == 200
        assert resp.json()["pid"] != pid  # the stuck worker was replaced
