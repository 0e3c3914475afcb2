"""What the HTTP front records per request: the access log line, request metrics, and ``GET /metrics``.

A ``RequestRecord`` starts with each request and is finished when its response is closed, i.e. after
the last byte of a stream, so the line and the metrics carry the final status, the whole latency, and
the token counts and worker that the model worker reported (a ``msg.USAGE`` frame, never sent to
clients). Prompts and outputs appear only with ``log_requests`` (their first ``BODY_LOG_LIMIT`` bytes).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

from flask import Flask, Response, g, request

from serving.config import ServingConfig
from serving.logs import ACCESS_LOGGER
from serving.metrics import MULTIPROC_ENV, FrontMetrics, exposition

access_log = logging.getLogger(ACCESS_LOGGER)

BODY_LOG_LIMIT = 8192
UNMATCHED_ROUTE = "unmatched"
QUIET_ROUTES = ("/ping", "/metrics")
"""Health checks and scrapes: not counted, and logged only when they fail (they come every few s)."""
METRICS_OFF = (
    "Metrics are disabled on this server. Fix: start it with SERVING_METRICS=true (or metrics=true in "
    "serving.properties), the default."
)


@dataclass
class RequestRecord:
    """One request as the access log and the request metrics see it."""

    started: float
    method: str
    path: str
    keep_bodies: bool = False
    request_id: str = ""
    route: str = UNMATCHED_ROUTE
    dialect: str = ""
    model: str = ""
    status: int = 0
    usage: dict = field(default_factory=dict)
    """From the model worker: ``worker`` and, for generation, ``tokens_in`` / ``tokens_out``."""
    request_body: bytes = b""
    response_body: bytearray = field(default_factory=bytearray)

    def on_usage(self, payload: bytes) -> None:
        self.usage = json.loads(payload)

    def on_output(self, data: bytes) -> None:
        """A part of the body sent to the client (kept only with log_requests, up to the limit)."""
        if self.keep_bodies and len(self.response_body) < BODY_LOG_LIMIT:
            self.response_body += data[: BODY_LOG_LIMIT - len(self.response_body)]

    def fields(self, latency_ms: float) -> dict[str, object]:
        line: dict[str, object] = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "dialect": self.dialect,
            "model": self.model,
            "status": self.status,
            "latency_ms": round(latency_ms, 2),
            "tokens_in": self.usage.get("tokens_in"),
            "tokens_out": self.usage.get("tokens_out"),
            "worker": self.usage.get("worker"),
        }
        if self.keep_bodies:
            line["request_body"] = self.request_body.decode(errors="replace")
            line["response_body"] = bytes(self.response_body).decode(errors="replace")
        return line


def text_line(f: dict[str, object]) -> str:
    """The access line in text form; ``fields`` carry the same values for JSON logs."""
    parts = [f"{f['method']} {f['path']} {f['status']} {f['latency_ms']} ms id={f['request_id']}"]
    parts += [f"{key}={f[key]}" for key in ("dialect", "tokens_in", "tokens_out", "worker") if f[key]]
    if "request_body" in f:
        parts.append(f"request={f['request_body']!r} response={f['response_body']!r}")
    return " ".join(parts)


class RequestObserver:
    """Flask hooks that start a record per request and finish it when the response is closed."""

    def __init__(self, config: ServingConfig) -> None:
        self.config = config
        self.metrics = FrontMetrics() if config.metrics else None

    def start(self) -> None:
        record = RequestRecord(time.perf_counter(), request.method, request.path, self.config.log_requests)
        g.record = record  # first: a body over max_request_size raises below, and its 413 is logged
        if record.keep_bodies and request.method == "POST":
            body = request.get_data(cache=True)  # cached: the route reads the same bytes
            record.request_body = body[:BODY_LOG_LIMIT]

    def end(self, response: Response) -> Response:
        record: RequestRecord | None = g.pop("record", None)
        if record is None:
            return response
        api = g.get("api")  # set by the inference routes only
        record.dialect = api.dialect if api is not None else ""
        record.route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
        record.status = response.status_code
        record.request_id = response.headers.get("x-request-id") or g.get("request_id", "")
        record.model = record.model or self.config.model_name
        if record.keep_bodies and not response.is_streamed:
            record.on_output(response.get_data())
        response.call_on_close(lambda: self.finish(record))
        return response

    def finish(self, record: RequestRecord) -> None:
        seconds = time.perf_counter() - record.started
        quiet = record.route in QUIET_ROUTES
        if self.metrics is not None and not quiet:
            self.metrics.on_request(record.model, record.route, record.dialect, record.status, seconds)
        if self.config.access_log and not (quiet and record.status == 200):
            fields = record.fields(seconds * 1000)
            access_log.info("%s", text_line(fields), extra={"fields": fields})


def install(app: Flask, config: ServingConfig) -> None:
    """The access log, request metrics and ``GET /metrics`` on ``app``."""
    observer = RequestObserver(config)
    app.before_request(observer.start)
    app.after_request(observer.end)
    folder = os.environ.get(MULTIPROC_ENV, "")  # set by the server process before this one started

    @app.get("/metrics")
    def metrics() -> Response:
        """Every process's metrics in Prometheus' text format."""
        if not config.metrics or not os.path.isdir(folder):  # none: a front started outside lmi serve
            body = {"code": 404, "type": "MetricsDisabled", "message": METRICS_OFF, "error": METRICS_OFF}
            return Response(json.dumps(body), status=404, mimetype="application/json")
        data, content_type = exposition(folder)
        return Response(data, status=200, headers={"Content-Type": content_type})
