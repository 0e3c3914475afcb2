"""The shared sampler (engines.sampling.sample_next) against plain reference computations."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from engines.sampling import sample_next
from engines.sequence import Sequence
from engines.types import GenerationRequest, SamplingParams

VOCAB = 16
EOS = 0
PROMPT = [7, 8]


class CharTokenizer:
    """Token i is the letter chr(ord("a") + i); EOS (0) is special."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join("" if i == EOS and skip_special_tokens else chr(ord("a") + i) for i in ids)


def make_seq(generated: tuple[int, ...] = (), index: int = 0, **params: object) -> Sequence:
    """A running sequence with ``generated`` already appended."""
    request = GenerationRequest("r", list(PROMPT), SamplingParams(max_new_tokens=100, **params))
    seq = Sequence(request, 0, CharTokenizer(), {EOS}, index=index)
    for token in generated:
        seq.append(token, -1.0)
    return seq


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def log_softmax(values: list[float]) -> list[float]:
    """The reference: log(exp(x) / sum(exp(x))), in plain Python."""
    top = max(values)
    total = math.log(sum(math.exp(v - top) for v in values if v > -math.inf)) + top
    return [v - total for v in values]


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def test_plain_greedy_rows_take_the_argmax_and_its_log_probability() -> None:
    logits = random_logits(3)
    picks = sample_next(logits, [make_seq() for _ in range(3)], {EOS})
    for row, picked in zip(logits.tolist(), picks, strict=True):
        assert picked.token_id == argmax(row)
        assert picked.logprob == pytest.approx(log_softmax(row)[argmax(row)], abs=1e-5)
        assert picked.top_logprobs == ()


def test_logit_bias_is_added_before_selection() -> None:
    logits = random_logits(1)
    row = logits[0].tolist()
    bias = ((3, 40.0), (5, -100.0), (argmax(row), -50.0))
    (picked,) = sample_next(logits, [make_seq(logit_bias=bias, top_logprobs=VOCAB)], {EOS})
    biased = list(row)
    for token, value in bias:
        biased[token] += value
    assert picked.token_id == 3
    expected = sorted(enumerate(log_softmax(biased)), key=lambda p: -p[1])
    assert [t for t, _ in picked.top_logprobs] == [t for t, _ in expected]
    assert [lp for _, lp in picked.top_logprobs] == pytest.approx([lp for _, lp in expected], abs=1e-4)


def test_presence_and_frequency_penalties_count_generated_tokens_only() -> None:
    generated = (3, 3, 4, 3)
    seq = make_seq(generated, presence_penalty=0.7, frequency_penalty=0.4, top_logprobs=VOCAB)
    logits = random_logits(1)
    (picked,) = sample_next(logits, [seq], {EOS})
    reference = logits[0].tolist()
    for token, count in Counter(generated).items():  # prompt tokens 7 and 8 are not penalised
        reference[token] -= 0.7 + 0.4 * count
    assert dict(picked.top_logprobs) == pytest.approx(dict(enumerate(log_softmax(reference))), abs=1e-4)
    assert picked.token_id == argmax(reference)
    assert seq.output_counts == Counter(generated)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    seq = make_seq((3, 12), repetition_penalty=1.5, top_logprobs=VOCAB)
    logits = random_logits(1, seed=2)
    (picked,) = sample_next(logits, [seq], {EOS})
    reference = logits[0].tolist()
    for token in {*PROMPT, 3, 12}:
        value = reference[token]
        reference[token] = value / 1.5 if value > 0 else value * 1.5
    assert dict(picked.top_logprobs) == pytest.approx(dict(enumerate(log_softmax(reference))), abs=1e-4)


def test_top_logprobs_come_from_the_distribution_before_temperature_and_filters() -> None:
    logits = random_logits(1, seed=3)
    seq = make_seq(do_sample=True, temperature=0.3, top_k=2, top_p=0.5, seed=1, top_logprobs=3)
    (picked,) = sample_next(logits, [seq], {EOS})
    reference = sorted(enumerate(log_softmax(logits[0].tolist())), key=lambda p: -p[1])[:3]
    assert [t for t, _ in picked.top_logprobs] == [t for t, _ in reference]
    assert [lp for _, lp in picked.top_logprobs] == pytest.approx([lp for _, lp in reference], abs=1e-5)
    assert picked.logprob == pytest.approx(log_softmax(logits[0].tolist())[picked.token_id], abs=1e-5)


def test_min_p_keeps_the_tokens_within_min_p_of_the_top_probability_after_temperature() -> None:
    # probabilities at temperature 1: 0.4, 0.3, 0.2, 0.1 (the rest ~0)
    probs = [0.4, 0.3, 0.2, 0.1] + [1e-9] * (VOCAB - 4)
    logits = torch.tensor([[math.log(p) for p in probs]])
    for temperature, min_p in ((1.0, 0.5), (0.5, 0.5), (1.0, 0.2)):
        scaled = [p ** (1 / temperature) for p in probs]  # softmax(log p / T) is proportional to p^(1/T)
        allowed = {t for t, p in enumerate(scaled) if p >= min_p * max(scaled)}
        seq = make_seq(do_sample=True, temperature=temperature, min_p=min_p, seed=5)
        drawn = {sample_next(logits, [seq], {EOS})[0].token_id for _ in range(400)}
        assert drawn == allowed, (temperature, min_p)


def test_min_new_tokens_blocks_eos_and_stop_token_ids() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS], logits[0, 5], logits[0, 9] = 10.0, 9.0, 8.0
    blocked = make_seq((1,), min_new_tokens=2, stop_token_ids=(5,), top_logprobs=3)
    (picked,) = sample_next(logits, [blocked], {EOS})
    assert picked.token_id == 9
    reference = [-math.inf if t in (EOS, 5) else v for t, v in enumerate(logits[0].tolist())]
    assert picked.logprob == pytest.approx(log_softmax(reference)[9], abs=1e-5)
    free = make_seq((1, 2), min_new_tokens=2, stop_token_ids=(5,))
    assert sample_next(logits, [free], {EOS})[0].token_id == EOS


def test_batched_rows_equal_one_row_at_a_time() -> None:
    """The greedy fast path and the per-row path of a mixed batch give what each row gives alone."""

    def batch() -> list[Sequence]:
        return [
            make_seq(),
            make_seq((3,), logit_bias=((2, 5.0),), top_logprobs=2),
            make_seq((3, 3), frequency_penalty=1.0, presence_penalty=0.5),
            make_seq((4,), repetition_penalty=1.3, top_logprobs=4),
            make_seq(do_sample=True, temperature=0.8, top_k=5, seed=11, top_logprobs=1),
            make_seq(do_sample=True, min_p=0.1, seed=12),
            make_seq(),
        ]

    logits = random_logits(7, seed=4)
    before = logits.clone()
    together = sample_next(logits, batch(), {EOS})
    alone = [sample_next(logits[i : i + 1], [seq], {EOS})[0] for i, seq in enumerate(batch())]
    assert [p.token_id for p in together] == [p.token_id for p in alone]
    assert [p.logprob for p in together] == pytest.approx([p.logprob for p in alone], abs=1e-6)
    assert [len(p.top_logprobs) for p in together] == [0, 2, 0, 4, 1, 0, 0]
    for mixed, single in zip(together, alone, strict=True):
        assert [t for t, _ in mixed.top_logprobs] == [t for t, _ in single.top_logprobs]
    plain = sample_next(logits[[0, 6]], [make_seq(), make_seq()], {EOS})  # the all-greedy fast path
    assert [p.token_id for p in plain] == [together[0].token_id, together[6].token_id]
    assert torch.equal(logits, before)  # the caller's logits are not modified


def test_seeded_completions_draw_with_seed_plus_index() -> None:
    logits = random_logits(1, seed=6)
    for index in range(3):
        seq = make_seq(do_sample=True, seed=40, index=index)
        drawn = [sample_next(logits, [seq], {EOS})[0].token_id for _ in range(20)]
        generator = torch.Generator().manual_seed(40 + index)
        probs = torch.softmax(logits[0], -1)
        assert drawn == [int(torch.multinomial(probs, 1, generator=generator)) for _ in range(20)]


def test_stop_token_ends_the_sequence_without_its_text() -> None:
    seq = make_seq(stop_token_ids=(9,), index=2)
    events = [seq.append(token, -0.5, ((token, -0.5), (4, -2.0))) for token in (1, 2, 9)]
    assert [e.finish_reason for e in events] == [None, None, "stop_sequence"]
    assert "".join(e.text for e in events) == "bc"  # "j" (token 9) is not part of the text
    assert [e.index for e in events] == [2, 2, 2]
    assert events[0].top_logprobs == ((1, -0.5), (4, -2.0))
    assert events[0].top_texts == ("b", "e")
    assert seq.output_counts == {1: 1, 2: 1, 9: 1}
