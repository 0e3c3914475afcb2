"""RollingEngine: continuous batching over a paged KV cache, one model forward per step.

The scheduler decides who joins (`admit`) and who leaves early (`cancel`); the step planner
(engines/paging/planner.py) decides which tokens of which sequence run in this step (decodes, prompt
chunks) within the cache's blocks; this class runs the packed forward, samples, and reports one
TokenEvent per sequence that produced a token.

With sampling on the device and ``overlap`` on, a step's results are read one call later: step N+1 is
planned and queued on the GPU (its decode inputs taken from step N's device-side tokens, see
engines.sequence.PENDING) before the host reads, detokenises and stop-checks step N's tokens, so that
host work runs while the GPU computes (SGLang's overlap scheduler, vLLM's async scheduling). A sequence
that stopped at step N wastes its row of step N+1. Penalties need every generated id, so a step whose
rows use them is read before the next is planned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch

from engines.base import EngineStats
from engines.device import upload
from engines.device_sampling import (
    HostCopy,
    SamplingTensors,
    copy_to_host,
    device_generator,
    read_host,
    sample_batch,
)
from engines.llama.batch import ForwardBatch
from engines.paging.block_manager import BlockManager
from engines.paging.planner import Scheduled, StepPlanner
from engines.rolling.cuda_graphs import DecodeGraphRunner
from engines.sampling import Sampled, prompt_token_logprobs, sample_next
from engines.sequence import PENDING, Sequence, length_error
from engines.types import GenerationRequest, TokenEvent

log = logging.getLogger("engines.rolling")

Key = tuple[str, int]
"""(request id, completion index)."""


@dataclass
class Launch:
    """A step whose forward and sampling are queued; ``RollingEngine._finish`` reads its tokens."""

    seqs: list[Sequence]
    """Row i was sampled for seqs[i]; each holds a reserved (PENDING) position for it."""
    sampled: list[Sampled] | None = None
    """Host sampling: the choices, ready at once."""
    copy: HostCopy | None = None
    """Device sampling: the choices on their way to the host."""
    token_ids: torch.Tensor | None = None
    """Device sampling: [rows] chosen ids on the device, the next step's inputs for its PENDING tokens."""
    prompts: dict[int, tuple] = field(default_factory=dict)
    """id(seq) -> its prompt tokens' log-probabilities (prompt_logprobs requests)."""
    plan_ahead: bool = True
    """The next step may be planned before these tokens are read (no row needs the ids it generated)."""

    rows: dict[int, int] = field(init=False)
    """id(seq) -> its row: the next step looks up each unread input here (once per decode row)."""

    def __post_init__(self) -> None:
        self.rows = {id(seq): row for row, seq in enumerate(self.seqs)}


def reads_history(seq: Sequence) -> bool:
    """Its next sampling needs every id generated so far (penalties), not only their count."""
    params = seq.params
    penalties = (params.repetition_penalty - 1.0, params.presence_penalty, params.frequency_penalty)
    return any(penalties)


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
        overlap: bool = True,
        device_sampling: bool | None = None,
    ) -> None:
        """graphs: captured decode steps (CUDA); reserved_blocks: the cache's last blocks, kept out of
        the allocator (the graphs' padding block); overlap: read a step's tokens after queuing the next
        (needs device sampling); device_sampling: sample with engines.device_sampling (default: on
        CUDA), else on the host with engines.sampling."""
        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        self.argmax = getattr(getattr(model, "ops", None), "argmax", None)
        """Greedy picks on the host: the model's ops' (a native kernel on CPU), else torch.argmax."""
        self.graphs = graphs
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.capacity = max_num_seqs
        self.device = next(model.parameters()).device
        self.blocks = BlockManager(
            cache.num_blocks - reserved_blocks, cache.block_size, enable_prefix_caching
        )
        self.on_device_sampling = self.device.type == "cuda" if device_sampling is None else device_sampling
        self.overlap = overlap and self.on_device_sampling
        self.pending: Launch | None = None
        """The step queued last, its tokens not read yet (overlap)."""
        self.planner = StepPlanner(self.blocks, prefill_tokens)
        self.sequences: dict[Key, Sequence] = {}
        """Every admitted completion, running or waiting, in admission order."""
        self.forks: dict[Key, list[Sequence]] = {}
        """Completions 1..n-1 of a request, waiting for completion 0's prompt to share its cache."""
        self.steps = 0
        self.group: Any = None
        """Rank 0's parallel group (engines.parallel.group.Group), when the model is sharded."""

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
        pending, self.pending = self.pending, None
        if pending is not None and not pending.plan_ahead:
            events.extend(self._finish(pending))
            pending = None
        plan = self.planner.plan()
        launched = self._launch(plan, pending) if plan else None
        if pending is not None:  # read while the GPU runs `launched`
            events.extend(self._finish(pending))
        if launched is not None and self.overlap:
            self.pending = launched
        elif launched is not None:
            events.extend(self._finish(launched))
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
    def _launch(self, plan: list[Scheduled], pending: Launch | None) -> Launch:
        """Queue the forward and the sampling of ``plan``; nothing waits for the device here."""
        started = time.perf_counter()
        inputs = [(item.seq.blocks, *item.seq.next_input(item.num_tokens)) for item in plan]
        batch = ForwardBatch.build(inputs, self.blocks.block_size, self.device)
        self._fill_pending(plan, inputs, batch, pending)
        sampling = [i for i, item in enumerate(plan) if item.samples]
        scored = self._prompt_rows(plan, batch)
        if self.graphs is not None and batch.meta.decode_only and len(plan) <= self.graphs.max_batch():
            logits = self.graphs.run(batch)  # decode only: every row samples, in plan order
        else:
            ends = list(accumulate(batch.query_lens))
            rows = [ends[i] - 1 for i in sampling] + [row for _, rows in scored for row in rows]
            logits = self.model(batch, self.cache, self._upload(rows)).float()
        if not self.on_device_sampling:
            logits = logits.cpu()
        prompts = self._prompt_tokens(scored, logits[len(sampling) :])
        logits = logits[: len(sampling)]
        for item in plan:
            self.planner.computed(item)
        self.steps += 1
        seqs = [plan[i].seq for i in sampling]
        if self.forks:
            seqs, logits = self._fork(seqs, logits)
        launch = self._sample(seqs, logits)
        launch.prompts = prompts
        for seq in seqs:
            seq.reserve()
        log.debug(
            "step: %d seqs, %d tokens, %d sampled, queued in %.1f ms",
            len(plan),
            len(batch.token_ids),
            len(seqs),
            (time.perf_counter() - started) * 1000,
        )
        return launch

    def _fill_pending(
        self, plan: list[Scheduled], inputs: list[tuple], batch: ForwardBatch, pending: Launch | None
    ) -> None:
        """Copy, on the device, each input token not read yet from the step that sampled it."""
        dst, src, offset = [], [], 0
        for item, (_, ids, _) in zip(plan, inputs, strict=True):
            offset += len(ids)
            if ids and ids[-1] == PENDING:  # only a sequence's last token can be unread
                if pending is None or pending.token_ids is None:
                    raise RuntimeError(f"request {item.seq.request_id}: an unread token without its step")
                dst.append(offset - 1)
                src.append(pending.rows[id(item.seq)])
        if dst:
            batch.token_ids[self._upload(dst)] = pending.token_ids[self._upload(src)]

    def _upload(self, indices: list[int]) -> torch.Tensor:
        return upload(torch.tensor(indices, dtype=torch.int64), self.device)

    def _finish(self, launch: Launch) -> list[TokenEvent]:
        """Read a launched step's tokens: append, detokenise, check stops, end finished sequences."""
        picked = launch.sampled if launch.sampled is not None else read_host(launch.copy)
        events = []
        for seq, choice in zip(launch.seqs, picked, strict=True):
            key = (seq.request_id, seq.index)
            if self.sequences.get(key) is not seq:
                continue  # it stopped or was cancelled after this step was queued: the row is void
            first = not seq.output_ids
            event = seq.append(*choice)
            if first:
                event.cached_tokens = seq.cached_prompt_tokens
            event.prompt_tokens = launch.prompts.get(id(seq), ())
            self.planner.seal(seq)  # blocks whose last unread token this was
            if event.finish_reason is not None:
                self.sequences.pop(key, None)
                self.planner.finish(seq)
            events.append(event)
        return events

    @staticmethod
    def _prompt_rows(plan: list[Scheduled], batch: ForwardBatch) -> list[tuple[Sequence, range]]:
        """(sequence, packed rows of its prompt but the last) for whole-prompt prefills that asked for
        prompt log-probabilities (not again when recomputing after a preemption)."""
        out, start = [], 0
        for item, length in zip(plan, batch.query_lens, strict=True):
            seq = item.seq
            if seq.params.prompt_logprobs and seq.num_cached == 0 and not seq.generated and length > 1:
                out.append((seq, range(start, start + length - 1)))
            start += length
        return out

    def _prompt_tokens(self, scored: list[tuple[Sequence, range]], logits: torch.Tensor) -> dict[int, tuple]:
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
        return out, torch.cat([logits, logits[upload(torch.tensor(rows), logits.device)]]) if rows else logits

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

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> Launch:
        """Row i's next token, its log-probability and top alternatives, for ``seqs[i]``: on the host
        now, or on the device as one batched operation whose results start their one copy to the host."""
        if not self.on_device_sampling:
            return Launch(seqs, sampled=sample_next(logits, seqs, self.eos_ids, self.argmax))
        tensors = SamplingTensors.build(seqs, self.eos_ids, logits.shape[-1], self.device)
        wanted = [seq.params.top_logprobs for seq in seqs]
        picked = sample_batch(logits, tensors, [seq.generator for seq in seqs], max(wanted, default=0))
        ahead = not any(reads_history(seq) for seq in seqs)
        return Launch(seqs, copy=copy_to_host(picked, wanted), token_ids=picked.token_ids, plan_ahead=ahead)

    def close(self) -> None:
        """Release what outlives the object: a parallel group's follower processes."""
        if self.group is not None:
            self.group.close()
            self.group = None

    def abort_all(self, reason: str) -> list[TokenEvent]:
        """After a failed step: free every sequence's blocks and end each with an error."""
        events = [TokenEvent(rid, -1, "", 0.0, "error", reason, index=i) for rid, i in self.sequences]
        for seq in self.sequences.values():
            self.planner.finish(seq)
        self.pending = None
        self.sequences.clear()
        self.forks.clear()
        return events
