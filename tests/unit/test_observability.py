"""Metric and log helpers: JSON log lines, the access record, the worker's usage frame, and the
worker's metrics read back through prometheus_client's multiprocess files (in a subprocess, since the
multiprocess mode is chosen when prometheus_client is first imported)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from flask.testing import FlaskClient

from handlers.replies import Reply, StreamChunk, StreamEnd, Usage
from handlers.worker import usage_frames
from serving import messages as msg
from serving.access import BODY_LOG_LIMIT, RequestRecord, text_line
from serving.app import create_app
from serving.config import ServingConfig, load_config
from serving.logs import JsonFormatter, configure

ROOT = Path(__file__).resolve().parents[2]


def _record(message: str, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("serving.test", logging.WARNING, __file__, 1, message, (), exc_info)


def test_json_formatter_writes_one_object_with_the_fields_and_the_traceback():
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("it failed", exc_info=sys.exc_info())
    record.fields = {"request_id": "r1", "status": 500}
    line = JsonFormatter("w0.1").format(record)
    assert "\n" not in line  # the traceback is inside the one line
    data = json.loads(line)
    assert data["level"] == "WARNING"
    assert data["logger"] == "serving.test"
    assert data["role"] == "w0.1"
    assert data["message"] == "it failed"
    assert data["request_id"] == "r1"
    assert data["status"] == 500
    assert "ValueError: boom" in data["exception"]
    assert data["time"].endswith("+00:00")


def test_configure_json_routes_libraries_with_their_own_handlers_to_the_root(capsys):
    library = logging.getLogger("some_library_with_a_handler")
    library.addHandler(logging.StreamHandler())
    library.propagate = False
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    others = {
        logger: (list(logger.handlers), logger.propagate)
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger) and logger.handlers
    }
    hooks = sys.excepthook, threading.excepthook
    try:
        configure("json", "info", "server")
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        assert root.level == logging.INFO
        assert library.handlers == []
        assert library.propagate
        try:
            raise KeyError("lost")
        except KeyError:
            sys.excepthook(*sys.exc_info())  # what the interpreter calls for an uncaught exception
        crash = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert crash["level"] == "CRITICAL"
        assert "KeyError: 'lost'" in crash["exception"]
    finally:
        sys.excepthook, threading.excepthook = hooks
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)
        for logger, (handlers, propagate) in others.items():  # other tests' loggers as they were
            logger.handlers, logger.propagate = handlers, propagate


def test_the_log_options_are_declared_with_their_defaults(tmp_path: Path):
    config = load_config(str(tmp_path), environ={})
    assert (config.log_format, config.access_log, config.log_requests, config.metrics) == (
        "text",
        True,
        False,
        True,
    )
    env = {"SERVING_LOG_FORMAT": "json", "SERVING_ACCESS_LOG": "false", "SERVING_LOG_REQUESTS": "true",
           "SERVING_METRICS": "false"}  # fmt: skip
    config = load_config(str(tmp_path), environ=env)
    assert (config.log_format, config.access_log, config.log_requests, config.metrics) == (
        "json",
        False,
        True,
        False,
    )


def test_access_fields_leave_out_bodies_unless_asked():
    record = RequestRecord(0.0, "POST", "/invocations", request_id="r1", route="/invocations")
    record.dialect, record.status = "lmi", 200
    record.on_usage(json.dumps({"worker": "w0.1", "tokens_in": 7, "tokens_out": 3}).encode())
    record.on_output(b"secret output")
    fields = record.fields(12.345)
    assert fields["tokens_in"] == 7
    assert fields["tokens_out"] == 3
    assert fields["worker"] == "w0.1"
    assert fields["latency_ms"] == 12.35
    assert "request_body" not in fields
    assert "response_body" not in fields
    line = text_line(fields)
    assert line.startswith("POST /invocations 200 12.35 ms id=r1")
    assert "tokens_in=7 tokens_out=3 worker=w0.1" in line
    assert "secret" not in line


def test_access_fields_carry_bodies_up_to_the_limit_when_asked():
    record = RequestRecord(0.0, "POST", "/invocations", keep_bodies=True, request_body=b"my prompt")
    record.on_output(b"x" * BODY_LOG_LIMIT)
    record.on_output(b"more")
    fields = record.fields(1.0)
    assert fields["request_body"] == "my prompt"
    assert fields["response_body"] == "x" * BODY_LOG_LIMIT
    assert "my prompt" in text_line(fields)


def test_usage_frame_precedes_only_the_last_reply_and_names_the_worker():
    frames = usage_frames(Reply("r1", usage=Usage(prompt_tokens=5, generated_tokens=2)), "w1.3")
    assert frames is not None
    assert frames[:2] == [msg.USAGE, b"r1"]
    assert json.loads(frames[2]) == {"worker": "w1.3", "tokens_in": 5, "tokens_out": 2}
    frames = usage_frames(StreamEnd("r2"), "w0.1")  # a custom handler's stream: no token counts
    assert frames is not None
    assert json.loads(frames[2]) == {"worker": "w0.1"}
    assert usage_frames(StreamChunk("r2", b"data"), "w0.1") is None


def test_metrics_route_answers_404_with_the_fix_when_metrics_are_off():
    app = create_app(ServingConfig(model_dir=None, metrics=False), client=None)  # type: ignore[arg-type]
    client: FlaskClient = app.test_client()
    resp = client.get("/metrics")
    assert resp.status_code == 404
    assert "SERVING_METRICS=true" in resp.get_json()["message"]


WORKER_SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from engines.base import EngineStats
    from handlers.metrics import GenerationMetrics
    from handlers.replies import Usage
    from serving.metrics import exposition, mark_process_dead
    from prometheus_client.parser import text_string_to_metric_families

    def values():
        text = exposition(os.environ["PROMETHEUS_MULTIPROC_DIR"])[0].decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.labels.get("model") == "m" and "le" not in s.labels}

    if sys.argv[1:] == ["child"]:  # a second worker of the same model
        GenerationMetrics("m").sample(EngineStats(running=1, cache_blocks_total=10, cache_blocks_free=4),
                                      0, 1.0)
        sys.exit(0)
    metrics = GenerationMetrics("m")
    metrics.on_step(3)
    metrics.on_step(0)  # a step that produced no token is not a batch
    metrics.on_finished(Usage(prompt_tokens=7, generated_tokens=5, arrived=10.0, first_token_at=10.5), 12.5)
    metrics.on_finished(Usage(prompt_tokens=2, generated_tokens=0, arrived=10.0), 11.0)
    stats = EngineStats(running=2, waiting=1, cache_blocks_total=10, cache_blocks_free=7, preemptions=1,
                        prefix_queried_tokens=40, prefix_hit_tokens=16)
    metrics.sample(stats, queued=3, now=1.0)
    assert not metrics.due(1.2) and metrics.due(1.5)
    stats = EngineStats(running=1, cache_blocks_total=10, cache_blocks_free=9, preemptions=3,
                        prefix_queried_tokens=50, prefix_hit_tokens=16)
    metrics.sample(stats, queued=0, now=2.0)
    child = subprocess.Popen([sys.executable, __file__, "child"])
    assert child.wait() == 0
    both = values()
    mark_process_dead(child.pid)
    print(json.dumps({"both": both, "after": values()}))
    """
)


def test_worker_metrics_add_up_across_processes_and_drop_a_dead_worker(tmp_path: Path):
    script = tmp_path / "worker_metrics.py"
    script.write_text(WORKER_SCRIPT)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"), "PYTHONPATH": str(ROOT)}
    os.makedirs(tmp_path / "metrics")
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    values, after = result["both"], result["after"]
    assert values["lmi_prompt_tokens_total"] == 9
    assert values["lmi_generation_tokens_total"] == 5
    assert values["lmi_time_to_first_token_seconds_count"] == 1  # the request with no token has none
    assert values["lmi_time_to_first_token_seconds_sum"] == 0.5
    assert values["lmi_inter_token_latency_seconds_sum"] == 0.5  # (12.5 - 10.5) / 4 gaps
    assert values["lmi_batch_size_count"] == 1
    assert values["lmi_batch_size_sum"] == 3
    assert values["lmi_preemptions_total"] == 3  # totals grew 0 → 1 → 3
    assert values["lmi_prefix_cache_queried_tokens_total"] == 50
    assert values["lmi_prefix_cache_hit_tokens_total"] == 16
    assert values["lmi_num_requests_running"] == 2  # this worker's 1 + the child's 1 (livesum)
    assert values["lmi_kv_cache_blocks_used"] == 1 + 6
    assert values["lmi_kv_cache_blocks_free"] == 9 + 4
    assert values["lmi_num_requests_waiting"] == 0
    # the child worker died: its live gauges go, its counters would stay
    assert after["lmi_kv_cache_blocks_free"] == 9
    assert after["lmi_num_requests_running"] == 1
    assert after["lmi_preemptions_total"] == 3
