"""Rank 0 of a parallel group: start the follower ranks, lead every step, and die with any of them.

The engine (engines/rolling/engine.py) sees an ordinary model and cache: ``LeaderModel`` and
``LeaderCache`` tell the followers what to do (engines.parallel.protocol) before doing it themselves.
A rank that dies breaks every collective of its group, so the group is restarted as a whole: rank 0
exits (the broker answers its in-flight requests with a 5xx and starts a new worker, counted against
retry_threshold) and its local followers die with it (PR_SET_PDEATHSIG); remote followers see their
collectives fail and exit.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from dataclasses import asdict
from typing import Any

import torch

from engines.base import EngineConfig
from engines.parallel.comm import ParallelComm, Rendezvous
from engines.parallel.protocol import COPY, STEP, STOP, Command
from engines.parallel.spawn import RankProcess

log = logging.getLogger("engines.parallel")

GROUP_FAILED_EXIT = 70
"""Exit code of a rank whose group broke (a rank died or a collective failed)."""


class LeaderModel:
    """The engine's model on rank 0: broadcasts each step, then runs rank 0's part of it."""

    def __init__(self, model: Any, comm: ParallelComm) -> None:
        self.model, self.comm = model, comm

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, batch: Any, cache: Any, rows: torch.Tensor | None = None) -> torch.Tensor:
        try:
            self.comm.broadcast_object(Command.step(batch, rows))
            self.comm.broadcast(batch.token_ids)
            return self.model(batch, cache, rows)
        except RuntimeError as exc:  # a collective failed: a rank is gone
            fail_group(f"a collective of the parallel group failed: {exc}")
            raise

    def parameters(self) -> Any:
        return self.model.parameters()


class LeaderCache:
    """The engine's KV cache on rank 0: block copies happen on every rank."""

    def __init__(self, cache: Any, comm: ParallelComm) -> None:
        self.cache, self.comm = cache, comm

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            self.comm.broadcast_object(Command(COPY, pairs=list(pairs)))
        self.cache.copy_blocks(pairs)


class Group:
    """Rank 0's hold on its group: the collectives and the follower processes started here."""

    def __init__(self, comm: ParallelComm, followers: Followers | None) -> None:
        self.comm, self.followers = comm, followers

    def close(self) -> None:
        """Stop every follower and leave the process group (a clean shutdown of rank 0)."""
        if self.followers is not None:
            self.followers.stop_watching()
        try:
            self.comm.broadcast_object(Command(STOP))
        except RuntimeError:
            pass
        if self.followers is not None:
            self.followers.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def fail_group(reason: str) -> None:
    """Exit rank 0 at once: its group cannot compute any more."""
    log.error("Parallel group broken (%s); exiting so that the whole group restarts", reason)
    logging.shutdown()
    os._exit(GROUP_FAILED_EXIT)


class Followers:
    """The follower rank processes this node starts, and the thread that watches them."""

    def __init__(self, processes: list[RankProcess]) -> None:
        self.processes = processes
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watch_loop, name="rank-watchdog", daemon=True)
        self._watch.start()

    def _watch_loop(self) -> None:
        while not self._stop.wait(0.5):
            for process in self.processes:
                code = process.poll()
                if code is not None:
                    fail_group(f"rank process {process.pid} exited with code {code}")

    def stop_watching(self) -> None:
        self._stop.set()
        self._watch.join()

    def close(self, timeout_s: float = 10.0) -> None:
        """Wait for the followers to exit (after STOP), killing those that do not."""
        self.stop_watching()
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start_followers(
    config: EngineConfig, ranks: list[int], rendezvous: Rendezvous, threads: int | None
) -> Followers:
    """Fork a follower for each of ``ranks`` on this machine from the fork server (engines.parallel.spawn:
    no imports on the group's critical path)."""
    from engines.parallel.spawn import start_rank

    spec = json.dumps(asdict(config))
    processes = []
    for rank in ranks:
        env = {"MASTER_ADDR": rendezvous.address, "MASTER_PORT": str(rendezvous.port), "RANK": str(rank)}
        processes.append(start_rank(rank, spec, threads, env))
    log.info("Started follower ranks %s (pids %s)", ranks, [p.pid for p in processes])
    return Followers(processes)


def run_follower(model: Any, cache: Any, comm: ParallelComm, block_size: int) -> None:
    """A follower's life after loading: do what rank 0 says until it says stop."""
    device = next(model.parameters()).device
    steps, started = 0, time.monotonic()
    while True:
        command: Command = comm.broadcast_object(None)
        if command.kind == STOP:
            log.info(
                "Rank %d stopping after %d steps (%.0f s)",
                comm.layout.rank,
                steps,
                time.monotonic() - started,
            )
            return
        if command.kind == COPY:
            cache.copy_blocks(command.pairs)
            continue
        if command.kind != STEP:
            raise RuntimeError(f"unknown command {command.kind!r}")
        tokens = comm.broadcast(torch.empty(sum(command.query_lens), dtype=torch.int64, device=device))
        rows = None if command.rows is None else torch.tensor(command.rows, dtype=torch.int64, device=device)
        model(command.batch(tokens, block_size), cache, rows)
        steps += 1
