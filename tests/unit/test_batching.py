"""BatchQueue policy, driven by explicit `now` values (no real clock, no processes)."""

from __future__ import annotations

import pytest

from serving.batching import BatchQueue


def make_queue(batch_size: int = 4, delay_s: float = 0.1, capacity: int = 100) -> BatchQueue[str]:
    return BatchQueue(batch_size=batch_size, max_batch_delay_s=delay_s, capacity=capacity)


def test_empty_queue_is_never_ready_and_has_no_deadline():
    queue = make_queue()
    assert len(queue) == 0
    assert not queue.ready(0.0)
    assert not queue.ready(1e9)
    assert queue.next_deadline() is None
    assert queue.take() == []


def test_lone_request_with_an_idle_worker_is_ready_at_once():
    queue = make_queue(batch_size=8, delay_s=10.0)
    queue.add("a", now=5.0, any_worker_idle=True)
    assert queue.ready(5.0)
    assert queue.take() == ["a"]
    assert len(queue) == 0


def test_requests_arriving_while_busy_wait_for_the_delay():
    # Binary-exact times, so this test is about the policy and not about float rounding.
    queue = make_queue(batch_size=4, delay_s=0.125)
    queue.add("a", now=10.0, any_worker_idle=False)
    queue.add("b", now=10.0625, any_worker_idle=False)
    assert not queue.ready(10.0)
    assert not queue.ready(10.1)
    assert queue.next_deadline() == 10.125
    assert queue.ready(10.125)
    assert queue.ready(11.0)
    assert queue.take() == ["a", "b"]


@pytest.mark.parametrize("arrived", [10.0, 1234.567, 98765.4321])
def test_held_batch_is_ready_at_its_own_next_deadline(arrived: float):
    # serving/broker.py (_poll_timeout_ms) calls ready(next_deadline()) and expects True; with
    # max_batch_delay=100 ms, (arrived + 0.1) - arrived < 0.1 for about half of all arrival times.
    queue = make_queue(batch_size=4, delay_s=0.1)
    queue.add("a", now=arrived, any_worker_idle=False)
    deadline = queue.next_deadline()
    assert deadline is not None
    assert queue.ready(deadline)


def test_deadline_follows_the_oldest_request():
    queue = make_queue(batch_size=4, delay_s=1.0)
    queue.add("a", now=3.0, any_worker_idle=False)
    queue.add("b", now=3.5, any_worker_idle=False)
    assert queue.next_deadline() == pytest.approx(4.0)
    queue.remove(lambda item: item == "a")
    assert queue.next_deadline() == pytest.approx(4.5)
    assert not queue.ready(4.2)
    assert queue.ready(4.5)


def test_requests_arriving_while_busy_go_as_soon_as_the_batch_is_full():
    queue = make_queue(batch_size=3, delay_s=100.0)
    queue.add("a", now=0.0, any_worker_idle=False)
    queue.add("b", now=0.0, any_worker_idle=False)
    assert not queue.ready(0.0)
    queue.add("c", now=0.0, any_worker_idle=False)
    assert queue.ready(0.0)
    assert queue.take() == ["a", "b", "c"]
    assert not queue.ready(0.0)


def test_zero_delay_sends_held_requests_immediately():
    queue = make_queue(batch_size=8, delay_s=0.0)
    queue.add("a", now=1.0, any_worker_idle=False)
    assert queue.ready(1.0)


def test_take_respects_batch_size_and_fifo_order():
    queue = make_queue(batch_size=2)
    for i, item in enumerate("abcde"):
        queue.add(item, now=float(i), any_worker_idle=False)
    assert queue.take() == ["a", "b"]
    assert queue.take() == ["c", "d"]
    assert len(queue) == 1
    assert queue.take() == ["e"]
    assert queue.take() == []


def test_batch_size_one_takes_one_at_a_time():
    queue = make_queue(batch_size=1, delay_s=60.0)
    queue.add("a", now=0.0, any_worker_idle=False)
    queue.add("b", now=0.0, any_worker_idle=False)
    assert queue.ready(0.0)
    assert queue.take() == ["a"]
    assert queue.take() == ["b"]


def test_oldest_request_decides_readiness():
    # The oldest arrived while a worker was idle: the queued batch goes at once, whatever came after.
    queue = make_queue(batch_size=4, delay_s=60.0)
    queue.add("a", now=0.0, any_worker_idle=True)
    queue.add("b", now=0.0, any_worker_idle=False)
    assert queue.ready(0.0)
    assert queue.take() == ["a", "b"]
    # Now the oldest was held while busy: wait for the delay.
    queue.add("c", now=1.0, any_worker_idle=False)
    queue.add("d", now=1.0, any_worker_idle=True)
    assert not queue.ready(1.0)
    assert queue.ready(61.0)


def test_capacity_bound_raises_overflow_error():
    queue = make_queue(capacity=2)
    queue.add("a", now=0.0, any_worker_idle=False)
    assert not queue.is_full()
    queue.add("b", now=0.0, any_worker_idle=False)
    assert queue.is_full()
    with pytest.raises(OverflowError, match="queue full"):
        queue.add("c", now=0.0, any_worker_idle=True)
    assert len(queue) == 2
    assert queue.take() == ["a", "b"]
    assert not queue.is_full()
    queue.add("c", now=1.0, any_worker_idle=True)
    assert queue.take() == ["c"]


def test_remove_by_predicate_returns_dropped_and_keeps_order():
    queue = make_queue(batch_size=10)
    for i in range(6):
        queue.add(i, now=float(i), any_worker_idle=False)  # type: ignore[arg-type]
    dropped = queue.remove(lambda item: item % 2 == 0)
    assert dropped == [0, 2, 4]
    assert len(queue) == 3
    assert queue.take() == [1, 3, 5]


def test_remove_with_no_match_changes_nothing():
    queue = make_queue()
    queue.add("a", now=0.0, any_worker_idle=False)
    assert queue.remove(lambda item: False) == []
    assert len(queue) == 1
    assert queue.next_deadline() == pytest.approx(0.1)


def test_remove_frees_capacity():
    queue = make_queue(capacity=1)
    queue.add("a", now=0.0, any_worker_idle=False)
    assert queue.remove(lambda item: item == "a") == ["a"]
    assert not queue.is_full()
    queue.add("b", now=0.0, any_worker_idle=False)
    assert len(queue) == 1
