"""RollingEngine: one model forward per step for every running sequence, over a preallocated KV cache.

The scheduler decides who joins (`admit`) and who leaves early (`cancel`); this class owns the cache
slots, runs the packed prefill+decode forward, samples, and reports one TokenEvent per sequence.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from engines.llama.batch import ForwardBatch
from engines.rolling.sampling import select_greedy, select_token
from engines.rolling.sequence import Sequence
from engines.types import GenerationRequest, TokenEvent

log = logging.getLogger("engines.rolling")


def eos_token_ids(tokenizer: Any, hf_config: Any, generation_config: Any | None) -> set[int]:
    ids: set[int] = set()
    for source in (generation_config, hf_config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class RollingEngine:
    def __init__(self, model: Any, cache: Any, tokenizer: Any, eos_ids: set[int], max_model_len: int) -> None:
        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.device = next(model.parameters()).device
        self.running: dict[str, Sequence] = {}

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    def free_slots(self) -> int:
        return self.cache.num_free()

    def check_length(self, prompt_len: int, max_new_tokens: int) -> str | None:
        """A message when prompt + max_new_tokens cannot fit a cache slot, else None."""
        if prompt_len + max_new_tokens > self.max_model_len:
            return (
                f"Input is too long: {prompt_len} prompt tokens + max_new_tokens={max_new_tokens} = "
                f"{prompt_len + max_new_tokens} exceeds option.max_model_len={self.max_model_len}. "
                "Shorten the prompt or lower max_new_tokens."
            )
        return None

    def step(self, admit: list[GenerationRequest], cancel: list[str]) -> list[TokenEvent]:
        events = [self._cancel(request_id) for request_id in cancel if request_id in self.running]
        for request in admit:
            error = self.check_length(len(request.prompt_ids), request.params.max_new_tokens)
            if error:
                events.append(TokenEvent(request.request_id, -1, "", 0.0, "error", error))
                continue
            slot = self.cache.allocate()
            self.running[request.request_id] = Sequence(request, slot, self.tokenizer, self.eos_ids)
        if self.running:
            events.extend(self._forward())
        return events

    def _cancel(self, request_id: str) -> TokenEvent:
        seq = self.running.pop(request_id)
        self.cache.free(seq.slot)
        return TokenEvent(request_id, -1, "", 0.0, "cancelled")

    @torch.inference_mode()
    def _forward(self) -> list[TokenEvent]:
        seqs = list(self.running.values())
        started = time.perf_counter()
        batch = ForwardBatch.build([(s.slot, *s.next_input()) for s in seqs], self.device)
        logits = self.model(batch, self.cache)  # [num_seqs, vocab] float32
        tokens, logprobs = self._sample(seqs, logits.float().cpu())
        events = []
        for seq, token, logprob in zip(seqs, tokens, logprobs, strict=True):
            event = seq.append(token, logprob)
            if event.finish_reason is not None:
                del self.running[seq.request_id]
                self.cache.free(seq.slot)
            events.append(event)
        log.debug(
            "step: %d seqs, %d tokens, %.1f ms",
            len(seqs),
            len(batch.token_ids),
            (time.perf_counter() - started) * 1000,
        )
        return events

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[int], list[float]]:
        for row, seq in enumerate(seqs):
            if seq.blocks_eos():
                logits[row, list(self.eos_ids)] = float("-inf")
        plain = [not s.params.do_sample and s.params.repetition_penalty == 1.0 for s in seqs]
        if all(plain):
            return select_greedy(logits)
        picks = [
            select_token(
                logits[i], s.params, s.history() if s.params.repetition_penalty != 1.0 else None, s.generator
            )
            for i, s in enumerate(seqs)
        ]
        return [p[0] for p in picks], [p[1] for p in picks]

    def abort_all(self, reason: str) -> list[TokenEvent]:
        """After a failed step: free every slot and end every sequence with an error."""
        events = [TokenEvent(rid, -1, "", 0.0, "error", reason) for rid in self.running]
        for seq in self.running.values():
            self.cache.free(seq.slot)
        self.running.clear()
        return events
