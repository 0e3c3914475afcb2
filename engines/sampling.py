"""Batched next-token selection, shared by every generation engine: ``sample_next``.

Per row, in this order (vLLM's): logit_bias; the min_new_tokens block of EOS and stop_token_ids;
repetition penalty (prompt + generated, CTRL/HF style); presence and frequency penalties (generated
tokens only, OpenAI style). The log-probabilities reported come from this distribution. Then greedy
rows take the argmax; sampled rows apply temperature, min_p, top-k and top-p and draw with their own
torch.Generator when seeded. Rows are independent, so a request's output never depends on its batch.
"""

from __future__ import annotations

from collections import abc
from typing import Any, NamedTuple, Protocol

import torch

from engines.types import SamplingParams


class SamplingState(Protocol):
    """What the sampler reads from a running sequence (engines.sequence.Sequence has it)."""

    params: SamplingParams
    generator: torch.Generator | None
    output_counts: abc.Mapping[int, int]
    """Generated token id -> how often it was generated."""

    def blocks_eos(self) -> bool:
        """True while fewer than min_new_tokens were generated."""
        ...

    def penalized_ids(self) -> list[int]:
        """Distinct token ids of the prompt and the generated text (repetition penalty)."""
        ...


class Sampled(NamedTuple):
    """One row's choice: the token, its log-probability and the most likely alternatives."""

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()


def needs_processing(params: SamplingParams, blocks_eos: bool) -> bool:
    """Whether a row's logits change before selection (else it takes the fast path)."""
    return (
        blocks_eos
        or bool(params.logit_bias)
        or params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def sample_next(
    logits: torch.Tensor,
    seqs: abc.Sequence[SamplingState],
    eos_ids: set[int],
    argmax: abc.Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[Sampled]:
    """The next token of every row of ``logits`` [num_rows, vocab] (float32, CPU), row i for ``seqs[i]``.

    argmax: torch.argmax(x, -1) or an op with its results (engines.kernels.ops: a native one is faster).

    A batch of plain greedy rows costs one argmax and one log_softmax (plus one topk when any row asks
    for top_logprobs). ``logits`` is not modified.
    """
    rows = [i for i, s in enumerate(seqs) if needs_processing(s.params, s.blocks_eos())]
    if rows:
        logits = logits.clone()
        for i in rows:
            process_row(logits[i], seqs[i], eos_ids)
    logprobs = torch.log_softmax(logits, -1)
    tokens = torch.argmax(logits, -1) if argmax is None else argmax(logits)
    for i, seq in enumerate(seqs):
        if seq.params.do_sample:
            tokens[i] = draw(logits[i], seq.params, seq.generator)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
    tops = top_alternatives(logprobs, [s.params.top_logprobs for s in seqs])
    return [Sampled(*picked) for picked in zip(tokens.tolist(), chosen, tops, strict=True)]


def process_row(row: torch.Tensor, seq: SamplingState, eos_ids: set[int]) -> None:
    """Apply bias, the min_new_tokens block and the penalties to one row [vocab], in place."""
    params, vocab = seq.params, row.shape[-1]
    if params.logit_bias:
        # Ids beyond the model's vocabulary are refused per request (formats.check_token_ids); a
        # tokenizer with fewer ids than the model's padded vocabulary leaves them valid here.
        bias = [(t, b) for t, b in params.logit_bias if t < vocab]
        if bias:
            ids, values = zip(*bias, strict=True)
            row[list(ids)] += torch.tensor(values, dtype=row.dtype)
    if seq.blocks_eos():
        blocked = [t for t in (*eos_ids, *params.stop_token_ids) if t < vocab]
        row[blocked] = float("-inf")
    if params.repetition_penalty != 1.0:
        apply_repetition_penalty(row, torch.tensor(seq.penalized_ids(), dtype=torch.long), params)
    if (params.presence_penalty or params.frequency_penalty) and seq.output_counts:
        ids = torch.tensor(list(seq.output_counts.keys()), dtype=torch.long)
        counts = torch.tensor(list(seq.output_counts.values()), dtype=row.dtype)
        row[ids] -= params.presence_penalty + params.frequency_penalty * counts


def apply_repetition_penalty(row: torch.Tensor, ids: torch.Tensor, params: SamplingParams) -> None:
    """CTRL-style penalty on the seen tokens ``ids``, in place: positive logits divided, negative ones
    multiplied."""
    scores = row[ids]
    penalty = params.repetition_penalty
    row[ids] = torch.where(scores < 0, scores * penalty, scores / penalty)


def draw(row: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Sample one token from a processed row: temperature, min_p, top-k, top-p, then multinomial."""
    row = row / params.temperature
    if params.min_p > 0.0:
        probs = torch.softmax(row, -1)
        row = row.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    row = filter_top_k_top_p(row, params.top_k, params.top_p)
    return int(torch.multinomial(torch.softmax(row, -1), 1, generator=generator))


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def top_alternatives(logprobs: torch.Tensor, wanted: list[int]) -> list[tuple[tuple[int, float], ...]]:
    """Per row, its ``wanted[i]`` most likely (token id, log-probability) pairs; one topk for the batch."""
    k = min(max(wanted, default=0), logprobs.shape[-1])
    if k == 0:
        return [()] * len(wanted)
    rows = [i for i, w in enumerate(wanted) if w > 0]
    values, ids = torch.topk(logprobs[rows], k)
    out: list[tuple[tuple[int, float], ...]] = [()] * len(wanted)
    for row, row_ids, row_values in zip(rows, ids.tolist(), values.tolist(), strict=True):
        out[row] = tuple(zip(row_ids[: wanted[row]], row_values[: wanted[row]], strict=True))
    return out


def prompt_token_logprobs(
    logits: torch.Tensor, prompt_ids: abc.Sequence[int], tokenizer: Any
) -> tuple[tuple[int, str, float | None], ...]:
    """(id, text, log-probability) per prompt token; ``logits[i]`` ([len(prompt) - 1, vocab]) is the
    model's prediction after token i, so token i + 1 is scored by it and the first token by nothing."""
    ids = list(prompt_ids)
    texts = [tokenizer.decode([token]) for token in ids]
    if len(ids) < 2:
        return tuple((t, text, None) for t, text in zip(ids, texts, strict=True))
    logprobs = torch.log_softmax(logits.float(), -1)
    scored = logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    return ((ids[0], texts[0], None), *zip(ids[1:], texts[1:], scored, strict=True))
