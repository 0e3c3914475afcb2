"""Model worker processes: spawn, watch and stop them. The model never runs in the HTTP process."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger("serving.workers")

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

    @property
    def identity(self) -> bytes:
        return f"w{self.index}.{self.generation}".encode()

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
        env = dict(os.environ)
        # OpenMP threads that spin without bound starve the HTTP front and broker on small machines;
        # a short spin (~0.1 ms) then sleep keeps back-to-back kernels fast (see the README).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.setdefault("GOMP_SPINCOUNT", "300000")
        env.update(extra_env or {})
        env["LMI_WORKER_INDEX"] = str(self.index)
        self.process = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
        self.state, self.started_at = STARTING, time.monotonic()
        self.batch, self.overdue_since, self.rolling_capacity = {}, None, 0
        log.info("Started model worker %d (pid %d)", self.index, self.process.pid)

    def exit_code(self) -> int | None:
        """None while running (or never started)."""
        return None if self.process is None else self.process.poll()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.state = DEAD

    def stop(self, timeout_s: float) -> None:
        """Ask politely, then kill: the worker may be inside a long forward pass."""
        if self.process is None or self.process.poll() is not None:
            self.state = DEAD
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self.state = DEAD
