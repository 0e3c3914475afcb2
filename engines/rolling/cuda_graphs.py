"""Decode steps as CUDA-graph replays: one graph per batch-size bucket, captured at start-up.

A decode step of a 7B model launches hundreds of small kernels; eagerly, the host cannot issue them as
fast as the GPU runs them, so batch 1 to 64 all took the same ~13 ms on an H200. A captured graph
replays every launch of the step at once. Inputs live in static buffers that each replay overwrites
(one device copy per tensor); a batch smaller than its bucket is padded with rows that write to a
reserved padding block and attend one key, so they cannot touch any sequence's cache. Only decode-only
steps replay (prefill chunks run eagerly), and only with kernels whose launches need no host sync
(TritonOps: split counts come from max_model_len, a Python int).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from engines.kernels.paged import PagedAttentionMeta
from engines.llama.batch import ForwardBatch

log = logging.getLogger("engines.rolling")


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_batch (vLLM's capture sizes): padding wastes < 8 rows."""
    sizes = [size for size in (1, 2, 4) if size < max_batch]
    sizes += list(range(8, max_batch, 8))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphRunner:
    """Captured decode graphs of ``model`` over ``cache``; ``run(batch)`` replays the fitting one."""

    def __init__(
        self, model: Any, cache: Any, max_batch: int, max_model_len: int, padding_block: int
    ) -> None:
        self.model, self.cache = model, cache
        self.buckets = batch_buckets(max_batch)
        self.max_model_len, self.padding_block = max_model_len, padding_block
        device, size = cache.device, self.buckets[-1]
        width = -(-max_model_len // cache.block_size)
        self.token_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.token_blocks = torch.full((size,), padding_block, dtype=torch.int64, device=device)
        self.token_offsets = torch.zeros(size, dtype=torch.int64, device=device)
        self.block_tables = torch.full((size, width), padding_block, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(size, dtype=torch.int32, device=device)
        self.token_kv_lens = torch.ones(size, dtype=torch.int64, device=device)
        self.arange = torch.arange(size + 1, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def max_batch(self) -> int:
        return self.buckets[-1]

    def _static_batch(self, size: int) -> ForwardBatch:
        meta = PagedAttentionMeta(
            block_tables=self.block_tables[:size],
            query_start=self.arange[: size + 1].to(torch.int32),
            context_lens=self.context_lens[:size],
            token_seq=self.arange[:size],
            token_kv_lens=self.token_kv_lens[:size],
            max_query_len=1,
            max_context_len=self.max_model_len,  # fixes the decode split count for every replay
        )
        return ForwardBatch.from_tensors(
            self.token_ids[:size],
            self.positions[:size],
            meta,
            self.token_blocks[:size],
            self.token_offsets[:size],
            self.arange[:size],
            self.cache.block_size,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (Triton compiles) and capture every bucket, largest first, sharing one memory pool."""
        started = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.cache.device)[0]
        pool = None
        for size in reversed(self.buckets):
            batch = self._static_batch(size)
            self.model(batch, self.cache)  # eager warm-up: compiles kernels, allocates workspaces
            torch.cuda.synchronize(self.cache.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.model(batch, self.cache)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.cache.device)
        used = free_before - torch.cuda.mem_get_info(self.cache.device)[0]
        log.info(
            "CUDA graphs: %d decode batch sizes (1..%d) captured in %.1f s, %.0f MiB",
            len(self.buckets),
            self.buckets[-1],
            time.perf_counter() - started,
            used / 2**20,
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [num_seqs, vocab] of a decode-only ``batch`` (at most max_batch() sequences). The
        tensor is the graph's output buffer: read it before the next replay."""
        count = batch.num_seqs
        size = next(bucket for bucket in self.buckets if bucket >= count)
        meta = batch.meta
        self.token_ids[:count].copy_(batch.token_ids)
        self.positions[:count].copy_(batch.positions)
        self.token_blocks[:count].copy_(batch.token_blocks)
        self.token_offsets[:count].copy_(batch.token_offsets)
        self.block_tables[:count, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.context_lens[:count].copy_(meta.context_lens)
        self.token_kv_lens[:count].copy_(meta.token_kv_lens)
        if size > count:  # padding rows: one key in the padding block, nothing of anyone else's
            self.token_blocks[count:size].fill_(self.padding_block)
            self.token_offsets[count:size].zero_()
            self.positions[count:size].zero_()
            self.block_tables[count:size, 0].fill_(self.padding_block)
            self.context_lens[count:size].fill_(1)
            self.token_kv_lens[count:size].fill_(1)
        if size in self.graphs:
            self.graphs[size].replay()
            return self.outputs[size][:count]
        return self.model(self._static_batch(size), self.cache)[:count]  # not captured: same inputs, eagerly
