"""Start the real server as a subprocess on a free port, with bounded waits, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``lmi serve`` in a subprocess; its log goes to a file shown when a test fails."""

    def __init__(self, model_dir: str | Path | None, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="lmi-test-", suffix=".log", delete=False)  # noqa: SIM115
        cmd = [sys.executable, "-m", "serving", "serve", "--port", str(self.port)]
        if model_dir is not None:
            cmd += ["--model-dir", str(model_dir)]
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "SERVING_", "HF_MODEL"))
        }
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    def ping(self) -> requests.Response:
        resp = requests.get(self.url + "/ping", timeout=5)
        resp.content  # noqa: B018 - read the body so the connection is released and closed
        return resp

    def wait_ready(self, timeout_s: float = 120, expect: int = 200) -> requests.Response:
        deadline = time.monotonic() + timeout_s
        last: requests.Response | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                last = self.ping()
                if last.status_code == expect:
                    return last
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise TimeoutError(
            f"server not ready ({last and last.status_code}) in {timeout_s}s:\n{self.output()}"
        )

    def post(self, path: str = "/invocations", json_body: object = None, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        return requests.post(self.url + path, json=json_body, **kwargs)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-6000:]

    def stop(self, timeout_s: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        os.unlink(self.log.name)
