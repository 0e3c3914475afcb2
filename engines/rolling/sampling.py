"""Batched next-token selection: repetition penalty, temperature, top-k, top-p, greedy, per-request seeds.

Plain torch over a [num_seqs, vocab] float32 logits tensor; rows are independent so a request's output
never depends on what else is in the batch (a seeded request uses its own torch.Generator).
"""

from __future__ import annotations

import torch

from engines.types import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already seen (prompt + generated), as HF does."""
    scores = logits.gather(-1, history)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(-1, history, scores)


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


def select_token(
    logits: torch.Tensor,
    params: SamplingParams,
    history: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[int, float]:
    """Choose one token from one row of logits [vocab]; returns (token id, its log-probability)."""
    if params.repetition_penalty != 1.0 and history is not None and history.numel():
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if not params.do_sample:
        token = int(torch.argmax(logits))
        return token, float(torch.log_softmax(logits, -1)[token])
    logits = logits / params.temperature
    logits = filter_top_k_top_p(logits, params.top_k, params.top_p)
    probs = torch.softmax(logits, -1)
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(torch.log(probs[token]))


def select_greedy(logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """Fast path for a batch of greedy rows without penalties: one argmax and one log_softmax."""
    tokens = torch.argmax(logits, -1)
    logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    return tokens.tolist(), logprobs.tolist()
