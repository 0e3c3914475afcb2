"""Load patterns: closed loop (C clients back to back) and open loop (Poisson arrivals, capped).

Both take ``send(i)`` (a coroutine giving request i's Outcome), so they know nothing about HTTP and are
testable with a fake. A run stops issuing at ``num_requests`` or ``duration_s`` (whichever comes
first), then waits for what is in flight; each request is bounded by its own timeout in ``send``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from serving.bench.clients import Outcome

Send = Callable[[int], Awaitable[Outcome]]


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0
    max_in_flight: int = 0


class _InFlight:
    """Counts concurrent requests, to report the concurrency actually reached."""

    def __init__(self, send: Send, result: LoadResult) -> None:
        self.send, self.result, self.now = send, result, 0

    async def __call__(self, index: int) -> Outcome:
        self.now += 1
        self.result.max_in_flight = max(self.result.max_in_flight, self.now)
        try:
            outcome = await self.send(index)
        finally:
            self.now -= 1
        self.result.outcomes.append(outcome)
        return outcome


def _check_stop(num_requests: int | None, duration_s: float | None) -> None:
    if num_requests is None and duration_s is None:
        raise ValueError("give num_requests or duration_s, or the run would never end")


async def closed_loop(
    send: Send, concurrency: int, num_requests: int | None = None, duration_s: float | None = None
) -> LoadResult:
    """``concurrency`` clients; each sends its next request as soon as its previous one ends."""
    _check_stop(num_requests, duration_s)
    result = LoadResult()
    tracked = _InFlight(send, result)
    started = time.perf_counter()
    deadline = None if duration_s is None else started + duration_s
    issued = 0

    async def client() -> None:
        nonlocal issued
        while (num_requests is None or issued < num_requests) and (
            deadline is None or time.perf_counter() < deadline
        ):
            issued += 1
            await tracked(issued - 1)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - started
    return result


async def open_loop(
    send: Send,
    rate: float,
    max_concurrency: int,
    num_requests: int | None = None,
    duration_s: float | None = None,
    seed: int = 0,
) -> LoadResult:
    """Arrivals at exponential gaps (a Poisson process of ``rate``/s), independent of responses.

    Beyond ``max_concurrency`` in flight, arrivals wait for a free slot; latencies are measured from
    when a request is actually sent (as vLLM's benchmark does with --max-concurrency).
    """
    _check_stop(num_requests, duration_s)
    result = LoadResult()
    tracked = _InFlight(send, result)
    slots = asyncio.Semaphore(max_concurrency)
    rng = random.Random(seed)

    async def one(index: int) -> None:
        async with slots:
            await tracked(index)

    started = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []
    arrival = 0.0  # seconds after start; the first request goes at once
    while (num_requests is None or len(tasks) < num_requests) and (
        duration_s is None or arrival < duration_s
    ):
        delay = started + arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(len(tasks))))
        arrival += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    result.wall_s = time.perf_counter() - started
    return result
