"""BatchQueue policy, driven by explicit `now` values (no real clock, no processes)."""

from __future__ import annotations

import pytest

from serving.batching import BatchQueue


def make_queue(batch_size: int = 4, delay_s: float = 0.125, capacity: int = 100) -> BatchQueue[str]:
    return BatchQueue(batch_size=batch_size, max_batch_delay_s=delay_s, capacity=capacity)


def fill(queue: BatchQueue, items: str, now: float) -> None:
    for item in items:
        queue.add(item, now=now)


def test_empty_queue_is_never_ready_and_has_no_deadline():
    queue = make_queue()
    assert not queue.ready(0.0)
    assert not queue.ready(1e9, any_busy=True)
    assert queue.next_deadline() is None
    assert queue.take() == []


def test_lone_request_without_recent_load_goes_at_once():
    queue = make_queue(batch_size=8, delay_s=10.0)
    queue.add("a", now=5.0)
    assert queue.ready(5.0)
    assert queue.take() == ["a"]


def test_requests_held_while_another_worker_is_busy_wait_for_the_last_batch_size():
    queue = make_queue(batch_size=8, delay_s=0.125)
    fill(queue, "abcd", now=0.0)
    assert queue.take() == ["a", "b", "c", "d"]  # a wave of 4
    fill(queue, "ef", now=0.5)
    assert not queue.ready(0.5, any_busy=True)  # 2 < 4 expected while the wave is on
    fill(queue, "gh", now=0.5625)
    assert queue.ready(0.5625, any_busy=True)
    assert queue.take() == ["e", "f", "g", "h"]


def test_held_requests_go_at_the_delay_even_if_the_wave_is_short():
    queue = make_queue(batch_size=8, delay_s=0.125)
    fill(queue, "abcd", now=0.0)
    queue.take()
    queue.batch_done(1.0)
    queue.add("e", now=1.0)
    assert not queue.ready(1.0)
    assert queue.next_deadline() == 1.125
    assert queue.ready(1.125)


def test_wave_ends_after_an_idle_gap_longer_than_the_delay():
    queue = make_queue(batch_size=8, delay_s=0.125)
    fill(queue, "abcd", now=0.0)
    queue.take()
    queue.batch_done(1.0)
    queue.add("e", now=1.5)  # arrived long after the last batch finished: nobody else is coming
    assert queue.ready(1.5)


def test_closed_loop_fleet_converges_to_full_batches():
    # 16 clients that each resend 0.5 ms apart after their answers; a policy that dispatches the
    # first arrival alone settles into alternating batches of 1 and 15.
    queue = make_queue(batch_size=16, delay_s=0.01)
    arrivals = [i * 0.0005 for i in range(16)]
    now, sizes = 0.0, []
    for _ in range(8):
        while not queue.ready(now):
            while arrivals and arrivals[0] <= now:
                queue.add("r", now=arrivals.pop(0))
            if not queue.ready(now):
                now += 0.00025
        batch = queue.take()
        sizes.append(len(batch))
        now += 0.05  # the forward pass
        queue.batch_done(now)
        arrivals = sorted(arrivals + [now + i * 0.0005 for i in range(len(batch))])
    assert sizes[-3:] == [16, 16, 16], sizes


@pytest.mark.parametrize("arrived", [10.0, 1234.567, 98765.4321])
def test_held_batch_is_ready_at_its_own_next_deadline(arrived: float):
    queue = make_queue(batch_size=4, delay_s=0.1)
    fill(queue, "abcd", now=arrived - 1)
    queue.take()
    queue.add("a", now=arrived)
    deadline = queue.next_deadline()
    assert deadline is not None
    assert not queue.ready(arrived, any_busy=True)
    assert queue.ready(deadline, any_busy=True)


def test_full_batch_goes_at_once():
    queue = make_queue(batch_size=3, delay_s=100.0)
    fill(queue, "abc", now=0.0)
    queue.take()
    fill(queue, "de", now=1.0)
    assert not queue.ready(1.0, any_busy=True)
    queue.add("f", now=1.0)
    assert queue.ready(1.0, any_busy=True)


def test_zero_delay_never_holds():
    queue = make_queue(batch_size=8, delay_s=0.0)
    fill(queue, "abcd", now=0.0)
    queue.take()
    queue.add("e", now=1.0)
    assert queue.ready(1.0, any_busy=True)


def test_take_respects_batch_size_and_fifo_order():
    queue = make_queue(batch_size=2)
    fill(queue, "abcde", now=0.0)
    assert queue.take() == ["a", "b"]
    assert queue.take() == ["c", "d"]
    assert queue.take() == ["e"]
    assert queue.take() == []


def test_capacity_bound_raises_overflow_error():
    queue = make_queue(capacity=2)
    fill(queue, "ab", now=0.0)
    assert queue.is_full()
    with pytest.raises(OverflowError, match="queue full"):
        queue.add("c", now=0.0)
    assert queue.take() == ["a", "b"]
    assert not queue.is_full()


def test_discard_by_key_returns_the_item_and_keeps_order():
    queue = make_queue(batch_size=10)
    for i in range(6):
        queue.add(f"item{i}", now=float(i), key=f"id{i}")
    assert queue.discard("id2") == "item2"
    assert queue.discard("id2") is None  # already gone
    assert queue.discard("unknown") is None
    assert queue.take() == ["item0", "item1", "item3", "item4", "item5"]


def test_discard_updates_the_deadline_and_frees_capacity():
    queue = make_queue(capacity=2, delay_s=1.0)
    queue.add("a", now=3.0, key="a")
    queue.add("b", now=3.5, key="b")
    assert queue.next_deadline() == 4.0
    assert queue.discard("a") == "a"
    assert queue.next_deadline() == 4.5
    assert not queue.is_full()


def test_duplicate_keys_and_backwards_clocks_are_refused():
    queue = make_queue()
    queue.add("a", now=1.0, key="k")
    with pytest.raises(KeyError):
        queue.add("b", now=1.0, key="k")
    with pytest.raises(ValueError, match="backwards"):
        queue.add("c", now=0.5)


def test_expire_hands_back_the_oldest_first_and_only_those_past_max_wait():
    queue = BatchQueue(batch_size=4, max_batch_delay_s=0.0, capacity=100, max_wait_s=10.0)
    for i, now in enumerate((0.0, 1.0, 2.0, 3.0)):
        queue.add(i, now=now)
    assert queue.next_expiry() == 10.0
    assert queue.expire(10.0) == []  # exactly at the deadline is still in time
    assert queue.expire(11.5) == [0, 1]
    assert queue.next_expiry() == 12.0
    assert queue.expire(100.0) == [2, 3]
    assert queue.next_expiry() is None
    assert len(queue) == 0


def test_drain_empties_the_queue():
    queue = make_queue()
    fill(queue, "abc", now=0.0)
    assert queue.drain() == ["a", "b", "c"]
    assert len(queue) == 0
    assert queue.take() == []


class CountingNow(float):
    """A clock value that counts how often a queued deadline is compared with it."""

    compared = 0

    def __lt__(self, other: object) -> bool:
        CountingNow.compared += 1
        return float(self) < other  # type: ignore[operator]

    def __gt__(self, other: object) -> bool:
        CountingNow.compared += 1
        return float(self) > other  # type: ignore[operator]


class CountingKey(str):
    """A request id that counts how often the queue hashes or compares it."""

    touched = 0

    def __hash__(self) -> int:
        CountingKey.touched += 1
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        CountingKey.touched += 1
        return str.__eq__(self, other)


def work_per_event(queued: int) -> tuple[int, int]:
    """(deadline comparisons of one expiry check, key operations of one cancel) with `queued` waiting."""
    queue = BatchQueue(batch_size=1, max_batch_delay_s=0.0, capacity=queued + 1, max_wait_s=60.0)
    keys = [CountingKey(f"request-{i}") for i in range(queued)]
    for i, key in enumerate(keys):
        queue.add(i, now=float(i) / queued, key=key)
    CountingNow.compared = 0
    assert queue.expire(CountingNow(30.0)) == []
    compared = CountingNow.compared
    CountingKey.touched = 0
    assert queue.discard(keys[queued // 2]) == queued // 2
    return compared, CountingKey.touched


def test_the_work_per_event_does_not_grow_with_the_queue():
    """Counted, not timed: the broker checks expiry on every message and cancels one by key."""
    small, large = work_per_event(10), work_per_event(10_000)
    assert large == small
    assert small[0] >= 1
    assert small[1] >= 1
