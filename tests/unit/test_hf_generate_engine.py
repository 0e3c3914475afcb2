"""HfGenerateEngine on tiny seeded GPT-2, T5 and Llama models: parity with `generate` and with the
native engine, streaming one token per step, cancellation, n > 1 with seeds, per-request errors."""

from __future__ import annotations

import pytest
import torch
from support import generation_models

from engines.base import EngineConfig, EngineLoadError, GenerationEngine
from engines.hf.generate_engine import HfGenerateEngine, create_hf_generate_engine
from engines.types import GenerationRequest, SamplingParams, TokenEvent

PROMPTS = ("The capital of France is", "Hello", "One, two, three, four, five, six, seven")
GREEDY = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return generation_models(tmp_path_factory.mktemp("models"))


def engine_for(path: str, **fields: int) -> HfGenerateEngine:
    return create_hf_generate_engine(EngineConfig(model_path=path, dtype="fp32", **fields))


def requests_for(engine, params: SamplingParams = GREEDY, prompts=PROMPTS) -> list[GenerationRequest]:
    return [
        GenerationRequest(f"r{i}", engine.tokenizer(p)["input_ids"], params) for i, p in enumerate(prompts)
    ]


def run_to_end(engine, requests: list[GenerationRequest]) -> dict[tuple[str, int], list[TokenEvent]]:
    """Step until every completion has its final event; events per (request id, index)."""
    streams: dict[tuple[str, int], list[TokenEvent]] = {}
    expected = {(r.request_id, i) for r in requests for i in range(r.params.n)}
    events = engine.step(requests, [])
    for _ in range(100):
        for event in events:
            streams.setdefault((event.request_id, event.index), []).append(event)
        if all(key in streams and streams[key][-1].finish_reason for key in expected):
            return streams
        events = engine.step([], [])
    raise AssertionError(f"not finished after 100 steps: {streams}")


def tokens_of(streams, request_id: str, index: int = 0) -> list[int]:
    return [event.token_id for event in streams[(request_id, index)]]


def hf_greedy(engine: HfGenerateEngine, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """`model.generate` on the prompt alone (no padding), cut after the first eos as the engine stops."""
    inputs = torch.tensor([prompt_ids])
    with torch.inference_mode():
        output = engine.model.generate(
            inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens, do_sample=False
        )
    start = 1 if engine.is_seq2seq else len(prompt_ids)  # seq2seq output starts with the decoder start token
    ids = output[0, start:].tolist()
    eos_at = next((i for i, token in enumerate(ids) if token in engine.eos_ids), None)
    return ids if eos_at is None else ids[: eos_at + 1]


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_greedy_batch_matches_generate_token_for_token(models, kind):
    engine = engine_for(models[kind])
    requests = requests_for(engine)
    assert len({len(r.prompt_ids) for r in requests}) == 3  # padding is exercised
    streams = run_to_end(engine, requests)
    expected = {r.request_id: hf_greedy(engine, r.prompt_ids, GREEDY.max_new_tokens) for r in requests}
    assert {r.request_id: tokens_of(streams, r.request_id) for r in requests} == expected
    assert max(len(set(tokens)) for tokens in expected.values()) > 3  # the wide init makes outputs vary
    text = "".join(e.text for e in streams[("r2", 0)])
    assert text == engine.tokenizer.decode(tokens_of(streams, "r2"), skip_special_tokens=True)


def test_greedy_matches_the_native_rolling_engine(models):
    from engines.rolling.factory import create_rolling_engine

    rolling = create_rolling_engine(EngineConfig(models["llama"], dtype="fp32", max_model_len=64))
    engine = engine_for(models["llama"])
    ours, theirs = run_to_end(engine, requests_for(engine)), run_to_end(rolling, requests_for(engine))
    for request_id in ("r0", "r1", "r2"):
        assert tokens_of(ours, request_id) == tokens_of(theirs, request_id)
        assert [e.text for e in ours[(request_id, 0)]] == [e.text for e in theirs[(request_id, 0)]]
        assert ours[(request_id, 0)][-1].finish_reason == theirs[(request_id, 0)][-1].finish_reason


def test_events_stream_one_token_per_step_and_finished_rows_go_quiet(models):
    engine = engine_for(models["gpt2"], max_rolling_batch_size=4)
    assert isinstance(engine, GenerationEngine)
    short, long = SamplingParams(max_new_tokens=1), SamplingParams(max_new_tokens=3)
    first = engine.step([GenerationRequest("s", [5, 6], short), GenerationRequest("l", [7], long)], [])
    assert [(e.request_id, e.finish_reason) for e in first] == [("s", "length"), ("l", None)]
    assert engine.free_capacity() == 0  # nobody joins a running batch
    assert engine.stats().running == 2  # s keeps its row until the batch ends
    assert [(e.request_id, e.finish_reason) for e in engine.step([], [])] == [("l", None)]
    assert [(e.request_id, e.finish_reason) for e in engine.step([], [])] == [("l", "length")]
    assert engine.free_capacity() == 4
    assert engine.stats().running == 0
    assert engine.stats().steps == 3
    assert engine.step([], []) == []


def test_requests_admitted_past_capacity_wait_for_the_next_batch(models):
    engine = engine_for(models["gpt2"], max_rolling_batch_size=2)
    two = SamplingParams(max_new_tokens=2)
    first = engine.step([GenerationRequest(rid, [5, 6], two) for rid in ("a", "b", "c")], [])
    assert [e.request_id for e in first] == ["a", "b"]  # c does not fit the 2 rows
    late = engine.step([GenerationRequest("d", [7], two)], [])  # the scheduler should not, but may
    assert [(e.request_id, e.finish_reason) for e in late] == [("a", "length"), ("b", "length")]
    assert engine.free_capacity() == 0  # c and d are still waiting inside the engine
    assert [e.request_id for e in engine.step([], [])] == ["c", "d"]
    assert [e.finish_reason for e in engine.step([], [])] == ["length", "length"]
    assert engine.free_capacity() == 2


def test_cancel_mid_batch_answers_and_frees_the_batch(models):
    engine = engine_for(models["t5"], max_rolling_batch_size=4)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    engine.step([GenerationRequest("a", [5, 6, 1], params), GenerationRequest("b", [7, 1], params)], [])
    events = engine.step([], ["a"])
    assert [(e.request_id, e.finish_reason) for e in events] == [("a", "cancelled"), ("b", None)]
    assert engine.free_capacity() == 0
    assert [(e.request_id, e.finish_reason) for e in engine.step([], ["b"])] == [("b", "cancelled")]
    assert engine.free_capacity() == 4
    assert engine.stats().running == 0
    again = engine.step([GenerationRequest("c", [8, 1], SamplingParams(max_new_tokens=1))], [])
    assert [(e.request_id, e.finish_reason) for e in again] == [("c", "length")]


def test_n_completions_are_indexed_distinct_and_seeded(models):
    engine = engine_for(models["gpt2"])
    ids = engine.tokenizer("Hello world")["input_ids"]
    params = SamplingParams(max_new_tokens=6, do_sample=True, seed=7, n=2, ignore_eos=True)
    streams = run_to_end(engine, [GenerationRequest("x", ids, params)])
    assert sorted(streams) == [("x", 0), ("x", 1)]
    assert tokens_of(streams, "x", 0) != tokens_of(streams, "x", 1)
    assert [e.finish_reason for e in streams[("x", 1)]] == [None] * 5 + ["length"]
    # A seeded completion depends on its seed only: not on the batch around it, and index 0 is n=1.
    alone = SamplingParams(max_new_tokens=6, do_sample=True, seed=7, ignore_eos=True)
    crowd = [GenerationRequest("x", ids, alone), *requests_for(engine)]
    assert tokens_of(run_to_end(engine, crowd), "x") == tokens_of(streams, "x", 0)


def test_a_too_long_request_errors_while_another_in_the_step_succeeds(models):
    engine = engine_for(models["gpt2"])
    assert engine.max_model_len == 128  # GPT-2's n_positions
    too_long = GenerationRequest("big", list(range(1, 121)), SamplingParams(max_new_tokens=10))
    fine = GenerationRequest("ok", [5, 6], SamplingParams(max_new_tokens=1))
    events = engine.step([too_long, fine], [])
    assert [(e.request_id, e.finish_reason) for e in events] == [("big", "error"), ("ok", "length")]
    assert "120 prompt tokens + max_new_tokens=10 = 130 exceeds option.max_model_len=128" in events[0].error
    assert engine.check_length(120, 8) is None
    empty = engine.step([GenerationRequest("empty", [], GREEDY)], [])
    assert empty[0].finish_reason == "error"
    assert "empty" in empty[0].error
    assert engine.free_capacity() == engine.capacity


def test_abort_all_ends_every_completion_with_an_error(models):
    engine = engine_for(models["gpt2"])
    params = SamplingParams(max_new_tokens=20, n=2)
    engine.step([GenerationRequest("a", [5, 6], params)], [])
    events = engine.abort_all("worker failed")
    assert [(e.request_id, e.index, e.finish_reason, e.error) for e in events] == [
        ("a", 0, "error", "worker failed"),
        ("a", 1, "error", "worker failed"),
    ]
    assert engine.free_capacity() == engine.capacity


def test_factory_settings_and_refusals(models):
    assert engine_for(models["gpt2"], max_rolling_batch_size=3).capacity == 3
    assert engine_for(models["gpt2"]).capacity == 32
    assert engine_for(models["t5"]).max_model_len == 2048  # relative positions: the default bound
    assert engine_for(models["t5"], max_model_len=512).max_model_len == 512
    with pytest.raises(EngineLoadError, match="max_model_len=4096 exceeds the model's 128 positions"):
        engine_for(models["gpt2"], max_model_len=4096)
    with pytest.raises(EngineLoadError, match="'text-classification' model; the generate engine serves"):
        engine_for(models["bert"])


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_n_completions_share_one_prefill_row_and_decode_like_n_1(models, kind):
    """The prompt is prefilled (encoded) once per request; its completions get copies of that cache,
    mask and encoder output. A wrong copy would make greedy completions differ from a lone request."""
    engine = engine_for(models[kind])
    prompt = engine.tokenizer(PROMPTS[0])["input_ids"]
    alone = run_to_end(engine, [GenerationRequest("one", prompt, GREEDY)])
    widths = []
    forward = engine.model.forward

    def spy(*args, **kwargs):
        ids = kwargs.get("input_ids")
        widths.append(len(ids) if ids is not None else len(kwargs["decoder_input_ids"]))
        return forward(*args, **kwargs)

    engine.model.forward = spy
    other = engine.tokenizer(PROMPTS[1])["input_ids"]
    requests = [
        GenerationRequest("three", prompt, SamplingParams(max_new_tokens=8, n=3)),
        GenerationRequest("other", other, GREEDY),
    ]
    streams = run_to_end(engine, requests)
    assert widths[0] == 2  # two distinct prompts prefilled, not four rows
    assert widths[1] == 4  # then every completion decodes on its own row
    for index in range(3):
        assert tokens_of(streams, "three", index) == tokens_of(alone, "one")


def reference_prompt_logprobs(path: str, prompt: list[int]) -> list[float]:
    """log p(token i | tokens before it) from one plain transformers forward, i >= 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0]
    logprobs = torch.log_softmax(logits.float(), -1)
    return [float(logprobs[i - 1, prompt[i]]) for i in range(1, len(prompt))]


@pytest.mark.parametrize("engine_name", ["hf-generate", "native"])
def test_prompt_logprobs_match_a_plain_forward(models, engine_name):
    """decoder_input_details: both engines score every prompt token like one plain forward does,
    also when the prompt shares a (left-padded) batch with a longer one."""
    from engines.rolling.factory import create_rolling_engine

    path = models["llama"]
    engine = (
        engine_for(path)
        if engine_name == "hf-generate"
        else create_rolling_engine(EngineConfig(path, dtype="fp32", max_model_len=64))
    )
    short, long = (engine.tokenizer(p)["input_ids"] for p in (PROMPTS[0], PROMPTS[2]))
    asked = SamplingParams(max_new_tokens=2, prompt_logprobs=True)
    events = engine.step(
        [GenerationRequest("short", short, asked), GenerationRequest("long", long, GREEDY)], []
    )
    first = next(e for e in events if e.request_id == "short")
    assert [t for t, _, _ in first.prompt_tokens] == short
    assert first.prompt_tokens[0][2] is None
    ours = [lp for _, _, lp in first.prompt_tokens[1:]]
    assert ours == pytest.approx(reference_prompt_logprobs(path, short), abs=1e-4)
    assert next(e for e in events if e.request_id == "long").prompt_tokens == ()  # not asked for
