"""A short soak through the real server (scripts/soak.py): every dialect, plain and streaming, at 8 x slots
clients, with client disconnects, a SIGKILL of the model worker and a SIGTERM under load. Every request
sent must be accounted for: complete, refused with a JSON body, or failed in its dialect at the kill or
the shutdown; none lost, none hung."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
import uuid

import pytest
import zmq
from support import ROOT, tiny_model_script

from serving import broker as broker_module
from serving import messages as msg
from serving.config import load_config
from serving.http_main import DRAIN_TIMEOUT_S
from serving.server import Server

SLOTS, DURATION_S, KILL_AT_S = 2, 24.0, 5.0


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


soak = _soak_module()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)
    cfg = soak.SoakConfig(
        model_dir=str(path), slots=SLOTS, duration_s=DURATION_S, kill_at_s=KILL_AT_S, timeout_s=60,
        max_tokens=24, disconnect_fraction=0.2,
    )  # fmt: skip
    return soak.run_soak(cfg)


def test_every_request_is_accounted_for_and_none_is_lost_or_hung(report):
    assert report["passed"], report["offenders"][:10] + report["problems"]
    assert report["lost"] == 0
    assert report["hung"] == 0
    assert report["clients"] == 8 * SLOTS
    assert sum(report["outcomes"].values()) == report["requests"]
    assert sum(sum(counts.values()) for counts in report["by_route"].values()) == report["requests"]
    for route, counts in report["by_route"].items():  # every dialect and mode was served
        assert counts.get("ok", 0) > 0, (route, counts)
    assert report["outcomes"].get("disconnected", 0) > 0
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]


def test_the_worker_was_killed_and_requests_were_served_after_its_restart(report):
    kill = report["worker_kill"]
    assert kill["at_s"] == pytest.approx(KILL_AT_S, abs=2.0)
    assert kill["back_after_s"] is not None
    assert kill["ok_sent_after_kill"] > 0


def test_the_server_exits_within_30_s_of_sigterm_under_load(report):
    assert report["sigterm_exit_s"] is not None
    assert report["sigterm_exit_s"] <= 30
    assert report["duration_s"] == pytest.approx(DURATION_S, abs=1.0)


def _request(kind: str, start: float, end: float, route: str = "lmi-stream"):
    route = next(r for r in soak.ROUTES if r.name == route)
    return soak.Request(0, route, None, {}, start=start, end=end, kind=kind, detail="why")


def test_errors_are_accepted_only_at_the_worker_kill_or_the_shutdown():
    tl = soak.Timeline(start=0.0, kill=10.0, restarted=15.0, term=30.0)
    assert soak.offence(_request("ok", 1, 2), tl) is None
    assert soak.offence(_request("refused", 1, 2), tl) is None
    assert soak.offence(_request("error_event", 9, 11), tl) is None  # in flight at the kill
    assert soak.offence(_request("failed", 29, 31), tl) is None  # in flight at SIGTERM
    assert soak.offence(_request("closed", 30.5, 30.6), tl) is None  # sent after SIGTERM
    assert "error_event" in soak.offence(_request("error_event", 16, 17), tl)
    assert "closed" in soak.offence(_request("closed", 20, 20.1), tl)
    for kind in ("no_final_event", "hung", "no_body", "bad_stream"):
        assert kind in soak.offence(_request(kind, 29, 31), tl)


def test_answers_without_their_body_are_offenders():
    lmi, tgi = (next(r for r in soak.ROUTES if r.name == name) for name in ("lmi", "tgi"))
    assert soak.judge_body(lmi, 200, b'{"generated_text": "x"}') == ("ok", "")
    assert soak.judge_body(lmi, 200, b"")[0] == "no_body"
    assert soak.judge_body(lmi, 200, b'{"text": "x"}')[0] == "no_body"
    assert soak.judge_body(lmi, 503, b'{"code": 503, "error": "shutting down"}')[0] == "refused"
    assert soak.judge_body(lmi, 500, b'{"code": 500, "error": "worker died"}')[0] == "failed"
    assert soak.judge_body(tgi, 424, b'{"error": "x", "error_type": "generation"}')[0] == "failed"
    assert soak.judge_body(tgi, 500, b"Internal Server Error")[0] == "no_body"


# ---- found by the soak: requests still held when the drain ended got no answer ---------------------

SLOW_MODEL = """
import time


def handle(inputs):
    if inputs.is_empty():
        return None
    time.sleep(60)  # far past the drain: the broker must answer for it
"""


def _front(server: Server) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.broker.front_address)
    return sock


def _wait_healthy(sock: zmq.Socket, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.send_multipart([msg.STATUS, b"status"])
        if sock.poll(2000):
            _, _, payload = sock.recv_multipart()
            if all(m["status"] == "Healthy" for m in json.loads(payload)["models"].values()):
                return
        time.sleep(0.2)
    raise TimeoutError("the model worker did not load")


def test_requests_still_held_at_the_end_of_the_drain_get_a_503_before_the_front_closes(tmp_path, monkeypatch):
    """Queued and in-flight requests used to wait on the model past gunicorn's graceful timeout, which then
    closed their connections with no answer at all (the soak's SIGTERM while a worker restarted)."""
    assert broker_module.SHUTDOWN_ANSWER_S <= DRAIN_TIMEOUT_S - 3  # answers must reach the clients in time
    monkeypatch.setattr(broker_module, "SHUTDOWN_ANSWER_S", 0.5)
    model_dir = tmp_path / "slow"
    model_dir.mkdir()
    (model_dir / "model.py").write_text(SLOW_MODEL)
    server = Server(load_config(str(model_dir), {}))
    server.broker.start()
    try:
        sock = _front(server)
        _wait_healthy(sock)
        ids = [uuid.uuid4().hex for _ in range(2)]  # the first runs on the worker, the second waits
        for request_id in ids:
            request = msg.InferRequest(request_id, {}, [("data", b"{}")])
            sock.send_multipart([msg.REQ, msg.dumps(request)])
        time.sleep(0.3)
        server.broker.draining = True
        answers = {}
        deadline = time.monotonic() + 5
        while len(answers) < 2 and sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            kind, request_id, payload = sock.recv_multipart()
            answers[request_id.decode()] = (kind, json.loads(payload))
        assert set(answers) == set(ids)
        for kind, error in answers.values():
            assert kind == msg.ERR
            assert error["code"] == 503
            assert error["type"] == "WlmShutdownException"
            assert "shut down" in error["message"]
    finally:
        server.broker.stop(worker_timeout_s=2)
        shutil.rmtree(server.runtime_dir, ignore_errors=True)
