"""Process orchestration: broker thread + model workers + the gunicorn HTTP front, and shutdown."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from serving.broker import Broker
from serving.config import ServingConfig
from serving.http_main import DRAIN_TIMEOUT_S
from serving.workers import die_with_parent

log = logging.getLogger("serving.server")

FAIL_FAST_EXIT_CODE = 137


def write_runtime_files(config: ServingConfig, runtime_dir: str) -> str:
    """Persist the frozen config for the child processes; returns the worker spec path.

    The worker spec carries the handler's init properties (strings, as DJL gives them) and, under
    "options", every declared key's typed value (serving/options.py), so the worker need not parse them."""
    with open(os.path.join(runtime_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(dataclasses.asdict(config), fh)
    spec_path = os.path.join(runtime_dir, "worker.json")
    spec = {
        "model_dir": config.model_dir,
        "model_name": config.model_name,
        "properties": config.handler_properties(),
        "options": config.settings,
        "log_level": logging.getLevelName(logging.getLogger().level),
    }
    with open(spec_path, "w", encoding="utf-8") as fh:
        json.dump(spec, fh)
    return spec_path


class Server:
    """Owns every process of one serving instance and tears them down in order."""

    def __init__(self, config: ServingConfig) -> None:
        self.config = config
        self.runtime_dir = tempfile.mkdtemp(prefix="lmi-")
        os.chmod(self.runtime_dir, 0o700)
        spec_path = write_runtime_files(config, self.runtime_dir)
        self.broker = Broker(
            config, f"ipc://{self.runtime_dir}/front.sock", f"ipc://{self.runtime_dir}/back.sock", spec_path
        )
        self.http: subprocess.Popen | None = None
        self._stopping = threading.Event()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            return self._supervise()
        finally:
            self.shutdown()

    def _supervise(self) -> int:
        self.broker.start()
        self.http = subprocess.Popen(
            [sys.executable, "-m", "serving.http_main", self.runtime_dir],
            preexec_fn=functools.partial(die_with_parent, signal.SIGTERM),
        )
        log.info("Serving %r on http://%s:%d", self.config.model_name, self.config.host, self.config.port)
        code = 0
        while not self._stopping.is_set():
            if self.http.poll() is not None:
                log.error("HTTP front exited with code %s", self.http.returncode)
                code = 1
                break
            if self.config.fail_fast and self.broker.failed_reason is not None:
                log.error("fail_fast is set and the model failed; exiting")
                code = FAIL_FAST_EXIT_CODE
                break
            self._stopping.wait(0.2)
        return code

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("Received signal %d: draining in-flight requests (up to %d s)", signum, DRAIN_TIMEOUT_S)
        self._stopping.set()
        self.broker.draining = True  # requests still arriving on open connections get 503

    def shutdown(self) -> None:
        """Stop accepting, let gunicorn finish in-flight requests, then stop the model workers."""
        if self.http is not None and self.http.poll() is None:
            self.http.send_signal(signal.SIGTERM)
            try:
                self.http.wait(timeout=DRAIN_TIMEOUT_S + 5)
            except subprocess.TimeoutExpired:
                self.http.kill()
        started = time.monotonic()
        self.broker.stop(worker_timeout_s=5)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        log.info("Shut down in %.1f s", time.monotonic() - started)
