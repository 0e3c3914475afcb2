"""Memory accounting for run-time model loads: estimate before loading, refuse with 507 beyond the budget.

A load is checked against what the loaded models have reserved, not against the memory free right
now: a model whose workers are still reading their weights holds little memory yet, so a live
reading would let two concurrent loads both "fit". As in DJL, a model that does not say what it needs
(``required_memory_mb``) is estimated at 1.2 × the size of its files; each worker process holds its
own copy, so a model reserves that much per worker.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from serving.errors import ServingError

MIB = 1024 * 1024
ESTIMATE_FACTOR = 1.2
"""DJL's estimate of a model's memory from its files (ModelInfo#checkAvailableMemory)."""


class InsufficientMemory(ServingError):
    """The model does not fit in the memory budget; SageMaker unloads an idle model and retries."""

    status_code = 507
    error_type = "WlmOutOfMemoryException"


@dataclass(frozen=True)
class MemoryNeed:
    """What one worker of a model needs, and how that number was obtained (for the 507 message)."""

    per_worker_mb: int
    how: str


def folder_size_bytes(path: str) -> int:
    """Total size of the regular files under ``path`` (symlinked files count; a race is ignored)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                continue
    return total


def estimate_need(model_dir: str | None, required_memory_mb: int | None) -> MemoryNeed:
    """``required_memory_mb`` when set, else 1.2 × the model folder's size (0 without a local folder)."""
    if required_memory_mb:
        return MemoryNeed(required_memory_mb, f"required_memory_mb={required_memory_mb}")
    if not model_dir:
        return MemoryNeed(0, "no local folder to measure; set required_memory_mb")
    size = folder_size_bytes(model_dir)
    return MemoryNeed(math.ceil(size * ESTIMATE_FACTOR / MIB), f"1.2 × {size / MIB:.1f} MB of files")


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def _cgroup_free_bytes() -> int | None:
    """What the container's memory limit leaves (cgroup v2, else v1); None without a limit."""
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 "no limit" is ~2^63
            return max(limit - usage, 0)
    return None


def available_memory_mb() -> int:
    """MemAvailable from /proc/meminfo, capped by the cgroup limit: the default budget at start-up."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cgroup = _cgroup_free_bytes()
    return (min(available, cgroup) if cgroup is not None else available) // MIB


@dataclass
class MemoryLedger:
    """Megabytes reserved per model against one budget; a reservation is checked before the load starts."""

    budget_mb: int
    reserved: dict[str, int] = field(default_factory=dict)

    @property
    def used_mb(self) -> int:
        return sum(self.reserved.values())

    def reserve(self, name: str, total_mb: int, detail: str, force: bool = False) -> None:
        """Set ``name``'s reservation to ``total_mb``; growing it beyond the budget raises 507 (unless
        ``force``: the start-up model is served whatever the estimate says, as before)."""
        others = self.used_mb - self.reserved.get(name, 0)
        if not force and total_mb > self.reserved.get(name, 0) and others + total_mb > self.budget_mb:
            holders = ", ".join(f"{n!r} {mb} MB" for n, mb in sorted(self.reserved.items()) if n != name)
            raise InsufficientMemory(
                f"Not enough memory for model {name!r}: it needs {total_mb} MB ({detail}), but only "
                f"{max(self.budget_mb - others, 0)} MB of memory_budget_mb={self.budget_mb} MB are free "
                f"({others} MB reserved by {holders or 'no model'}). Fix: unload a model "
                "(DELETE /models/<name>), set required_memory_mb in the model's serving.properties if the "
                "estimate is wrong, or raise memory_budget_mb (SERVING_MEMORY_BUDGET_MB)."
            )
        self.reserved[name] = total_mb

    def release(self, name: str) -> None:
        self.reserved.pop(name, None)

    def rename(self, old: str, new: str) -> None:
        """Keep a reservation under another key (a model being unloaded frees its name at once)."""
        if old in self.reserved:
            self.reserved[new] = self.reserved.pop(old)
