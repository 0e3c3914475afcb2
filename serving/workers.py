"""Model worker processes: spawn, watch and stop them. The model never runs in the HTTP process."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.config import ServingConfig

log = logging.getLogger("serving.workers")

SECRET_ENV = frozenset({"SERVING_API_KEY"})
"""Variables the model worker processes (and any user model.py) do not inherit."""

STARTING, READY, BUSY, DEAD = "starting", "ready", "busy", "dead"
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Run in the child before exec: the kernel kills it if the server process dies, so a crashed
    or SIGKILLed server never leaves model workers (and their memory) behind. Linux only."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except OSError:
        pass


@dataclass
class WorkerSlot:
    """One model replica and what the broker knows about it."""

    index: int
    generation: int = 0
    process: subprocess.Popen | None = None
    state: str = DEAD
    started_at: float = 0.0
    batch: dict[str, None] = field(default_factory=dict)
    """Request ids the worker holds (insertion-ordered, O(1) removal as each one finishes)."""
    batch_started: float = 0.0
    overdue_since: float | None = None
    rolling_capacity: int = 0
    """Sequences a rolling-batch worker runs at once; 0 for a dynamic-batching worker (one batch)."""
    loaded: bool = False
    """Whether this replica has finished loading at least once."""
    prefix: str = ""
    """Makes identities unique across models: empty for the start-up model, ``<name>.<n>.`` otherwise."""
    stopping_since: float | None = None
    """When it was asked to exit (``terminate``): the broker kills it after a grace period."""

    @property
    def identity(self) -> bytes:
        return f"{self.prefix}w{self.index}.{self.generation}".encode()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, spec_path: str, backend_address: str, extra_env: dict[str, str] | None = None) -> None:
        self.generation += 1
        cmd = [
            sys.executable,
            "-m",
            "handlers.worker",
            "--spec",
            spec_path,
            "--address",
            backend_address,
            "--identity",
            self.identity.decode(),
        ]
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}  # model code never sees the key
        # OpenMP threads that spin without bound starve the HTTP front and broker on small machines;
        # a short spin (~0.1 ms) then sleep keeps back-to-back kernels fast (see the README).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.setdefault("GOMP_SPINCOUNT", "300000")
        env.update(extra_env or {})
        env["LMI_WORKER_INDEX"] = str(self.index)
        self.process = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
        self.state, self.started_at = STARTING, time.monotonic()
        self.batch, self.overdue_since, self.rolling_capacity, self.stopping_since = {}, None, 0, None
        log.info("Started model worker %d (pid %d)", self.index, self.process.pid)

    def exit_code(self) -> int | None:
        """None while running (or never started)."""
        return None if self.process is None else self.process.poll()

    def has_exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def terminate(self) -> None:
        """Ask it to exit without waiting (the broker thread must not block); see ``stopping_since``."""
        if self.stopping_since is None and not self.has_exited():
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # it exited between the check and the signal
        self.stopping_since = self.stopping_since or time.monotonic()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.state = DEAD


def stop_all(slots: Iterable[WorkerSlot], timeout_s: float) -> None:
    """SIGTERM every worker at once, then wait for them together: shutdown takes one grace period,
    not one per worker."""
    slots = list(slots)
    for slot in slots:
        slot.terminate()
    deadline = time.monotonic() + timeout_s
    for slot in slots:
        if slot.process is not None:
            try:
                slot.process.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                slot.kill()
        slot.state = DEAD


def write_worker_spec(config: ServingConfig, path: str) -> None:
    """What a model worker reads at start: the handler's init properties (strings, as DJL gives them)
    and, under "options", every declared key's typed value (serving/options.py)."""
    spec = {
        "model_dir": config.model_dir,
        "model_name": config.model_name,
        "properties": config.handler_properties(),
        "options": config.settings,
        "log_level": logging.getLevelName(logging.getLogger().level),
        "log_format": config.log_format,
        "metrics": config.metrics,
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(spec, fh)
