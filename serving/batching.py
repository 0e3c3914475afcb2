"""Dynamic batching policy, as a pure data structure with an injected clock (unit-testable).

A lone request never waits: with no recent load, whatever is queued goes to an idle worker at once.
Under load, requests arrive in waves (a closed-loop client fleet answers right after each batch),
so a request arriving while a worker is busy, or within ``max_batch_delay`` of the last batch
finishing, is held until as many requests as the last batch carried have gathered (up to
``batch_size``) or until it has waited ``max_batch_delay``. Without that, a fleet of 16 clients
settles into alternating batches of 1 and 15, paying a whole forward pass for one request.

Every operation costs O(1) per request whatever the queue length: the broker touches the queue on
every message from a worker, so under overload (thousands waiting) a scan per event would eat the
cores the model needs. Cancellation removes by key from an ordered dict, and expiry only looks at the
head: every request waits at most the same ``max_wait_s``, so arrival order is deadline order.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Waiting(Generic[T]):
    item: T
    arrived: float


@dataclass
class BatchQueue(Generic[T]):
    """A bounded FIFO that hands out batches of up to ``batch_size``; items older than ``max_wait_s``
    are handed back by ``expire``."""

    batch_size: int
    max_batch_delay_s: float
    capacity: int
    max_wait_s: float = float("inf")
    _items: OrderedDict[Hashable, Waiting[T]] = field(default_factory=OrderedDict)
    _last_size: int = 1
    _last_done: float = float("-inf")
    _last_arrival: float = float("-inf")
    _keys: itertools.count = field(default_factory=itertools.count)

    def __len__(self) -> int:
        return len(self._items)

    def is_full(self) -> bool:
        return len(self._items) >= self.capacity

    def add(self, item: T, now: float, key: Hashable | None = None) -> None:
        """Queue ``item`` (``key``: how ``discard`` finds it; unique among queued items)."""
        if self.is_full():
            raise OverflowError("queue full")
        if now < self._last_arrival:
            raise ValueError("arrival times must not go backwards (expiry relies on FIFO = deadline order)")
        key = next(self._keys) if key is None else key
        if key in self._items:
            raise KeyError(f"{key!r} is already queued")
        self._last_arrival = now
        self._items[key] = Waiting(item, now)

    def _head(self) -> Waiting[T]:
        return next(iter(self._items.values()))

    def _expected(self, arrived: float, any_busy: bool) -> int:
        """How many requests the current wave of load is expected to bring."""
        in_wave = any_busy or arrived <= self._last_done + self.max_batch_delay_s
        return min(self._last_size, self.batch_size) if in_wave else 1

    def ready(self, now: float, any_busy: bool = False) -> bool:
        """Whether an idle worker should take a batch now (``any_busy``: another worker is working)."""
        if not self._items:
            return False
        oldest = self._head()
        if len(self._items) >= self.batch_size or now >= oldest.arrived + self.max_batch_delay_s:
            return True
        return len(self._items) >= self._expected(oldest.arrived, any_busy)

    def next_deadline(self) -> float | None:
        """When the oldest held request must go even if the batch is not full."""
        if not self._items:
            return None
        return self._head().arrived + self.max_batch_delay_s

    def next_expiry(self) -> float | None:
        """When the oldest request runs out of ``max_wait_s``."""
        return self._head().arrived + self.max_wait_s if self._items else None

    def take(self, limit: int | None = None) -> list[T]:
        batch: list[T] = []
        while self._items and len(batch) < (limit or self.batch_size):
            batch.append(self._items.popitem(last=False)[1].item)
        if batch:
            self._last_size = len(batch)
        return batch

    def batch_done(self, now: float) -> None:
        """A worker finished a batch taken from this queue."""
        self._last_done = now

    def discard(self, key: Hashable) -> T | None:
        """Drop the item queued under ``key`` (a cancelled request); None when it is not queued."""
        waiting = self._items.pop(key, None)
        return None if waiting is None else waiting.item

    def expire(self, now: float) -> list[T]:
        """Drop and return the items that have waited longer than ``max_wait_s`` (oldest first)."""
        expired: list[T] = []
        while self._items and now > self._head().arrived + self.max_wait_s:
            expired.append(self._items.popitem(last=False)[1].item)
        return expired

    def drain(self) -> list[T]:
        """Drop and return everything queued (the model failed)."""
        items = [w.item for w in self._items.values()]
        self._items.clear()
        return items
