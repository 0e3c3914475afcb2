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

from serving.auth import open_paths
from serving.broker import Broker
from serving.config import ServingConfig
from serving.http_main import DRAIN_TIMEOUT_S
from serving.logs import configure as configure_logs
from serving.metrics import MULTIPROC_ENV, enable_multiprocess
from serving.registry import ModelRegistry
from serving.security import exposure_warnings
from serving.workers import die_with_parent, write_worker_spec

log = logging.getLogger("serving.server")

FAIL_FAST_EXIT_CODE = 137


def write_runtime_files(config: ServingConfig, runtime_dir: str) -> str:
    """Persist the frozen config for the HTTP front and the start-up model's worker spec
    (serving.workers.write_worker_spec); returns the spec's path."""
    with open(os.path.join(runtime_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(dataclasses.asdict(config), fh)
    spec_path = os.path.join(runtime_dir, "worker.json")
    write_worker_spec(config, spec_path)
    return spec_path


class Server:
    """Owns every process of one serving instance and tears them down in order."""

    def __init__(self, config: ServingConfig) -> None:
        self.config = config
        self.runtime_dir = tempfile.mkdtemp(prefix="lmi-")
        os.chmod(self.runtime_dir, 0o700)
        if config.log_format != "text":  # text: keep the CLI's set-up
            configure_logs(config.log_format, logging.getLogger().level, "server")
        if config.metrics:  # before any process imports prometheus_client (serving.metrics)
            enable_multiprocess(self.runtime_dir)
        spec_path = write_runtime_files(config, self.runtime_dir)
        self.registry = ModelRegistry(config, self.runtime_dir, os.environ)
        if config.serves_startup_model:
            self.registry.add_startup(config, spec_path)
        self.broker = Broker(
            config,
            f"ipc://{self.runtime_dir}/front.sock",
            f"ipc://{self.runtime_dir}/back.sock",
            self.registry,
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
        self._log_addresses()
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

    def _log_addresses(self) -> None:
        cfg = self.config
        scheme = "https" if cfg.tls_cert else "http"
        if cfg.serves_startup_model:
            log.info("Serving %r on %s://%s", cfg.model_name, scheme, cfg.inference_address)
        else:
            address = cfg.inference_address
            log.info("Serving a multi-model endpoint (no model yet) on %s://%s", scheme, address)
        if cfg.enable_management_api:
            log.info("Management API on %s://%s", scheme, cfg.management_address)
        for warning in exposure_warnings(cfg):
            log.warning("%s", warning)
        if cfg.api_key:
            log.info("Every route but %s requires the API key", ", ".join(sorted(open_paths(cfg))))
        if cfg.dynamic_models:
            source = "memory_budget_mb" if cfg.memory_budget_mb else "memory available at start-up"
            log.info("Models may reserve %d MB (%s)", self.registry.ledger.budget_mb, source)

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
        if os.environ.get(MULTIPROC_ENV, "").startswith(self.runtime_dir):
            del os.environ[MULTIPROC_ENV]
        log.info("Shut down in %.1f s", time.monotonic() - started)
