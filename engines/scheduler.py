"""Iteration-level (continuous) batching policy, independent of any model or tensor library.

Each `step()` admits waiting requests while there is room (batch size, cache slots, prefill-token
budget), runs one engine step for everyone, and retires finished sequences at once so their room goes
to the next request. A request never waits for another request's generation to finish.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from engines.base import GenerationEngine
from engines.types import GenerationRequest, TokenEvent


@dataclass
class Waiting:
    request: GenerationRequest
    prompt_len: int
    deadline: float


class RollingScheduler:
    """Admission policy over any ``GenerationEngine``; O(1) per request for submit, cancel and expiry
    (every request waits at most the same ``timeout_s``, so arrival order is deadline order)."""

    def __init__(
        self,
        engine: GenerationEngine,
        max_batch_size: int,
        max_prefill_tokens: int,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.timeout_s = timeout_s
        self.clock = clock
        self.waiting: OrderedDict[str, Waiting] = OrderedDict()
        self.running: dict[str, int] = {}
        """Request id → completions still running (``params.num_sequences`` at admission)."""
        self._cancelled: list[str] = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._cancelled)

    def submit(self, request: GenerationRequest, prompt_len: int, deadline: float | None = None) -> None:
        """Queue a request until ``deadline`` (the broker's, on the same monotonic clock), else for
        ``timeout_s``. Unbounded: the broker sends a worker no more requests than it has room for."""
        if deadline is None:
            deadline = self.clock() + self.timeout_s
        if self.waiting and deadline < next(reversed(self.waiting.values())).deadline:
            deadline = next(reversed(self.waiting.values())).deadline  # keep FIFO = deadline order
        self.waiting[request.request_id] = Waiting(request, prompt_len, deadline)

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting request, or free a running one at the next step; False if unknown."""
        if self.waiting.pop(request_id, None) is not None:
            return True
        if request_id in self.running:
            self._cancelled.append(request_id)
            return True
        return False

    def reset(self) -> None:
        """After the engine aborted every sequence: nothing is running any more."""
        self.running.clear()
        self._cancelled.clear()

    def expire(self) -> list[GenerationRequest]:
        """Requests that waited longer than the timeout without getting room; the caller answers them."""
        now, expired = self.clock(), []
        while self.waiting and next(iter(self.waiting.values())).deadline < now:
            expired.append(self.waiting.popitem(last=False)[1].request)
        return expired

    def _admit(self) -> list[GenerationRequest]:
        room = min(self.max_batch_size - sum(self.running.values()), self.engine.free_capacity())
        admitted: list[GenerationRequest] = []
        # an engine that splits prompts into chunks spends the token budget itself
        budget = float("inf") if getattr(self.engine, "chunked_prefill", False) else self.max_prefill_tokens
        while self.waiting and room > 0:
            head = next(iter(self.waiting.values()))
            width = head.request.params.num_sequences  # one prefill, but each completion holds a sequence
            if width > room:
                break  # FIFO: later requests do not overtake it
            if head.prompt_len > budget and (admitted or self.running):
                break  # the budget resets next step; a lone oversized prompt still goes alone
            budget -= head.prompt_len
            room -= width
            admitted.append(self.waiting.popitem(last=False)[1].request)
        return admitted

    def step(self) -> list[TokenEvent]:
        admit, cancel = self._admit(), self._cancelled
        self._cancelled = []
        for request in admit:
            self.running[request.request_id] = request.params.num_sequences
        events = self.engine.step(admit, cancel) if (admit or cancel or self.running) else []
        for event in events:
            if event.finish_reason is not None and event.request_id in self.running:
                left = self.running[event.request_id] = self.running[event.request_id] - 1
                if left > 0 and event.finish_reason in ("cancelled", "error"):
                    self._cancelled.append(event.request_id)  # its other completions end with it
                if left <= 0 or event.finish_reason in ("cancelled", "error"):
                    del self.running[event.request_id]
        return events
