"""The HTTP front process: gunicorn serving the Flask app, talking to the broker over zmq.

Started by serving.server as ``python -m serving.http_main RUNTIME_DIR``; it reads the frozen
config the parent wrote there, so the front never parses properties itself.
"""

from __future__ import annotations

import json
import os
import sys

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger as GunicornLogger

from serving.app import create_app
from serving.client import BrokerClient
from serving.config import ServingConfig
from serving.logs import configure as configure_logs
from serving.logs import formatter

DRAIN_TIMEOUT_S = 25


class HttpServer(BaseApplication):
    def __init__(self, config: ServingConfig, front_address: str) -> None:
        self.config_obj = config
        self.front_address = front_address
        super().__init__()

    def load_config(self) -> None:
        cfg = self.config_obj
        binds = [cfg.inference_address]
        if cfg.enable_management_api and cfg.management_address != cfg.inference_address:
            binds.append(cfg.management_address)  # its own listener: 127.0.0.1 unless configured
        settings = {
            "bind": binds,
            "workers": cfg.http_workers,
            # gevent: a queued request or a long stream costs a greenlet, not a thread, so the
            # broker's job_queue_size is the only queue bound and /ping is always served.
            "worker_class": "serving.http_worker.BoundedGeventWorker",  # slow clients: see its docstring
            "worker_connections": cfg.job_queue_size + cfg.max_workers * cfg.batch_size + 256,
            "graceful_timeout": DRAIN_TIMEOUT_S,
            "timeout": 0,
            # Idle keep-alive connections hold a graceful shutdown open until they time out.
            "keepalive": cfg.keepalive_timeout_s,
            "limit_request_line": cfg.limit_request_line,
            "limit_request_fields": cfg.limit_request_fields,
            "limit_request_field_size": cfg.limit_request_field_size,
            "backlog": 2048,
            "loglevel": "warning",
            "proc_name": "lmi-http",
            "logger_class": gunicorn_logger(cfg.log_format),
        }
        if cfg.tls_cert:  # checked at start-up (serving/security.py)
            hook = "serving.http_worker.defer_handshake"
            settings.update(certfile=cfg.tls_cert, keyfile=cfg.tls_key, ssl_context=hook)
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):  # noqa: ANN201 - gunicorn's WSGI callable
        # A generous client-side timeout: the broker enforces predict_timeout itself; this only
        # guards against the broker disappearing.
        client = BrokerClient(self.front_address, reply_timeout_s=2 * self.config_obj.predict_timeout_s + 30)
        return create_app(self.config_obj, client)


def gunicorn_logger(log_format: str) -> type[GunicornLogger]:
    """gunicorn's own lines (worker exits, signals) in the server's log format."""

    class Logger(GunicornLogger):
        def setup(self, cfg) -> None:  # noqa: ANN001 - gunicorn's config object
            super().setup(cfg)
            for handler in self.error_log.handlers + self.access_log.handlers:
                handler.setFormatter(formatter(log_format, "http"))

    return Logger


def read_config(runtime_dir: str) -> ServingConfig:
    with open(os.path.join(runtime_dir, "config.json"), encoding="utf-8") as fh:
        data = json.load(fh)
    if data.get("safe_port_range"):
        data["safe_port_range"] = tuple(data["safe_port_range"])
    return ServingConfig(**data)


def main() -> None:
    runtime_dir = sys.argv[1]
    config = read_config(runtime_dir)
    level = os.environ.get("SERVING_LOG_LEVEL", "info").upper()
    configure_logs(config.log_format, level, "http")
    HttpServer(config, f"ipc://{runtime_dir}/front.sock").run()


if __name__ == "__main__":
    main()
