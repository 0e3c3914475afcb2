"""RollingEngine: continuous batching over a paged KV cache, one model forward per step.

The scheduler decides who joins (`admit`) and who leaves early (`cancel`); the step planner
(engines/paging/planner.py) decides which tokens of which sequence run in this step (decodes, prompt
chunks) within the cache's blocks; this class runs the packed forward, samples, and reports one
TokenEvent per sequence that produced a token.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from engines.base import EngineStats
from engines.device_sampling import SamplingTensors, device_generator, sample_batch, to_host
from engines.llama.batch import ForwardBatch
from engines.paging.block_manager import BlockManager
from engines.paging.planner import Scheduled, StepPlanner
from engines.rolling.cuda_graphs import DecodeGraphRunner
from engines.sampling import Sampled, prompt_token_logprobs, sample_next
from engines.sequence import Sequence, length_error
from engines.types import GenerationRequest, TokenEvent

log = logging.getLogger("engines.rolling")

Key = tuple[str, int]
"""(request id, completion index)."""


class RollingEngine:
    """The native engine's ``GenerationEngine`` (engines/base.py)."""

    chunked_prefill = True
    """It splits prompts into chunks itself: the scheduler admits by sequence count only."""

    def __init__(
        self,
        model: Any,
        cache: Any,
        tokenizer: Any,
        eos_ids: set[int],
        max_model_len: int,
        max_num_seqs: int,
        prefill_tokens: int = 4096,
        enable_prefix_caching: bool = True,
        graphs: DecodeGraphRunner | None = None,
        reserved_blocks: int = 0,
    ) -> None:
        """graphs: captured decode steps (CUDA); reserved_blocks: the cache's last blocks, kept out of
        the allocator (the graphs' padding block)."""
        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        self.graphs = graphs
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.capacity = max_num_seqs
        self.device = next(model.parameters()).device
        self.blocks = BlockManager(
            cache.num_blocks - reserved_blocks, cache.block_size, enable_prefix_caching
        )
        self.on_device_sampling = self.device.type == "cuda"
        self.planner = StepPlanner(self.blocks, prefill_tokens)
        self.sequences: dict[Key, Sequence] = {}
        """Every admitted completion, running or waiting, in admission order."""
        self.forks: dict[Key, list[Sequence]] = {}
        """Completions 1..n-1 of a request, waiting for completion 0's prompt to share its cache."""
        self.steps = 0

    @property
    def running(self) -> dict[Key, Sequence]:
        """Every admitted completion that has not finished (computing now or waiting for room)."""
        return self.sequences

    def free_capacity(self) -> int:
        return self.capacity - len(self.sequences) - sum(len(f) for f in self.forks.values())

    def stats(self) -> EngineStats:
        size, total = self.blocks.block_size, self.blocks.num_blocks
        free = self.blocks.num_free()
        return EngineStats(
            running=len(self.planner.running),
            capacity=self.capacity,
            cache_tokens_used=(total - free) * size,
            cache_tokens_total=total * size,
            steps=self.steps,
            waiting=len(self.planner.waiting) + sum(len(f) for f in self.forks.values()),
            preemptions=self.planner.preemptions,
            cache_blocks_total=total,
            cache_blocks_free=free,
            prefix_queried_tokens=self.blocks.stats.queried_tokens,
            prefix_hit_tokens=self.blocks.stats.hit_tokens,
        )

    def check_length(self, prompt_len: int, max_new_tokens: int) -> str | None:
        """A message when prompt + max_new_tokens cannot fit one sequence, else None."""
        return length_error(prompt_len, max_new_tokens, self.max_model_len)

    def step(self, admit: list[GenerationRequest], cancel: list[str]) -> list[TokenEvent]:
        events = [e for request_id in set(cancel) for e in self._cancel(request_id)]
        for request in admit:
            error = self._invalid(request)
            if error:
                events.append(TokenEvent(request.request_id, -1, "", 0.0, "error", error))
                continue
            self._start(request)
        plan = self.planner.plan()
        if plan:
            events.extend(self._forward(plan))
        return events

    def _invalid(self, request: GenerationRequest) -> str | None:
        if not request.prompt_ids:
            return "The prompt is empty: it encodes to no tokens."
        if request.params.num_sequences > self.free_capacity():
            wanted = request.params.num_sequences
            return f"{wanted} completions need more free sequences than the engine has now."
        return self.check_length(len(request.prompt_ids), request.params.max_new_tokens)

    def _start(self, request: GenerationRequest) -> None:
        """Completion 0 computes the prompt; the others share its cache once it has (one prefill)."""
        first = self._sequence(request, 0)
        self.sequences[(request.request_id, 0)] = first
        self.planner.add(first)
        forks = [self._sequence(request, index) for index in range(1, request.params.num_sequences)]
        if forks:
            self.forks[(request.request_id, 0)] = forks

    def _sequence(self, request: GenerationRequest, index: int) -> Sequence:
        seq = Sequence(request, -1, self.tokenizer, self.eos_ids, index)
        if self.on_device_sampling:  # its seeded draws come from a generator on the GPU
            seq.generator = device_generator(request.params, index, self.device)
        return seq

    def _cancel(self, request_id: str) -> list[TokenEvent]:
        events = []
        for key in [k for k in self.sequences if k[0] == request_id]:
            self.planner.finish(self.sequences.pop(key))
            self.forks.pop(key, None)
            events.append(TokenEvent(request_id, -1, "", 0.0, "cancelled", index=key[1]))
        return events

    @torch.inference_mode()
    def _forward(self, plan: list[Scheduled]) -> list[TokenEvent]:
        started = time.perf_counter()
        batch = ForwardBatch.build(
            [(item.seq.blocks, *item.seq.next_input(item.num_tokens)) for item in plan],
            self.blocks.block_size,
            self.device,
        )
        sampling = [i for i, item in enumerate(plan) if item.samples]
        scored = self._prompt_rows(plan, batch)
        if self.graphs is not None and batch.meta.decode_only and len(plan) <= self.graphs.max_batch():
            logits = self.graphs.run(batch)  # decode only: every row samples, in plan order
        else:
            rows = [batch.last_rows[sampling]] + [r for _, r in scored]
            logits = self.model(batch, self.cache, torch.cat(rows)).float()
        if not self.on_device_sampling:
            logits = logits.cpu()
        prompts = self._prompt_tokens(plan, scored, logits[len(sampling) :])
        logits = logits[: len(sampling)]
        for item in plan:
            self.planner.computed(item)
        self.steps += 1
        seqs = [plan[i].seq for i in sampling]
        if self.forks:
            seqs, logits = self._fork(seqs, logits)
        events = []
        for seq, picked in zip(seqs, self._sample(seqs, logits), strict=True):
            first = not seq.output_ids
            event = seq.append(*picked)
            if first:
                event.cached_tokens = seq.cached_prompt_tokens
            event.prompt_tokens = prompts.get(id(seq), ())
            if event.finish_reason is not None:
                self.sequences.pop((seq.request_id, seq.index), None)
                self.planner.finish(seq)
            events.append(event)
        log.debug(
            "step: %d seqs, %d tokens, %d sampled, %.1f ms",
            len(plan),
            len(batch.token_ids),
            len(seqs),
            (time.perf_counter() - started) * 1000,
        )
        return events

    @staticmethod
    def _prompt_rows(plan: list[Scheduled], batch: ForwardBatch) -> list[tuple[Sequence, torch.Tensor]]:
        """(sequence, packed rows of its prompt but the last) for whole-prompt prefills that asked for
        prompt log-probabilities (not again when recomputing after a preemption)."""
        out, start = [], 0
        for item, length in zip(plan, batch.query_lens, strict=True):
            seq = item.seq
            if seq.params.prompt_logprobs and seq.num_cached == 0 and not seq.output_ids and length > 1:
                out.append((seq, torch.arange(start, start + length - 1, device=batch.token_ids.device)))
            start += length
        return out

    def _prompt_tokens(
        self, plan: list[Scheduled], scored: list[tuple[Sequence, torch.Tensor]], logits: torch.Tensor
    ) -> dict[int, tuple]:
        out, offset = {}, 0
        for seq, rows in scored:
            chunk = logits[offset : offset + len(rows)]
            offset += len(rows)
            out[id(seq)] = prompt_token_logprobs(chunk, seq.request.prompt_ids, self.tokenizer)
        return out

    def _fork(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """After completion 0's prompt: the other completions share its full blocks, get a copy of its
        last partial block, and sample their first token from the same logits row."""
        rows, out = [], list(seqs)
        for row, seq in enumerate(seqs):
            for fork in self.forks.pop((seq.request_id, 0), []) if seq.index == 0 else []:
                self.sequences[(fork.request_id, fork.index)] = fork
                if self._share_prompt(seq, fork):
                    out.append(fork)
                    rows.append(row)
                else:  # no block for the copy: it computes the prompt itself when room frees up
                    self.planner.add(fork, front=True)
        return out, torch.cat([logits, logits[rows]]) if rows else logits

    def _share_prompt(self, source: Sequence, fork: Sequence) -> bool:
        size, prompt = self.blocks.block_size, len(source.request.prompt_ids)
        full, partial = prompt // size, prompt % size
        copy = self.blocks.allocate(1) if partial else []
        if copy is None:
            return False
        self.blocks.hold(source.blocks[:full])
        if partial:
            self.cache.copy_blocks([(source.blocks[full], copy[0])])
        fork.blocks = source.blocks[:full] + copy
        fork.block_keys = source.block_keys[:full]
        fork.num_cached = prompt
        self.planner.running.append(fork)
        return True

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Sampled]:
        """Row i's next token, its log-probability and top alternatives, for ``seqs[i]``: on a GPU as
        one batched operation there with one copy of the results to the host."""
        if not self.on_device_sampling:
            return sample_next(logits, seqs, self.eos_ids)
        tensors = SamplingTensors.build(seqs, self.eos_ids, logits.shape[-1], self.device)
        wanted = [seq.params.top_logprobs for seq in seqs]
        picked = sample_batch(logits, tensors, [seq.generator for seq in seqs], max(wanted, default=0))
        return to_host(picked, wanted)

    def abort_all(self, reason: str) -> list[TokenEvent]:
        """After a failed step: free every sequence's blocks and end each with an error."""
        events = [TokenEvent(rid, -1, "", 0.0, "error", reason, index=i) for rid, i in self.sequences]
        for seq in self.sequences.values():
            self.planner.finish(seq)
        self.sequences.clear()
        self.forks.clear()
        return events
