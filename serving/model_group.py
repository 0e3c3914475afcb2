"""One model's worker pool: its configuration, queue, replicas and health (DJL's WorkerPool).

The broker routes requests to a group and supervises its workers; the group holds only state and
answers questions about it, so several models can run side by side with their own settings.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from serving.batching import BatchQueue
from serving.config import ServingConfig
from serving.workers import BUSY, READY, WorkerSlot


@dataclass(frozen=True)
class Waiter:
    """A management request whose reply waits for worker processes (loaded, or exited)."""

    front: bytes
    key: bytes
    done: str = ""
    """The status line of its success reply."""
    since: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class ModelGroup:
    config: ServingConfig
    spec_path: str
    url: str
    """Where the model came from, as the load request or the command line gave it."""
    at_startup: bool = False
    prefix: str = ""
    """Worker identity prefix (serving.workers.WorkerSlot.prefix)."""
    memory_mb: int = 0
    """Reserved per worker (serving.memory)."""
    ledger_key: str = ""
    """Its reservation's key in the memory ledger: the name, until an unload frees the name."""
    slots: list[WorkerSlot] = field(default_factory=list)
    """Replicas that take requests."""
    retiring: list[WorkerSlot] = field(default_factory=list)
    """Replicas being stopped (scaled down or unloaded): no new requests; dropped once they exit."""
    crashes: int = 0
    failed_reason: str | None = None
    ever_ready: bool = False
    """Every replica has loaded at least once."""
    unloading: bool = False
    load_waiters: list[Waiter] = field(default_factory=list)
    """Load and scale-up requests answered when every replica has loaded (or the model failed)."""
    unload_waiters: list[Waiter] = field(default_factory=list)
    """Unload requests answered once every worker process has exited and the memory is released."""
    max_workers: int = 0

    def __post_init__(self) -> None:
        cfg = self.config
        self.queue: BatchQueue = BatchQueue(
            cfg.batch_size,
            cfg.max_batch_delay_ms / 1000,
            cfg.job_queue_size,
            max_wait_s=cfg.predict_timeout_s,
        )
        self._indexes = itertools.count()
        self.ledger_key = self.ledger_key or self.name
        self.max_workers = max(self.max_workers, cfg.max_workers, cfg.num_workers)
        self.slots = [self.new_slot() for _ in range(cfg.num_workers)]

    @property
    def name(self) -> str:
        return self.config.model_name

    @property
    def log_prefix(self) -> str:
        """Empty for the start-up model, whose log lines read as they did before models were dynamic."""
        return "" if self.at_startup else f"[{self.name}] "

    def new_slot(self) -> WorkerSlot:
        """A replica with an index never used in this group, so identities never repeat."""
        return WorkerSlot(next(self._indexes), prefix=self.prefix)

    def all_loaded(self) -> bool:
        return bool(self.slots) and all(s.loaded for s in self.slots)

    def status(self) -> str:
        if self.failed_reason is not None:
            return "FAILED"
        if not self.ever_ready:
            return "PENDING"
        return "Healthy" if any(s.state in (READY, BUSY) for s in self.slots) else "Unhealthy"

    def health(self) -> dict[str, str]:
        model = {"status": self.status()}
        if self.failed_reason is not None:  # /ping says why, so nobody has to find the log line
            model["reason"] = self.failed_reason
        return model

    def summary(self) -> dict[str, Any]:
        """One entry of GET /models."""
        return {"modelName": self.name, "modelUrl": self.url, "status": self.status()}

    def describe(self) -> dict[str, Any]:
        """GET /models/{name}: DJL's model description plus what this server adds (pids, memory)."""
        cfg = self.config
        workers = [
            {"id": s.index, "pid": s.pid, "status": s.state.upper(), "startTime": _started(s)}
            for s in self.slots
        ]
        return {
            **self.summary(),
            "batchSize": cfg.batch_size,
            "maxBatchDelayMillis": cfg.max_batch_delay_ms,
            "queueSize": cfg.job_queue_size,
            "requestInQueue": len(self.queue),
            "loadedAtStartup": self.at_startup,
            "memoryMb": self.memory_mb * (len(self.slots) + len(self.retiring)),
            "failureReason": self.failed_reason,
            "workerGroups": [
                {
                    "device": {"deviceType": cfg.settings.get("device", "auto")},
                    "minWorkers": len(self.slots),
                    "maxWorkers": self.max_workers,
                    "workers": workers,
                }
            ],
        }


def _started(slot: WorkerSlot) -> str:
    """The worker's (re)start time as DJL's ISO-8601 UTC string (slots keep a monotonic clock)."""
    timestamp = time.time() - (time.monotonic() - slot.started_at)
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
