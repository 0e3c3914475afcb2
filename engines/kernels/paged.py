"""The paged KV cache's attention contract: metadata built once per step, and the plain-torch reference.

Each layer's cache is K and V of shape [num_blocks, num_kv_heads, block_size, head_dim]: a sequence's
token at position p lives in block ``block_tables[s, p // block_size]`` at offset ``p % block_size``.
A step's new tokens are packed into [T] (each sequence's chunk in order); sequence s owns rows
``query_start[s]:query_start[s + 1]`` and, after this step's K/V are written, has ``context_lens[s]``
tokens cached, so its query i sits at position ``context_lens[s] - query_len + i`` and attends every key
up to that position (causal). A decode is a chunk of one token. Every attention kernel (native CPU,
Triton) takes this contract and is tested against ``paged_attention_reference``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
from torch.nn import functional

from engines.device import upload


@dataclass
class PagedAttentionMeta:
    """Per-step attention inputs, on the model's device; shared by every layer of the step."""

    block_tables: torch.Tensor
    """[S, max_blocks] int32: each sequence's cache blocks in order, padded with 0 (never read)."""
    query_start: torch.Tensor
    """[S + 1] int32 cumulative query lengths (cu_seqlens)."""
    context_lens: torch.Tensor
    """[S] int32 tokens cached per sequence after this step's K/V are written."""
    token_seq: torch.Tensor
    """[T] int64 sequence of each packed token (its row of block_tables)."""
    token_kv_lens: torch.Tensor
    """[T] int64 keys each token attends: its position + 1."""
    max_query_len: int
    max_context_len: int

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def decode_only(self) -> bool:
        """Every sequence feeds exactly one token this step."""
        return self.max_query_len == 1

    def to(self, device: torch.device | str) -> PagedAttentionMeta:
        """The same metadata with its tensors on ``device``."""
        return PagedAttentionMeta(
            *(upload(getattr(self, name), device) for name in TENSOR_FIELDS),
            max_query_len=self.max_query_len,
            max_context_len=self.max_context_len,
        )

    @classmethod
    def build(
        cls,
        block_tables: list[list[int]],
        query_lens: list[int],
        context_lens: list[int],
        device: torch.device | str = "cpu",
    ) -> PagedAttentionMeta:
        """From plain lists (one entry per sequence); tensors land on ``device``. Built in Python and
        converted once per field: a decode step's metadata took 135 us as a dozen small torch ops
        (and a tensor per block table: 745 us at 64 sequences)."""
        width = max(1, max(len(t) for t in block_tables))
        tables = [list(table) + [0] * (width - len(table)) for table in block_tables]
        starts = [0, *accumulate(query_lens)]
        token_seq = [seq for seq, length in enumerate(query_lens) for _ in range(length)]
        # token j of sequence s sits at context - query_len + j: kv_len = that + 1
        kv_lens = [c - q + j + 1 for q, c in zip(query_lens, context_lens, strict=True) for j in range(q)]
        return cls(
            block_tables=torch.tensor(tables, dtype=torch.int32).to(device),
            query_start=torch.tensor(starts, dtype=torch.int32).to(device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32).to(device),
            token_seq=torch.tensor(token_seq, dtype=torch.int64).to(device),
            token_kv_lens=torch.tensor(kv_lens, dtype=torch.int64).to(device),
            max_query_len=max(query_lens),
            max_context_len=max(context_lens),
        )


TENSOR_FIELDS = ("block_tables", "query_start", "context_lens", "token_seq", "token_kv_lens")


def gather_sequence_kv(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """One sequence's first ``context_len`` cached rows as [kv_heads, context_len, head_dim] (a copy)."""
    block_size = cache.shape[2]
    blocks = block_table[: -(-context_len // block_size)].long()
    rows = cache[blocks].transpose(0, 1).flatten(1, 2)  # [kv_heads, blocks * block_size, head_dim]
    return rows[:, :context_len]


def sequence_attention(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float | None = None,
) -> torch.Tensor:
    """One sequence's chunk q [query_len, heads, head_dim], the last query_len of its context_len cached
    tokens, attending causally over all of them -> [query_len, heads, head_dim]."""
    query_len = q.shape[0]
    keys = gather_sequence_kv(cache_k, block_table, context_len).unsqueeze(0)
    values = gather_sequence_kv(cache_v, block_table, context_len).unsqueeze(0)
    query = q.transpose(0, 1).unsqueeze(0)  # [1, heads, query_len, head_dim]
    mask = None
    if context_len > query_len:  # a chunk after a cached prefix: query i sits at context - query_len + i
        positions = torch.arange(context_len - query_len, context_len, device=q.device)
        mask = torch.arange(context_len, device=q.device)[None, :] <= positions[:, None]
    attended = functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=True, scale=scale
    )
    return attended[0].transpose(0, 1)


def paged_attention_reference(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    meta: PagedAttentionMeta,
    scale: float | None = None,
) -> torch.Tensor:
    """q [T, heads, head_dim] -> [T, heads, head_dim]: one causal SDPA call per sequence over exactly
    its cached keys (the definition every kernel is tested against)."""
    out = torch.empty_like(q)
    starts, contexts = meta.query_start.tolist(), meta.context_lens.tolist()
    for s, context in enumerate(contexts):
        start, end = starts[s], starts[s + 1]
        out[start:end] = sequence_attention(
            q[start:end], cache_k, cache_v, meta.block_tables[s], context, scale
        )
    return out


def batched_decode_attention(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, meta: PagedAttentionMeta
) -> torch.Tensor:
    """Decode-only batches in one SDPA call over every sequence's blocks gathered and padded to the
    longest context (plain torch: the fallback where no kernel runs)."""
    batch, heads, head_dim = q.shape
    kv_heads, block_size = cache_k.shape[1], cache_k.shape[2]
    width = -(-meta.max_context_len // block_size)
    tables = meta.block_tables[:, :width].long()
    keys = cache_k[tables].transpose(1, 2).flatten(2, 3)  # [B, kv_heads, width * block_size, head_dim]
    values = cache_v[tables].transpose(1, 2).flatten(2, 3)
    mask = torch.arange(width * block_size, device=q.device)[None, :] < meta.context_lens[:, None]
    # the query heads sharing a kv head become its query rows: no GQA expansion of the keys
    queries = q.view(batch, kv_heads, heads // kv_heads, head_dim)
    out = functional.scaled_dot_product_attention(queries, keys, values, attn_mask=mask[:, None, None, :])
    return out.reshape(batch, heads, head_dim)
