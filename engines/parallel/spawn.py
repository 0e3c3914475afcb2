"""Start follower rank processes by forking a server that has already imported torch and the engine.

A fresh Python process spends 3-4 s importing torch and transformers before it reads one weight, and a
follower's start used to pay that on the group's critical path (rank 0 had imported long before). Here
followers come from multiprocessing's fork server: a process spawned once, before this process touches
torch, that imports ``engines.parallel.preload`` and then only forks. Forking rank 0 itself would be
cheaper still but is unsafe: once a process has run an OpenMP parallel region, a forked child that
starts another with more than one thread hangs (libgomp), and a CUDA context does not survive fork.
The fork server never computes, so its children may do both.

This module imports no torch: a model worker calls ``prestart`` first thing, so that the server's imports
run on another core while the worker imports its own.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import subprocess
import sys
import types
from typing import Any

PRELOAD = ["engines.parallel.preload"]
"""What the fork server imports before it forks: everything a follower imports to load and serve."""
PR_SET_NAME, PR_SET_PDEATHSIG = 15, 1


def _context() -> Any:
    context = multiprocessing.get_context("forkserver")  # every Unix has it; this project runs on Linux
    context.set_forkserver_preload(PRELOAD)
    return context


def prestart() -> None:
    """Start the fork server now (it lives until this process exits): call it before importing torch,
    in a process that will start followers, so that their start costs a fork and no imports."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


class RankProcess:
    """A follower forked by the server, with the part of ``subprocess.Popen``'s interface the group's
    watchdog uses (``pid``, ``poll``, ``wait``, ``kill``)."""

    def __init__(self, process: Any, rank: int) -> None:
        self.process, self.rank = process, rank

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"rank {self.rank}", timeout or 0.0)
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()


def start_rank(rank: int, config_json: str, threads: int | None, env: dict[str, str]) -> RankProcess:
    """Fork follower ``rank`` from the server; it runs ``engines.parallel.follower.serve`` in this
    process's folder, with its environment plus ``env`` (the rendezvous)."""
    process = _context().Process(
        target=_rank_main,
        args=(rank, config_json, threads, {**os.environ, **env}),
        name=f"lmi-rank{rank}",
        daemon=True,  # an interpreter that exits without closing its engine does not wait on its ranks
    )
    main = sys.modules["__main__"]
    # multiprocessing would have the child import the starter's main module (a script, pytest, the
    # worker) and run its top level again; a rank needs nothing from it.
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        process.start()
    finally:
        sys.modules["__main__"] = main
    return RankProcess(process, rank)


def _rank_main(rank: int, config_json: str, threads: int | None, env: dict[str, str]) -> None:
    """The forked child (multiprocessing moved it to the starter's folder): take the starter's
    environment (the server's is that of the moment it started), a name ``ps`` shows (``lmi-rankN``),
    death with the fork server (which exits when the starter does), then the follower's life."""
    os.environ.clear()
    os.environ.update(env)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_NAME, f"lmi-rank{rank}".encode()[:15])
        libc.prctl(PR_SET_PDEATHSIG, 9)
    except OSError:
        pass
    if os.getppid() == 1:  # the server died before the signal was armed (under a subreaper the join fails)
        raise SystemExit(1)
    from engines.parallel.follower import serve

    raise SystemExit(serve(rank, config_json, threads))
