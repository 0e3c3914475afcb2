"""StepPlanner: decodes first, chunked prefill within a token budget, FIFO, preemption by recompute.

No model runs: ``_step`` plays the engine (plan, count the tokens as computed, append a token to every
sequence whose chunk reached its end), and ``_check`` asserts the invariants every plan must keep.
"""

from __future__ import annotations

import random

from engines.paging.block_manager import BlockManager
from engines.paging.planner import Scheduled, StepPlanner
from engines.sequence import Sequence
from engines.types import GenerationRequest, SamplingParams

SIZE = 4


class Tokenizer:
    """What Sequence calls: decode (its incremental detokenizer)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def _seq(
    name: str, prompt_len: int, max_new_tokens: int = 8, first: int | None = None, **params: object
) -> Sequence:
    """Prompt ids count up from ``first``; by default from a number of the name's own, so prompts of
    different names share no prefix-cache block."""
    start = 100 * sum(map(ord, name)) if first is None else first
    return _seq_of(name, list(range(start, start + prompt_len)), max_new_tokens, **params)


def _seq_of(name: str, prompt: list[int], max_new_tokens: int, **params: object) -> Sequence:
    request = GenerationRequest(name, prompt, SamplingParams(max_new_tokens=max_new_tokens, **params))
    return Sequence(request, -1, Tokenizer(), set())


def _planner(num_blocks: int, prefill_tokens: int = 64) -> StepPlanner:
    return StepPlanner(BlockManager(num_blocks, SIZE), prefill_tokens)


def _check(planner: StepPlanner, plan: list[Scheduled]) -> None:
    """Every planned sequence runs and holds blocks for its chunk; waiting ones hold nothing; each
    block's reference count is the number of sequences holding it."""
    blocks = planner.blocks
    assert len({id(item.seq) for item in plan}) == len(plan)
    for item in plan:
        seq = item.seq
        assert seq in planner.running
        assert 1 <= item.num_tokens <= seq.uncomputed()
        assert blocks.blocks_for(seq.num_cached + item.num_tokens) <= len(seq.blocks)
    assert not {id(s) for s in planner.waiting} & {id(s) for s in planner.running}
    assert all(not s.blocks and s.num_cached == 0 for s in planner.waiting)
    holders: dict[int, int] = {}
    for seq in planner.running:
        assert len(seq.blocks) == len(set(seq.blocks))
        for block in seq.blocks:
            holders[block] = holders.get(block, 0) + 1
    assert all(blocks._refs[b] == holders.get(b, 0) for b in range(blocks.num_blocks))


class FakeCache:
    """What each cache row holds, as the model would compute it: a row's K/V depend on its token and
    every token before it, so a row is keyed by the whole prefix up to it."""

    def __init__(self) -> None:
        self.rows: dict[tuple[int, int], tuple[int, ...]] = {}

    def forward(self, plan: list[Scheduled]) -> None:
        """Check that every cached row a chunk attends is its own sequence's, then write the chunk's."""
        for item in plan:
            seq = item.seq
            for position in range(seq.num_cached + item.num_tokens):
                where = (seq.blocks[position // SIZE], position % SIZE)
                if position < seq.num_cached:
                    assert self.rows[where] == tuple(seq.token_ids[: position + 1])
                else:
                    self.rows[where] = tuple(seq.token_ids[: position + 1])


def _step(planner: StepPlanner) -> list[tuple[str, int]]:
    """One engine step without the model; (name, tokens) of each planned sequence."""
    return [(name, tokens) for name, tokens, _ in _step_samples(planner)]


def _step_samples(planner: StepPlanner, cache: FakeCache | None = None) -> list[tuple[str, int, bool]]:
    """One engine step: (name, tokens, samples) of each planned sequence (``samples`` read before the
    tokens count as computed, as the engine does); finished sequences release their blocks."""
    plan = planner.plan()
    _check(planner, plan)
    if cache is not None:
        cache.forward(plan)
    summary = [(item.seq.request_id, item.num_tokens, item.samples) for item in plan]
    for item in plan:
        planner.computed(item)
    for item, (_, _, samples) in zip(plan, summary, strict=True):
        if samples and item.seq.append(1000 + len(item.seq.output_ids), 0.0).finish_reason:
            planner.finish(item.seq)
    return summary


def test_decodes_come_before_prefills() -> None:
    planner = _planner(32)
    planner.add(_seq("a", 5))
    planner.add(_seq("b", 6))
    assert _step(planner) == [("a", 5), ("b", 6)]
    planner.add(_seq("c", 7))
    assert _step_samples(planner) == [("a", 1, True), ("b", 1, True), ("c", 7, True)]


def test_prefill_budget_splits_a_long_prompt_across_steps() -> None:
    planner = _planner(32, prefill_tokens=8)
    decoding, long = _seq("decoding", 3), _seq("long", 20)
    planner.add(decoding)
    _step(planner)
    planner.add(long)
    assert [_step_samples(planner)[1] for _ in range(3)] == [
        ("long", 8, False),  # the decode before it does not count against the prompt budget
        ("long", 8, False),
        ("long", 4, True),
    ]
    assert long.output_ids == [1000]
    assert (long.num_cached, len(long.blocks)) == (20, 5)  # the generated token takes a block when fed
    assert _step(planner) == [("decoding", 1), ("long", 1)]


def test_budget_is_shared_oldest_prompt_first() -> None:
    planner = _planner(32, prefill_tokens=10)
    for name, length in (("a", 7), ("b", 7), ("c", 7)):
        planner.add(_seq(name, length))
    assert _step(planner) == [("a", 7), ("b", 3)]
    assert _step(planner) == [("a", 1), ("b", 4), ("c", 6)]
    assert _step(planner) == [("a", 1), ("b", 1), ("c", 1)]


def test_a_later_prompt_never_overtakes_one_waiting_for_room() -> None:
    """The head needs its whole prompt at once (prompt log-probabilities) and the free blocks cannot
    hold it; a short prompt behind it would fit but must wait."""
    planner = _planner(5)
    running = _seq("running", 9, max_new_tokens=2)  # 3 blocks, then 1 more for its generated tokens
    planner.add(running)
    _step(planner)
    whole, short = _seq("whole", 12, prompt_logprobs=True), _seq("short", 2)
    planner.add(whole)
    planner.add(short)
    assert _step(planner) == [("running", 1)]  # 2 blocks left: the 3-block prompt waits
    assert list(planner.waiting) == [whole, short]
    assert not whole.blocks
    assert _step(planner) == [("whole", 12), ("short", 2)]  # "running" finished


def test_a_whole_prompt_waits_for_a_step_where_it_comes_first() -> None:
    planner = _planner(32, prefill_tokens=10)
    planner.add(_seq("a", 6))
    planner.add(_seq("whole", 14, prompt_logprobs=True))
    planner.add(_seq("c", 2))
    assert _step(planner) == [("a", 6)]  # 4 tokens of budget left: neither starts
    assert _step(planner) == [("a", 1), ("whole", 14)]  # over the budget, but whole
    assert _step(planner) == [("a", 1), ("whole", 1), ("c", 2)]


def test_prompt_logprobs_prompt_skips_the_prefix_cache() -> None:
    planner = _planner(32, prefill_tokens=4)
    planner.add(_seq("first", 9, first=0))
    for _ in range(3):
        _step(planner)
    whole = _seq("whole", 9, first=0, prompt_logprobs=True)
    planner.add(whole)
    # logits for every prompt token: nothing is reused though "first" cached the same two blocks
    assert _step_samples(planner)[-1] == ("whole", 9, True)


def test_prefix_cache_hits_skip_the_computed_blocks() -> None:
    planner = _planner(32)
    planner.add(_seq("first", 10, first=0))
    _step(planner)
    second = _seq("second", 11, first=0)  # the same ten tokens and one more
    planner.add(second)
    assert _step(planner) == [("first", 1), ("second", 3)]
    assert second.block_keys == planner.running[0].block_keys[:2]
    assert second.blocks[:2] == planner.running[0].blocks[:2]
    assert planner.blocks.stats.hit_tokens == 8


def test_running_out_of_blocks_preempts_the_latest_started_which_recomputes_later() -> None:
    planner = _planner(4)  # 16 tokens
    early, late = _seq("early", 6, max_new_tokens=5), _seq("late", 6, max_new_tokens=5, first=50)
    planner.add(early)
    planner.add(late)
    assert _step(planner) == [("early", 6), ("late", 6)]  # 2 blocks each: the cache is full
    assert _step(planner) == [("early", 1), ("late", 1)]
    assert _step(planner) == [("early", 1), ("late", 1)]  # positions 7: blocks full
    newcomer = _seq("newcomer", 2)
    planner.add(newcomer)
    # "early" needs a third block at position 8: "late" (started last) gives its blocks back
    assert _step(planner) == [("early", 1)]
    assert (late.num_cached, late.blocks, late.block_keys, late.preemptions) == (0, [], [], 1)
    assert planner.preemptions == 1
    assert list(planner.waiting) == [late, newcomer]  # at the front, ahead of a later arrival
    assert late.output_ids == [1000, 1001, 1002]  # kept: the recompute feeds them again
    assert _step(planner) == [("early", 1)]  # its fifth token: it finishes
    assert early not in planner.running
    # "late" restarts: its first (sealed, unevicted) block is a prefix hit, the other 5 tokens recompute
    assert _step_samples(planner) == [("late", 5, True), ("newcomer", 2, True)]
    assert late.output_ids == [1000, 1001, 1002, 1003]


def test_a_sequence_in_the_plan_is_never_preempted_in_that_step() -> None:
    """Two decoding sequences each need a block and one is free: the first takes it, the second is
    the latest started and preempts itself instead of the one already planned."""
    planner = _planner(5)
    first, second = _seq("first", 8, max_new_tokens=3), _seq("second", 8, max_new_tokens=3, first=50)
    planner.add(first)
    planner.add(second)
    _step(planner)  # 4 blocks held, one free; both now need a third block
    assert _step(planner) == [("first", 1)]
    assert list(planner.waiting) == [second]
    assert second.preemptions == 1
    assert first.preemptions == 0


def test_random_workloads_keep_the_invariants_and_the_cache_contents() -> None:
    """Small caches, shared prefixes, whole prompts, budgets and finishes: every plan passes ``_check``,
    every row a sequence reads (prefix hits included) holds its own tokens, and every sequence
    finishes with all its tokens."""
    for seed in range(40):
        rng = random.Random(seed)
        planner = _planner(rng.randint(7, 12), prefill_tokens=rng.choice([3, 8, 16]))
        cache = FakeCache()
        # two token ids only: equal blocks after different prefixes, and shared prefixes, are common
        seqs = [
            _seq_of(str(i), [rng.randint(0, 1) for _ in range(rng.randint(1, 20))], rng.randint(1, 8),
                    prompt_logprobs=rng.random() < 0.15)
            for i in range(rng.randint(2, 7))
        ]  # fmt: skip
        pending = list(seqs)
        for _ in range(400):
            if pending and rng.random() < 0.5:
                planner.add(pending.pop(0))
            _step_samples(planner, cache)
            if not pending and not len(planner):
                break
        assert not len(planner), f"seed {seed}: stuck"
        assert all(len(s.output_ids) == s.params.max_new_tokens for s in seqs)
        assert planner.blocks.num_free() == planner.blocks.num_blocks


def test_a_prompt_waiting_for_room_counts_once_in_the_prefix_stats() -> None:
    planner = _planner(4)
    planner.add(_seq("big", 12, max_new_tokens=4))  # prompt and generated tokens fill the cache
    _step(planner)
    planner.add(_seq("waits", 9))
    for _ in range(3):
        assert _step(planner) == [("big", 1)]
    assert planner.blocks.stats.queried_tokens == 12  # counted when it starts, not per waiting step
    for _ in range(20):
        _step(planner)
    assert not len(planner)
    assert planner.blocks.stats.queried_tokens == 12 + 9


def test_finish_releases_blocks_and_leaves_sealed_ones_cached() -> None:
    planner = _planner(8)
    done, waiting = _seq("done", 9), _seq("waiting", 3)
    planner.add(done)
    _step(planner)
    assert planner.blocks.num_free() == 5
    planner.finish(done)
    assert done.blocks == []
    assert done not in planner.running
    assert planner.blocks.num_free() == 8
    assert planner.blocks.num_cached() == 2
    planner.add(waiting)
    planner.finish(waiting)
    assert not len(planner)
    assert planner.plan() == []
