"""The batched device sampler (engines.device_sampling) against the CPU sampler it must agree with."""

from __future__ import annotations

import random

import pytest
import torch

from engines.device_sampling import SamplingTensors, filter_logits, process_logits, sample_batch, to_host
from engines.sampling import filter_top_k_top_p, process_row, sample_next
from engines.sequence import Sequence
from engines.types import GenerationRequest, SamplingParams

VOCAB = 64
EOS = 0
EOS_IDS = {EOS}
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class CharTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


def make_seq(prompt: list[int], generated: list[int], **params: object) -> Sequence:
    request = GenerationRequest("r", prompt, SamplingParams(max_new_tokens=1000, **params))
    seq = Sequence(request, 0, CharTokenizer(), EOS_IDS)
    for token in generated:
        seq.append(token, -1.0)
    return seq


def random_params(rng: random.Random, do_sample: bool) -> dict[str, object]:
    """A mix of every setting, each often at its default."""
    bias_ids = rng.sample(range(VOCAB + 4), rng.choice([0, 0, 2, 5]))  # some beyond the vocabulary
    return {
        "do_sample": do_sample,
        "temperature": rng.choice([0.5, 1.0, 1.7]),
        "top_k": rng.choice([0, 0, 1, 5, 20, VOCAB, VOCAB + 3]),
        "top_p": rng.choice([1.0, 1.0, 0.95, 0.6, 0.05]),
        "min_p": rng.choice([0.0, 0.0, 0.05, 0.3]),
        "repetition_penalty": rng.choice([1.0, 1.0, 1.3, 0.8]),
        "presence_penalty": rng.choice([0.0, 0.0, 0.5, -0.3]),
        "frequency_penalty": rng.choice([0.0, 0.0, 0.2]),
        "logit_bias": tuple((t, rng.uniform(-5, 5)) for t in bias_ids),
        "min_new_tokens": rng.choice([0, 0, 4]),
        "stop_token_ids": tuple(rng.sample(range(VOCAB), rng.choice([0, 2]))),
        "top_logprobs": rng.choice([0, 1, 5]),
    }


def random_batch(rows: int, seed: int, sample: float = 0.5) -> tuple[torch.Tensor, list[Sequence]]:
    """Random logits and sequences (random prompts, generated tokens and settings)."""
    rng = random.Random(seed)
    seqs = []
    for _ in range(rows):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))]
        generated = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 8))]
        seqs.append(make_seq(prompt, generated, **random_params(rng, rng.random() < sample)))
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    return logits, seqs


def cpu_processed(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    processed = logits.clone()
    for row, seq in zip(processed, seqs, strict=True):
        process_row(row, seq, EOS_IDS)
    return processed


def cpu_filtered(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """engines.sampling.draw up to its multinomial."""
    row = row / params.temperature
    if params.min_p > 0.0:
        probs = torch.softmax(row, -1)
        row = row.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return filter_top_k_top_p(row, params.top_k, params.top_p)


def build(seqs: list[Sequence], device: torch.device = CPU) -> SamplingTensors:
    return SamplingTensors.build(seqs, EOS_IDS, VOCAB, device)


def unseeded(seqs: list[Sequence]) -> list[None]:
    return [None] * len(seqs)


@pytest.mark.parametrize("seed", range(3))
def test_processed_logits_are_those_of_the_cpu_sampler(seed: int) -> None:
    logits, seqs = random_batch(200, seed)
    assert torch.equal(process_logits(logits, build(seqs)), cpu_processed(logits, seqs))


def test_plain_rows_are_not_processed_or_copied() -> None:
    logits, seqs = random_batch(4, 0)
    seqs = [make_seq([1, 2], [3]) for _ in seqs]
    tensors = build(seqs)
    assert (tensors.bias, tensors.blocked, tensors.seen, tensors.counts) == (None, None, None, None)
    assert process_logits(logits, tensors) is logits


@pytest.mark.parametrize("seed", range(3))
def test_greedy_rows_match_sample_next(seed: int) -> None:
    logits, seqs = random_batch(200, seed, sample=0.0)
    expected = sample_next(logits, seqs, EOS_IDS)
    batch = sample_batch(logits, build(seqs), unseeded(seqs), 5)
    picked = to_host(batch, [s.params.top_logprobs for s in seqs])
    for got, want in zip(picked, expected, strict=True):
        assert got.token_id == want.token_id
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [t for t, _ in got.top_logprobs] == [t for t, _ in want.top_logprobs]
        assert [v for _, v in got.top_logprobs] == pytest.approx([v for _, v in want.top_logprobs], abs=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_filter_keeps_exactly_the_cpu_samplers_tokens(seed: int) -> None:
    logits, seqs = random_batch(300, seed, sample=1.0)
    processed = cpu_processed(logits, seqs)
    filtered = filter_logits(processed, build(seqs))
    for row, got, seq in zip(processed, filtered, seqs, strict=True):
        assert torch.equal(got, cpu_filtered(row, seq.params))


def test_greedy_rows_pass_the_filter_unchanged() -> None:
    logits, seqs = random_batch(50, 0, sample=0.0)
    seqs.append(make_seq([1], [], do_sample=True, top_k=1))  # any_top_k: the sort runs
    logits = torch.cat([logits, logits[:1]])
    filtered = filter_logits(logits, build(seqs))
    assert torch.equal(filtered[:-1], logits[:-1])


@pytest.mark.parametrize("seed", range(3))
def test_draws_pick_surviving_tokens_and_report_processed_logprobs(seed: int) -> None:
    logits, seqs = random_batch(300, seed, sample=0.7)
    processed = cpu_processed(logits, seqs)
    tensors = build(seqs)
    survivors = filter_logits(processed, tensors).isfinite()
    logprobs = processed.log_softmax(-1)
    for _ in range(5):
        batch = sample_batch(logits, tensors, unseeded(seqs), 0)
        tokens = batch.token_ids[:, None]
        assert survivors.gather(-1, tokens).all()
        assert torch.equal(batch.logprobs, logprobs.gather(-1, tokens)[:, 0])


@pytest.mark.parametrize("seed", range(2))
def test_top_alternatives_are_the_topk_of_the_processed_logprobs(seed: int) -> None:
    logits, seqs = random_batch(100, seed)
    batch = sample_batch(logits, build(seqs), unseeded(seqs), 7)
    values, ids = cpu_processed(logits, seqs).log_softmax(-1).topk(7, -1)
    assert torch.equal(batch.top_ids, ids)
    assert torch.equal(batch.top_logprobs, values)
    wanted = [i % 8 for i in range(len(seqs))]
    for row, (picked, w) in enumerate(zip(to_host(batch, wanted), wanted, strict=True)):
        assert picked.top_logprobs == tuple(zip(ids[row, :w].tolist(), values[row, :w].tolist(), strict=True))
        assert picked.logprob == batch.logprobs[row].item()


def seeded_tokens(
    logits: torch.Tensor, seqs: list[Sequence], row: int, seed: int, steps: int = 8
) -> list[int]:
    """Row ``row``'s tokens over ``steps`` steps with its own generator, the others unseeded."""
    generators: list[torch.Generator | None] = [None] * len(seqs)
    generators[row] = torch.Generator().manual_seed(seed)
    tensors = build(seqs)
    return [int(sample_batch(logits, tensors, generators, 0).token_ids[row]) for _ in range(steps)]


def test_seeded_rows_are_reproducible_and_independent_of_their_batch() -> None:
    params = {"do_sample": True, "temperature": 1.3, "top_k": 40, "top_p": 0.97}
    target = make_seq([5, 6], [7], **params)
    row_logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(9))
    batches = []
    for seed, rows, position in ((1, 5, 0), (2, 17, 9), (3, 2, 1)):
        logits, seqs = random_batch(rows, seed)
        seqs[position], logits[position] = target, row_logits
        batches.append(seeded_tokens(logits, seqs, position, seed=123))
    assert batches[0] == batches[1] == batches[2]
    logits, seqs = random_batch(5, 1)
    seqs[0], logits[0] = target, row_logits
    assert seeded_tokens(logits, seqs, 0, seed=124) != batches[0]


@pytest.mark.parametrize("seeded", [False, True])
def test_draw_frequencies_follow_the_filtered_softmax(seeded: bool) -> None:
    draws, vocab = 2000, 8
    settings = {"do_sample": True, "temperature": 1.5, "top_k": 6, "top_p": 0.95, "min_p": 0.1}
    seqs = [make_seq([1], [], **settings) for _ in range(draws)]
    params = seqs[0].params
    row = torch.tensor([2.0, 1.5, 1.0, 0.7, 0.5, 0.2, -1.0, 3.0])
    expected = cpu_filtered(row, params).softmax(-1)
    tensors = SamplingTensors.build(seqs, EOS_IDS, vocab, CPU)
    generators = [torch.Generator().manual_seed(i) if seeded else None for i in range(draws)]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokens = sample_batch(row.expand(draws, vocab), tensors, generators, 0).token_ids
    frequencies = torch.bincount(tokens, minlength=vocab).float() / draws
    assert frequencies[expected == 0].sum() == 0
    assert torch.allclose(frequencies, expected, atol=0.04)


def test_to_host_returns_sampled_rows_with_their_wanted_alternatives() -> None:
    logits, seqs = random_batch(6, 4, sample=0.0)
    batch = sample_batch(logits, build(seqs), unseeded(seqs), 3)
    picked = to_host(batch, [0, 1, 2, 3, 0, 3])
    assert [len(p.top_logprobs) for p in picked] == [0, 1, 2, 3, 0, 3]
    assert [p.token_id for p in picked] == batch.token_ids.tolist()
    assert all(isinstance(p.token_id, int) and isinstance(p.top_logprobs[0][0], int) for p in picked[1:4])
    assert to_host(sample_batch(logits, build(seqs), unseeded(seqs), 0), [0] * 6)[0].top_logprobs == ()


@pytest.mark.cuda
@needs_cuda
def test_cuda_greedy_rows_and_filters_match_the_cpu_sampler() -> None:
    cuda = torch.device("cuda")
    logits, seqs = random_batch(300, 7)
    tensors = build(seqs, cuda)
    processed = cpu_processed(logits, seqs)
    assert torch.equal(process_logits(logits.to(cuda), tensors).cpu(), processed)
    expected = sample_next(logits, seqs, EOS_IDS)
    picked = to_host(sample_batch(logits.to(cuda), tensors, unseeded(seqs), 5), [5] * len(seqs))
    for got, want, seq in zip(picked, expected, seqs, strict=True):
        if not seq.params.do_sample:
            assert got.token_id == want.token_id
            assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
    survivors = filter_logits(processed.to(cuda), tensors).isfinite().cpu()
    differing = [
        row
        for row, seq in enumerate(seqs)
        if seq.params.do_sample
        and not torch.equal(survivors[row], cpu_filtered(processed[row], seq.params).isfinite())
    ]
    assert len(differing) <= 2  # softmax/cumsum rounding differs from the CPU's: a near-tie may flip


@pytest.mark.cuda
@needs_cuda
def test_cuda_seeded_rows_are_independent_of_their_batch() -> None:
    cuda = torch.device("cuda")
    target = make_seq([5, 6], [7], do_sample=True, temperature=1.3, top_p=0.97)
    row_logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(9))
    results = []
    for seed, rows in ((1, 5), (2, 17)):
        logits, seqs = random_batch(rows, seed)
        seqs[1], logits[1] = target, row_logits
        generators: list[torch.Generator | None] = [None] * rows
        generators[1] = torch.Generator(device=cuda).manual_seed(123)
        tensors = build(seqs, cuda)
        results.append(
            [int(sample_batch(logits.to(cuda), tensors, generators, 0).token_ids[1]) for _ in range(8)]
        )
    assert results[0] == results[1]


def test_top_k_keeps_every_token_tied_with_the_kth_as_the_cpu_filter_does() -> None:
    seqs = [make_seq([1], [], do_sample=True, top_k=2)]
    row = torch.zeros(VOCAB)
    row[:3] = torch.tensor([3.0, 1.0, 1.0])
    filtered = filter_logits(row[None], build(seqs))[0]
    assert torch.equal(filtered, cpu_filtered(row, seqs[0].params))
    assert filtered.isfinite().sum() == 3
