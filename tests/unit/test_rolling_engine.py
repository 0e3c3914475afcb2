"""RollingEngine on a tiny seeded Llama: KV budget sizing, cancellation frees room, stop handling."""

from __future__ import annotations

import pytest
from support import tiny_model_script

from engines.base import EngineConfig, EngineLoadError
from engines.rolling.factory import create_rolling_engine
from engines.sequence import held_back
from engines.types import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0))


def engine_for(path, **fields):
    fields = {"max_model_len": 64, "max_rolling_batch_size": 4, "block_size": 16, **fields}
    return create_rolling_engine(EngineConfig(model_path=path, dtype="fp32", **fields))


def test_kv_budget_sizes_the_blocks_and_names_the_numbers(tiny):
    engine = engine_for(tiny)
    per_block = engine.cache.bytes_per_block()
    smaller = engine_for(tiny, kv_cache_memory_bytes=7 * per_block + 5)
    assert smaller.cache.num_blocks == 7
    assert smaller.free_capacity() == engine.free_capacity()  # sequences share blocks; none is reserved
    with pytest.raises(EngineLoadError, match=r"option.kv_cache_memory_bytes\) holds 0 blocks of 16 tokens"):
        engine_for(tiny, kv_cache_memory_bytes=10)


def test_block_size_defaults_to_64_on_cpu(tiny):
    engine = engine_for(tiny, block_size=None, max_model_len=256)
    assert engine.blocks.block_size == engine.cache.block_size == 64


def test_kernels_option_is_checked_at_load(tiny):
    assert engine_for(tiny).model.layers[0].ops.name == "native"  # auto on CPU: the native kernels
    assert engine_for(tiny, kernels="torch").model.layers[0].ops.name == "torch"
    with pytest.raises(EngineLoadError, match="option.kernels='flash' is not one of"):
        engine_for(tiny, kernels="flash")


def test_cancel_frees_the_slot_and_finished_sequences_retire(tiny):
    engine = engine_for(tiny)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    engine.step([GenerationRequest("a", [1, 2, 3], params), GenerationRequest("b", [4, 5], params)], [])
    assert engine.free_capacity() == 2
    events = engine.step([], ["a"])
    assert [e.finish_reason for e in events if e.request_id == "a"] == ["cancelled"]
    assert engine.free_capacity() == 3
    short = SamplingParams(max_new_tokens=1)
    done = engine.step([GenerationRequest("c", [7], short)], [])
    assert any(e.request_id == "c" and e.finish_reason == "length" for e in done)
    assert engine.free_capacity() == 3  # c came and went in one step; b still holds its slot


def test_too_long_request_is_an_error_event(tiny):
    engine = engine_for(tiny)
    events = engine.step([GenerationRequest("x", list(range(1, 60)), SamplingParams(max_new_tokens=10))], [])
    assert events[0].finish_reason == "error"
    assert "59 prompt tokens + max_new_tokens=10 = 69 exceeds option.max_model_len=64" in events[0].error
    assert engine.free_capacity() == 4


def test_held_back_text_that_may_start_a_stop_sequence():
    assert held_back("hello wor", ("world",)) == 3
    assert held_back("hello", ("xyz",)) == 0
    assert held_back("abc", ()) == 0


def test_djl_module_handle_serves_a_llama_with_the_dynamic_batch_handler(tiny):
    import djl_python.huggingface as module
    from djl_python import Input

    init = Input()
    init.properties.update({"model_id": tiny, "dtype": "fp32"})
    assert module.handle(init) is None  # warm-up: loads, never the rolling handler (it has no batches)
    request = Input()
    request.properties["Content-Type"] = "application/json"
    request.content.add("data", b'{"inputs": "hello", "parameters": {"max_new_tokens": 3}}')
    output = module.handle(request)
    assert output.code == 200
    assert "generated_text" in output.content.get("data").decode()


def run_to_end(engine, request: GenerationRequest) -> list:
    """Every event of ``request``, stepping the engine until each completion has finished."""
    events = engine.step([request], [])
    while engine.running:
        events += engine.step([], [])
    return events


def test_greedy_top_logprobs_reach_the_events(tiny):
    engine = engine_for(tiny)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, top_logprobs=3)
    events = run_to_end(engine, GenerationRequest("t", [1, 2, 3], params))
    assert len(events) == 3
    for event in events:
        ids = [t for t, _ in event.top_logprobs]
        values = [lp for _, lp in event.top_logprobs]
        assert len(ids) == 3
        assert ids[0] == event.token_id  # greedy takes the most likely token
        assert values[0] == pytest.approx(event.logprob)
        assert values == sorted(values, reverse=True)
        assert event.top_texts == tuple(engine.tokenizer.decode([t]) for t in ids)


def test_logit_bias_and_stop_token_ids(tiny):
    engine = engine_for(tiny)
    biased = SamplingParams(max_new_tokens=4, ignore_eos=True, logit_bias=((5, 100.0),))
    assert [e.token_id for e in run_to_end(engine, GenerationRequest("b", [1, 2], biased))] == [5] * 4
    free = SamplingParams(max_new_tokens=12, ignore_eos=True)
    tokens = [e.token_id for e in run_to_end(engine, GenerationRequest("p", [1, 2], free))]
    stop_at = next(i for i, t in enumerate(tokens) if i > 0 and t not in tokens[:i])  # a token new at i
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, stop_token_ids=(tokens[stop_at],))
    stopped = run_to_end(engine, GenerationRequest("s", [1, 2], params))
    assert [e.token_id for e in stopped] == tokens[: stop_at + 1]
    assert stopped[-1].finish_reason == "stop_sequence"
    text = engine.tokenizer.decode(tokens[:stop_at], skip_special_tokens=True)
    assert "".join(e.text for e in stopped) == text  # without the stop token's text


def run_all(engine, requests):
    """Step until every completion finished; (request id, index) -> token ids."""
    out: dict[tuple[str, int], list[int]] = {}
    events = engine.step(requests, [])
    while True:
        for event in events:
            if event.token_id >= 0:
                out.setdefault((event.request_id, event.index), []).append(event.token_id)
        if not engine.running:
            return out
        events = engine.step([], [])


def test_n_completions_share_one_prefill_through_the_copied_cache(tiny):
    """Greedy completions 1..n-1 run on a copy of completion 0's prompt cache: if the copy were wrong
    (a position short, another slot's rows), their tokens would differ from a lone n=1 request."""
    prompt = list(range(5, 25))
    alone = run_all(engine_for(tiny), [GenerationRequest("one", prompt, SamplingParams(max_new_tokens=8))])
    engine = engine_for(tiny)
    forked = run_all(engine, [GenerationRequest("three", prompt, SamplingParams(max_new_tokens=8, n=3))])
    assert sorted(forked) == [("three", 0), ("three", 1), ("three", 2)]
    assert all(tokens == alone[("one", 0)] for tokens in forked.values())
    assert engine.free_capacity() == 4  # every forked slot came back


def test_seeded_n_completions_differ_and_completion_0_matches_n_1(tiny):
    sampled = {"max_new_tokens": 8, "do_sample": True, "temperature": 5.0, "seed": 11}
    prompt = list(range(5, 15))
    alone = run_all(engine_for(tiny), [GenerationRequest("a", prompt, SamplingParams(**sampled))])
    pair = run_all(engine_for(tiny), [GenerationRequest("b", prompt, SamplingParams(**sampled, n=2))])
    assert pair[("b", 0)] == alone[("a", 0)]
    assert pair[("b", 1)] != pair[("b", 0)]


def test_a_request_needing_more_slots_than_are_free_is_an_error_event(tiny):
    engine = engine_for(tiny)
    events = engine.step([GenerationRequest("wide", [5, 6], SamplingParams(n=5))], [])
    assert [(e.request_id, e.finish_reason) for e in events] == [("wide", "error")]
    assert "completions need more free sequences" in events[0].error
    assert engine.free_capacity() == 4


def test_device_sampler_path_gives_the_host_samplers_greedy_tokens(tiny):
    """The GPU engine samples with engines/device_sampling.py; forced on here (CPU tensors), greedy
    tokens, their log-probabilities and the top alternatives equal the host sampler's."""
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, top_logprobs=2, repetition_penalty=1.3)
    requests = [GenerationRequest("a", [1, 2, 3], params), GenerationRequest("b", [4, 5, 6, 7], params)]
    host = engine_for(tiny)
    device = engine_for(tiny)
    device.on_device_sampling = True
    expected = [e for r in requests for e in run_to_end(host, r)]
    actual = [e for r in requests for e in run_to_end(device, r)]
    assert [e.token_id for e in actual] == [e.token_id for e in expected]
    for got, want in zip(actual, expected, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [t for t, _ in got.top_logprobs] == [t for t, _ in want.top_logprobs]


def test_a_prefix_cache_hit_gives_the_tokens_of_a_cold_prompt(tiny):
    """The second prompt reuses the first one's full blocks; its tokens equal those of an engine
    without prefix caching, and the hit is reported on its first event."""
    shared = list(range(3, 40))
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    warm = engine_for(tiny)
    run_to_end(warm, GenerationRequest("first", shared + [41], params))
    hit = run_to_end(warm, GenerationRequest("second", shared + [42, 43], params))
    cold = run_to_end(
        engine_for(tiny, enable_prefix_caching=False), GenerationRequest("x", shared + [42, 43], params)
    )
    assert [e.token_id for e in hit] == [e.token_id for e in cold]
    assert hit[0].cached_tokens == 32  # two full blocks of 16
    assert cold[0].cached_tokens == 0
    assert warm.stats().prefix_hit_tokens == 32


def test_chunked_prefill_and_a_full_cache_keep_greedy_outputs(tiny):
    """A 10-token prefill budget splits every prompt; 6 blocks for 3 long sequences force preemption.
    Neither changes a greedy output."""
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    prompts = {"a": list(range(3, 30)), "b": list(range(40, 52)), "c": [7, 8, 9]}
    requests = [GenerationRequest(rid, p, params) for rid, p in prompts.items()]
    alone = {rid: run_all(engine_for(tiny), [r]) for rid, r in zip(prompts, requests, strict=True)}
    per_block = engine_for(tiny).cache.bytes_per_block()
    tight = engine_for(tiny, max_rolling_batch_prefill_tokens=10, kv_cache_memory_bytes=6 * per_block)
    together = run_all(tight, requests)
    assert together == {key: tokens for out in alone.values() for key, tokens in out.items()}
    assert tight.stats().preemptions > 0
    assert tight.blocks.num_free() == 6  # every block came back (sealed ones stay cached, unheld)
