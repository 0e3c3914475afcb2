"""Overlapped steps (option.async_scheduling): step N+1 is queued before step N's tokens are read.

On a GPU that is what lets detokenising and stop checks run while the device computes. The logic is
device-independent, so here it runs on CPU tensors with the device sampler forced on, and every event
of a mixed workload must equal the one-step-at-a-time engine's.
"""

from __future__ import annotations

import pytest
import torch
from support import tiny_model_script

from engines.base import EngineConfig
from engines.rolling.factory import create_rolling_engine
from engines.types import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0))


def engine_for(path, overlap: bool, **fields):
    fields = {
        "max_model_len": 96,
        "max_rolling_batch_size": 8,
        "async_scheduling": overlap,
        "block_size": 16,
        **fields,
    }
    engine = create_rolling_engine(EngineConfig(model_path=path, dtype="fp32", **fields))
    engine.on_device_sampling = True  # engines/device_sampling.py on CPU tensors, as on a GPU
    engine.overlap = overlap
    return engine


def drive(engine, schedule: dict[int, list[GenerationRequest]], cancels: dict[int, list[str]] | None = None):
    """Step until idle, admitting ``schedule[k]`` and cancelling ``cancels[k]`` at call k; every event
    in order, and the number of calls."""
    cancels = cancels or {}
    events, call = [], 0
    while call <= max(schedule) or engine.running or engine.pending is not None:
        events += engine.step(schedule.get(call, []), cancels.get(call, []))
        call += 1
        assert call < 500, "the engine never went idle"
    return events, call


def by_completion(events) -> dict[tuple[str, int], list[tuple]]:
    out: dict[tuple[str, int], list[tuple]] = {}
    for e in events:
        row = (e.token_id, e.text, e.finish_reason, tuple(t for t, _ in e.top_logprobs))
        out.setdefault((e.request_id, e.index), []).append(row)
    return out


def mixed_workload(tokenizer) -> dict[int, list[GenerationRequest]]:
    greedy = SamplingParams(max_new_tokens=20, ignore_eos=True, top_logprobs=2)
    stop_text = tokenizer.decode([45, 46])
    return {
        0: [
            GenerationRequest("greedy", list(range(3, 40)), greedy),
            GenerationRequest("short", [5, 6, 7], SamplingParams(max_new_tokens=1)),
            GenerationRequest(
                "seeded",
                list(range(8, 20)),
                SamplingParams(max_new_tokens=16, do_sample=True, temperature=3.0, top_k=50, seed=7),
            ),
        ],
        2: [
            GenerationRequest("forked", list(range(60, 81)), SamplingParams(max_new_tokens=9, n=2)),
            GenerationRequest(
                "stops", [45, 46, 47], SamplingParams(max_new_tokens=30, stop_sequences=(stop_text,))
            ),
        ],
        5: [
            GenerationRequest(
                "penalised",
                list(range(3, 40)) + [9],
                SamplingParams(max_new_tokens=12, repetition_penalty=1.5),
            ),
            GenerationRequest(
                "scored",
                [11, 12, 13, 14],
                SamplingParams(max_new_tokens=4, prompt_logprobs=True, ignore_eos=True),
            ),
        ],
    }


def test_overlapped_steps_give_every_event_of_one_step_at_a_time(tiny):
    """Greedy, seeded sampling, n=2 forks, stop sequences, max_new_tokens=1, penalties (read before
    planning ahead), prompt log-probabilities and prefix-cache hits (greedy and penalised share 37
    tokens), admitted over several calls."""
    sync, overlapped = engine_for(tiny, overlap=False), engine_for(tiny, overlap=True)
    expected, _ = drive(sync, mixed_workload(sync.tokenizer))
    actual, _ = drive(overlapped, mixed_workload(overlapped.tokenizer))
    assert by_completion(actual) == by_completion(expected)
    assert len(by_completion(actual)) == 8
    ordered = sorted(actual, key=lambda e: (e.request_id, e.index))  # stable: each completion in order
    for got, want in zip(ordered, sorted(expected, key=lambda e: (e.request_id, e.index)), strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
    hits = {e.request_id: e.cached_tokens for e in actual if e.cached_tokens}
    assert hits == {e.request_id: e.cached_tokens for e in expected if e.cached_tokens} == {"penalised": 32}
    scored = [e.prompt_tokens for e in actual if e.request_id == "scored" and e.prompt_tokens]
    assert [len(tokens) for tokens in scored] == [4]
    for engine in (sync, overlapped):
        assert engine.blocks.num_free() == engine.blocks.num_blocks  # wasted rows' blocks came back too
        assert not engine.planner.running
        assert not engine.sequences


def test_chunked_prefill_and_preemption_with_unread_tokens(tiny):
    """A 10-token prefill budget and 7 blocks for four sequences: preempted sequences recompute
    tokens that may still be unread on the device; outputs stay those of the unpressed engine."""
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    prompts = {"a": list(range(3, 30)), "b": list(range(40, 52)), "c": [7, 8, 9], "d": list(range(90, 99))}
    schedule = {0: [GenerationRequest(rid, p, params) for rid, p in prompts.items()]}
    roomy, _ = drive(engine_for(tiny, overlap=False), schedule)
    per_block = engine_for(tiny, overlap=False).cache.bytes_per_block()
    tight = engine_for(
        tiny, overlap=True, max_rolling_batch_prefill_tokens=10, kv_cache_memory_bytes=7 * per_block
    )
    pressed, _ = drive(tight, schedule)
    assert by_completion(pressed) == by_completion(roomy)
    assert tight.stats().preemptions > 0
    assert tight.blocks.num_free() == 7


def test_results_arrive_one_call_later_and_stopped_rows_are_void(tiny):
    """The first call queues the prompt and returns nothing; each later call returns the previous
    step's token. A sequence that stopped at step N had a row in step N+1: it yields no event."""
    engine = engine_for(tiny, overlap=True)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    free = drive(engine_for(tiny, overlap=False), {0: [GenerationRequest("p", [1, 2], params)]})[0]
    stop_id = free[3].token_id  # an id the greedy run samples fourth
    first = next(i for i, e in enumerate(free) if e.token_id == stop_id)
    stopping = SamplingParams(max_new_tokens=20, ignore_eos=True, stop_token_ids=(stop_id,))
    assert engine.step([GenerationRequest("s", [1, 2], stopping)], []) == []
    assert engine.pending is not None
    events = []
    while engine.running or engine.pending is not None:
        got = engine.step([], [])
        assert len(got) <= 1
        events += got
    assert [e.token_id for e in events] == [e.token_id for e in free[: first + 1]]
    assert events[-1].finish_reason == "stop_sequence"
    assert engine.steps == first + 2  # the row after the stop was computed, then dropped
    assert engine.blocks.num_free() == engine.blocks.num_blocks
    capped = engine_for(tiny, overlap=True, max_model_len=24)
    drive(
        capped,
        {0: [GenerationRequest("c", [1, 2, 3, 4], SamplingParams(max_new_tokens=20, ignore_eos=True))]},
    )
    assert capped.steps == 20  # a sequence with its last token reserved is not planned again


def test_cancel_while_a_step_is_unread(tiny):
    engine = engine_for(tiny, overlap=True)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    requests = [GenerationRequest("keep", [1, 2, 3], params), GenerationRequest("drop", [4, 5], params)]
    events, _ = drive(engine, {0: requests}, {3: ["drop"]})
    dropped = [e for e in events if e.request_id == "drop"]
    assert dropped[-1].finish_reason == "cancelled"
    assert [e.finish_reason for e in dropped].count("cancelled") == 1
    assert all(e.finish_reason is None for e in dropped[:-1])
    assert len(dropped) <= 3
    kept = [e for e in events if e.request_id == "keep"]
    assert len(kept) == 40
    assert kept[-1].finish_reason == "length"
    assert engine.blocks.num_free() == engine.blocks.num_blocks


def test_a_failed_step_forgets_the_unread_one(tiny):
    engine = engine_for(tiny, overlap=True)
    engine.step([GenerationRequest("x", [1, 2, 3], SamplingParams(max_new_tokens=8))], [])
    assert engine.pending is not None
    aborted = engine.abort_all("boom")
    assert [(e.request_id, e.finish_reason) for e in aborted] == [("x", "error")]
    assert engine.pending is None
    assert engine.step([], []) == []
    assert engine.blocks.num_free() == engine.blocks.num_blocks


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_queuing_a_step_never_waits_for_the_device(tiny):
    """No blocking copy, .item() or stream sync while a step is queued (torch's sync debug mode raises
    on each), and the overlapped GPU engine's greedy tokens equal its one-step-at-a-time run's."""
    config = {
        "model_path": tiny,
        "dtype": "fp32",
        "device": "cuda",
        "max_model_len": 96,
        "max_rolling_batch_size": 8,
    }
    overlapped = create_rolling_engine(EngineConfig(**config))
    assert overlapped.overlap
    launch = overlapped._launch

    def strict(plan, pending):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(plan, pending)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    overlapped._launch = strict
    workload = mixed_workload(overlapped.tokenizer)
    workload[5] = [r for r in workload[5] if not r.params.prompt_logprobs]  # those read logits at once
    actual, _ = drive(overlapped, workload)
    expected, _ = drive(create_rolling_engine(EngineConfig(**config, async_scheduling=False)), workload)
    greedy = {key: rows for key, rows in by_completion(expected).items() if key[0] != "seeded"}
    assert {key: rows for key, rows in by_completion(actual).items() if key[0] != "seeded"} == greedy
