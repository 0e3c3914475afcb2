"""Dynamic batching policy, as a pure data structure with an injected clock (unit-testable).

A lone request never waits: with no recent load, whatever is queued goes to an idle worker at once.
Under load, requests arrive in waves (a closed-loop client fleet answers right after each batch),
so a request arriving while a worker is busy, or within ``max_batch_delay`` of the last batch
finishing, is held until as many requests as the last batch carried have gathered (up to
``batch_size``) or until it has waited ``max_batch_delay``. Without that, a fleet of 16 clients
settles into alternating batches of 1 and 15, paying a whole forward pass for one request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Waiting(Generic[T]):
    item: T
    arrived: float


@dataclass
class BatchQueue(Generic[T]):
    """A bounded FIFO that hands out batches of up to ``batch_size``."""

    batch_size: int
    max_batch_delay_s: float
    capacity: int
    _items: deque[Waiting[T]] = field(default_factory=deque)
    _last_size: int = 1
    _last_done: float = float("-inf")

    def __len__(self) -> int:
        return len(self._items)

    def is_full(self) -> bool:
        return len(self._items) >= self.capacity

    def add(self, item: T, now: float) -> None:
        if self.is_full():
            raise OverflowError("queue full")
        self._items.append(Waiting(item, now))

    def _expected(self, arrived: float, any_busy: bool) -> int:
        """How many requests the current wave of load is expected to bring."""
        in_wave = any_busy or arrived <= self._last_done + self.max_batch_delay_s
        return min(self._last_size, self.batch_size) if in_wave else 1

    def ready(self, now: float, any_busy: bool = False) -> bool:
        """Whether an idle worker should take a batch now (``any_busy``: another worker is working)."""
        if not self._items:
            return False
        oldest = self._items[0]
        if len(self._items) >= self.batch_size or now >= oldest.arrived + self.max_batch_delay_s:
            return True
        return len(self._items) >= self._expected(oldest.arrived, any_busy)

    def next_deadline(self) -> float | None:
        """When the oldest held request must go even if the batch is not full."""
        if not self._items:
            return None
        return self._items[0].arrived + self.max_batch_delay_s

    def take(self, limit: int | None = None) -> list[T]:
        batch: list[T] = []
        while self._items and len(batch) < (limit or self.batch_size):
            batch.append(self._items.popleft().item)
        if batch:
            self._last_size = len(batch)
        return batch

    def batch_done(self, now: float) -> None:
        """A worker finished a batch taken from this queue."""
        self._last_done = now

    def remove(self, predicate: Callable[[T], bool]) -> list[T]:
        """Drop queued items matching ``predicate`` (cancelled or expired); returns them."""
        dropped = [w.item for w in self._items if predicate(w.item)]
        self._items = deque(w for w in self._items if not predicate(w.item))
        return dropped
