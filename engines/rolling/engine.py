"""RollingEngine: one model forward per step for every running sequence, over a preallocated KV cache.

The scheduler decides who joins (`admit`) and who leaves early (`cancel`); this class owns the cache
slots, runs the packed prefill+decode forward, samples, and reports one TokenEvent per sequence.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from engines.base import EngineStats
from engines.llama.batch import ForwardBatch
from engines.sampling import Sampled, prompt_token_logprobs, sample_next
from engines.sequence import Sequence, length_error
from engines.types import GenerationRequest, TokenEvent

log = logging.getLogger("engines.rolling")


class RollingEngine:
    """The native engine's ``GenerationEngine`` (engines/base.py): continuous batching over slots."""

    def __init__(self, model: Any, cache: Any, tokenizer: Any, eos_ids: set[int], max_model_len: int) -> None:
        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.device = next(model.parameters()).device
        self.running: dict[tuple[str, int], Sequence] = {}
        """(request id, completion index) → its sequence, in admission order."""
        self.forks: dict[tuple[str, int], list[tuple[int, Sequence]]] = {}
        """Completions 1..n-1 of a request, waiting for completion 0's prefill to copy its cache."""
        self.steps = 0

    @property
    def capacity(self) -> int:
        return self.cache.num_slots

    def free_capacity(self) -> int:
        return self.cache.num_free()

    def stats(self) -> EngineStats:
        used = sum(seq.num_cached for seq in self.running.values())
        total = self.cache.num_slots * self.max_model_len
        return EngineStats(len(self.running), self.capacity, used, total, self.steps)

    def check_length(self, prompt_len: int, max_new_tokens: int) -> str | None:
        """A message when prompt + max_new_tokens cannot fit a cache slot, else None."""
        return length_error(prompt_len, max_new_tokens, self.max_model_len)

    def step(self, admit: list[GenerationRequest], cancel: list[str]) -> list[TokenEvent]:
        events = [e for request_id in set(cancel) for e in self._cancel(request_id)]
        for request in admit:
            error = self._invalid(request)
            if error:
                events.append(TokenEvent(request.request_id, -1, "", 0.0, "error", error))
                continue
            self._start(request)
        if self.running:
            events.extend(self._forward())
        return events

    def _invalid(self, request: GenerationRequest) -> str | None:
        if not request.prompt_ids:
            return "The prompt is empty: it encodes to no tokens."
        if request.params.num_sequences > self.cache.num_free():
            return (
                f"{request.params.num_sequences} completions need more free sequences than the cache has now."
            )
        return self.check_length(len(request.prompt_ids), request.params.max_new_tokens)

    def _start(self, request: GenerationRequest) -> None:
        """Completion 0 prefills the prompt; the others get a copy of its cache and their own RNG."""
        first = Sequence(request, self.cache.allocate(), self.tokenizer, self.eos_ids)
        self.running[(request.request_id, 0)] = first
        forks = []
        for index in range(1, request.params.num_sequences):
            forks.append(
                (index, Sequence(request, self.cache.allocate(), self.tokenizer, self.eos_ids, index))
            )
        if forks:
            self.forks[(request.request_id, 0)] = forks

    def _cancel(self, request_id: str) -> list[TokenEvent]:
        events = []
        for key in [k for k in self.running if k[0] == request_id]:
            seq = self.running.pop(key)
            self.cache.free(seq.slot)
            for _, fork in self.forks.pop(key, []):
                self.cache.free(fork.slot)
            events.append(TokenEvent(request_id, -1, "", 0.0, "cancelled", index=key[1]))
        return events

    @torch.inference_mode()
    def _forward(self) -> list[TokenEvent]:
        keys, seqs = list(self.running), list(self.running.values())
        started = time.perf_counter()
        batch = ForwardBatch.build([(s.slot, *s.next_input()) for s in seqs], self.device)
        scored = self._prompt_rows(seqs, batch)
        if scored:  # logits for the prompt positions too, after the last rows
            extra = torch.cat([rows for _, rows in scored])
            logits = self.model(batch, self.cache, torch.cat([batch.last_rows, extra])).float().cpu()
            prompts, logits = self._prompt_tokens(seqs, scored, logits[len(seqs) :]), logits[: len(seqs)]
        else:
            prompts, logits = {}, self.model(batch, self.cache).float().cpu()  # [num_seqs, vocab]
        self.steps += 1
        if self.forks:
            keys, seqs, logits = self._fork(keys, seqs, logits)
        events = []
        for key, seq, picked in zip(keys, seqs, self._sample(seqs, logits), strict=True):
            event = seq.append(*picked)
            event.index, event.prompt_tokens = key[1], prompts.get(key, ())
            if event.finish_reason is not None:
                self.running.pop(key, None)
                self.cache.free(seq.slot)
            events.append(event)
        log.debug(
            "step: %d seqs, %d tokens, %.1f ms",
            len(seqs),
            len(batch.token_ids),
            (time.perf_counter() - started) * 1000,
        )
        return events

    @staticmethod
    def _prompt_rows(seqs: list[Sequence], batch: ForwardBatch) -> list[tuple[int, torch.Tensor]]:
        """(position in seqs, packed rows of its prompt but the last) for prefills that asked for
        prompt log-probabilities."""
        out, start = [], 0
        for i, (seq, length) in enumerate(zip(seqs, batch.query_lens, strict=True)):
            if seq.params.prompt_logprobs and seq.num_cached == 0 and length > 1:
                out.append((i, torch.arange(start, start + length - 1, device=batch.token_ids.device)))
            start += length
        return out

    def _prompt_tokens(
        self, seqs: list[Sequence], scored: list[tuple[int, torch.Tensor]], logits: torch.Tensor
    ) -> dict[tuple[str, int], tuple]:
        out, offset = {}, 0
        for i, rows in scored:
            chunk = logits[offset : offset + len(rows)]
            offset += len(rows)
            out[(seqs[i].request_id, 0)] = prompt_token_logprobs(
                chunk, seqs[i].request.prompt_ids, self.tokenizer
            )
        return out

    def _fork(
        self, keys: list[tuple[str, int]], seqs: list[Sequence], logits: torch.Tensor
    ) -> tuple[list[tuple[str, int]], list[Sequence], torch.Tensor]:
        """After completion 0's prefill: copy its prompt cache into the other completions' slots and
        let each sample its first token from the same logits row (one prefill for n completions)."""
        rows = []
        for row, key in list(enumerate(keys)):  # a snapshot: the loop appends to keys
            for index, fork in self.forks.pop(key, []):
                self.cache.copy_prefix(seqs[row].slot, fork.slot, len(fork.request.prompt_ids))
                self.running[(key[0], index)] = fork
                keys.append((key[0], index))
                seqs.append(fork)
                rows.append(row)
        return keys, seqs, torch.cat([logits, logits[rows]]) if rows else logits

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Sampled]:
        """Row i's next token, its log-probability and top alternatives, for ``seqs[i]``; feed each to
        ``seqs[i].append(*picked)``."""
        return sample_next(logits, seqs, self.eos_ids)

    def abort_all(self, reason: str) -> list[TokenEvent]:
        """After a failed step: free every slot and end every sequence with an error."""
        events = [TokenEvent(rid, -1, "", 0.0, "error", reason, index=i) for rid, i in self.running]
        for seq in self.running.values():
            self.cache.free(seq.slot)
        for forks in self.forks.values():
            for _, fork in forks:
                self.cache.free(fork.slot)
        self.running.clear()
        self.forks.clear()
        return events
