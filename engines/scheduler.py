"""Iteration-level (continuous) batching policy, independent of any model or tensor library.

Each `step()` admits waiting requests while there is room (batch size, cache slots, prefill-token
budget), runs one engine step for everyone, and retires finished sequences at once so their room goes
to the next request. A request never waits for another request's generation to finish.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class SchedulerEngine(Protocol):
    def free_slots(self) -> int: ...

    def step(self, admit: list[Any], cancel: list[str]) -> list[Any]:
        """Returns events with `request_id` and `finish_reason` (None while running)."""
        ...


@dataclass
class Waiting:
    request: Any  # has .request_id
    prompt_len: int
    deadline: float


class RollingScheduler:
    def __init__(
        self,
        engine: SchedulerEngine,
        max_batch_size: int,
        max_prefill_tokens: int,
        queue_capacity: int,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.queue_capacity = queue_capacity
        self.timeout_s = timeout_s
        self.clock = clock
        self.waiting: deque[Waiting] = deque()
        self.running: set[str] = set()
        self._cancelled: list[str] = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._cancelled)

    def submit(self, request: Any, prompt_len: int) -> None:
        """Queue a request; OverflowError when the waiting queue is at capacity."""
        if len(self.waiting) >= self.queue_capacity:
            raise OverflowError(f"rolling-batch queue full ({self.queue_capacity} waiting)")
        self.waiting.append(Waiting(request, prompt_len, self.clock() + self.timeout_s))

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting request, or free a running one at the next step; False if unknown."""
        before = len(self.waiting)
        self.waiting = deque(w for w in self.waiting if w.request.request_id != request_id)
        if len(self.waiting) < before:
            return True
        if request_id in self.running:
            self._cancelled.append(request_id)
            return True
        return False

    def reset(self) -> None:
        """After the engine aborted every sequence: nothing is running any more."""
        self.running.clear()
        self._cancelled.clear()

    def expire(self) -> list[Any]:
        """Requests that waited longer than the timeout without getting room; the caller answers them."""
        now = self.clock()
        expired = [w.request for w in self.waiting if w.deadline < now]
        if expired:
            self.waiting = deque(w for w in self.waiting if w.deadline >= now)
        return expired

    def _admit(self) -> list[Any]:
        room = min(self.max_batch_size - len(self.running), self.engine.free_slots())
        admitted: list[Any] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(admitted) < room:
            head = self.waiting[0]
            if head.prompt_len > budget and (admitted or self.running):
                break  # the budget resets next step; a lone oversized prompt still goes alone
            budget -= head.prompt_len
            admitted.append(self.waiting.popleft().request)
        return admitted

    def step(self) -> list[Any]:
        admit, cancel = self._admit(), self._cancelled
        self._cancelled = []
        self.running.update(r.request_id for r in admit)
        events = self.engine.step(admit, cancel) if (admit or cancel or self.running) else []
        for event in events:
            if event.finish_reason is not None:
                self.running.discard(event.request_id)
        return events
