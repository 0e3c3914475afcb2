"""Dynamic batching policy: dispatch at once to an idle worker, aggregate only while workers are busy.

Pure data structure with an injected clock, so the policy is unit-testable without processes.
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
    arrived_while_busy: bool


@dataclass
class BatchQueue(Generic[T]):
    """A bounded FIFO that hands out batches of up to ``batch_size``.

    A request that finds a worker idle is dispatched with whatever is queued, so a lone request never
    waits. Requests that arrive while every worker is busy are held until the batch is full or the
    oldest of them has waited ``max_batch_delay_s``; under load that groups them into larger batches.
    """

    batch_size: int
    max_batch_delay_s: float
    capacity: int
    _items: deque[Waiting[T]] = field(default_factory=deque)

    def __len__(self) -> int:
        return len(self._items)

    def is_full(self) -> bool:
        return len(self._items) >= self.capacity

    def add(self, item: T, now: float, any_worker_idle: bool) -> None:
        if self.is_full():
            raise OverflowError("queue full")
        self._items.append(Waiting(item, now, not any_worker_idle))

    def ready(self, now: float) -> bool:
        """Whether an idle worker should take a batch now."""
        if not self._items:
            return False
        if len(self._items) >= self.batch_size:
            return True
        oldest = self._items[0]
        return not oldest.arrived_while_busy or now >= oldest.arrived + self.max_batch_delay_s

    def next_deadline(self) -> float | None:
        """When the oldest held request must go even if the batch is not full."""
        if not self._items:
            return None
        return self._items[0].arrived + self.max_batch_delay_s

    def take(self) -> list[T]:
        batch: list[T] = []
        while self._items and len(batch) < self.batch_size:
            batch.append(self._items.popleft().item)
        return batch

    def remove(self, predicate: Callable[[T], bool]) -> list[T]:
        """Drop queued items matching ``predicate`` (cancelled or expired); returns them."""
        dropped = [w.item for w in self._items if predicate(w.item)]
        self._items = deque(w for w in self._items if not predicate(w.item))
        return dropped
