"""RollingScheduler policy against a fake engine that emits canned tokens (no model, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engines.scheduler import RollingScheduler
from engines.types import SamplingParams


@dataclass
class Req:
    request_id: str
    tokens: int = 3  # how many tokens this request generates
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Event:
    request_id: str
    finish_reason: str | None


class FakeEngine:
    """Generates one token per running request per step; tracks slots like a KV cache would."""

    def __init__(self, slots: int = 8) -> None:
        self.slots = slots
        self.running: dict[str, int] = {}
        self.steps: list[tuple[list[str], list[str]]] = []

    def free_capacity(self) -> int:
        return self.slots - len(self.running)

    def step(self, admit: list[Req], cancel: list[str]) -> list[Event]:
        self.steps.append(([r.request_id for r in admit], list(cancel)))
        events = [Event(rid, "cancelled") for rid in cancel if self.running.pop(rid, None) is not None]
        for req in admit:
            assert len(self.running) < self.slots, "admitted beyond the cache"
            self.running[req.request_id] = req.tokens
        for rid in list(self.running):
            self.running[rid] -= 1
            done = self.running[rid] == 0
            if done:
                del self.running[rid]
            events.append(Event(rid, "length" if done else None))
        return events


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(engine=None, batch=4, prefill=100, timeout=5.0, clock=None):
    return RollingScheduler(engine or FakeEngine(), batch, prefill, timeout, clock or Clock())


def test_admits_up_to_max_batch_size_and_retires_finished_at_once():
    engine = FakeEngine(slots=8)
    sched = make(engine, batch=2)
    for i, tokens in enumerate([1, 3, 2]):
        sched.submit(Req(f"r{i}", tokens), prompt_len=5)
    sched.step()
    assert engine.steps[0][0] == ["r0", "r1"]  # batch limit 2
    sched.step()
    assert engine.steps[1][0] == ["r2"]  # r0 finished after one token: its room went to r2 at once
    assert set(sched.running) == {"r1", "r2"}


def test_new_request_joins_without_waiting_for_others_to_finish():
    engine = FakeEngine()
    sched = make(engine)
    sched.submit(Req("long", 100), 5)
    sched.step()
    sched.submit(Req("short", 1), 5)
    events = sched.step()
    assert Event("short", "length") in events
    assert "long" in sched.running


def test_prefill_budget_limits_admission_per_step_but_never_starves_a_big_prompt():
    engine = FakeEngine()
    sched = make(engine, batch=8, prefill=10)
    sched.submit(Req("a", 5), 6)
    sched.submit(Req("b", 5), 6)
    sched.step()
    assert engine.steps[-1][0] == ["a"]  # 6 + 6 > 10
    sched.step()
    assert engine.steps[-1][0] == ["b"]
    lone = make(FakeEngine(), prefill=10)
    lone.submit(Req("huge"), 50)
    lone.step()
    assert lone.engine.steps[-1][0] == ["huge"]


def test_admission_waits_for_free_cache_slots():
    engine = FakeEngine(slots=1)
    sched = make(engine, batch=4)
    sched.submit(Req("a", 2), 1)
    sched.submit(Req("b", 1), 1)
    sched.step()
    assert engine.steps[-1][0] == ["a"]
    sched.step()  # a finishes in this step; b still had no slot when it started
    assert engine.steps[-1][0] == []
    sched.step()
    assert engine.steps[-1][0] == ["b"]


def test_a_given_deadline_wins_and_fifo_stays_deadline_ordered():
    clock = Clock()
    sched = make(FakeEngine(slots=0), timeout=100.0, clock=clock)
    sched.submit(Req("broker"), 1, deadline=3.0)  # the broker's deadline, earlier than timeout_s
    sched.submit(Req("early"), 1, deadline=1.0)  # never before the one ahead of it
    sched.submit(Req("own"), 1)  # no deadline given: now + timeout_s
    clock.now = 3.5
    assert [r.request_id for r in sched.expire()] == ["broker", "early"]
    clock.now = 100.5
    assert [r.request_id for r in sched.expire()] == ["own"]


def test_one_failed_completion_of_n_cancels_its_siblings():
    class OneFails(FakeEngine):
        def step(self, admit, cancel):
            self.steps.append(([r.request_id for r in admit], list(cancel)))
            return [Event("pair", "error")] if admit else [Event(rid, "cancelled") for rid in cancel]

    engine = OneFails()
    sched = make(engine)
    sched.submit(Req("pair", 5, SamplingParams(n=2)), 1)
    sched.step()
    assert sched.running == {}
    sched.step()
    assert engine.steps[-1] == ([], ["pair"])  # the engine is told to free the other completion


def test_waiting_requests_expire_after_the_timeout():
    clock = Clock()
    engine = FakeEngine(slots=1)
    sched = make(engine, batch=1, timeout=5.0, clock=clock)
    sched.submit(Req("a", 100), 1)
    sched.step()
    sched.submit(Req("b"), 1)
    clock.now = 4.0
    assert sched.expire() == []
    clock.now = 5.5
    assert [r.request_id for r in sched.expire()] == ["b"]
    assert not sched.waiting


def test_cancel_waiting_and_running():
    engine = FakeEngine(slots=1)
    sched = make(engine, batch=1)
    sched.submit(Req("run", 100), 1)
    sched.submit(Req("wait"), 1)
    sched.step()
    assert sched.cancel("wait")
    assert sched.cancel("run")
    assert not sched.cancel("unknown")
    events = sched.step()
    assert Event("run", "cancelled") in events
    assert engine.free_capacity() == 1  # the cache room came back
    assert not sched.has_work()


def test_step_without_work_does_not_call_the_engine():
    engine = FakeEngine()
    sched = make(engine)
    assert sched.step() == []
    assert engine.steps == []


def test_a_request_with_n_completions_takes_n_places_and_runs_until_all_finish():
    engine = FakeEngine(slots=8)
    sched = make(engine, batch=3)
    sched.submit(Req("pair", 2, SamplingParams(n=2)), 1)
    sched.submit(Req("pair2", 2, SamplingParams(n=2)), 1)
    sched.step()
    assert engine.steps[-1][0] == ["pair"]  # 2 + 2 > 3: the second pair waits, FIFO
    assert sched.running == {"pair": 2}
    sched.step()  # the fake engine finishes "pair" once; the scheduler expects two final events
    assert "pair" in sched.running
    assert sched.running["pair"] == 1
