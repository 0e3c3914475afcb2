"""Attention over the slot KV cache for a packed batch mixing prefill and decode sequences.

With the native kernel, every token of the step (prefill and decode alike) is one query over its own
slot's cache prefix up to its position: causal prefill attention is just many such queries, so one
call per layer serves the whole batch. That re-reads the prefix once per query, which stops paying
for long chunks: those (over LONG_PREFILL_TOKENS) get causal SDPA instead. Without the kernel, decode
sequences share one batched SDPA call over a view of the cache rows they occupy (no copy, no
gather), and prefill sequences each get causal SDPA over their own cache prefix.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from engines.kernels.decode_attention import DecodeAttention
from engines.llama.batch import DecodePlan, ForwardBatch, PrefillPlan

LONG_PREFILL_TOKENS = 384
"""Above this many tokens a prefill chunk is faster in SDPA than as per-token kernel queries (bf16, 2
cores: 2x300 tokens 308 vs 359 ms with the kernel, 2x1000 1758 vs 1443 ms with SDPA)."""


def attend(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    batch: ForwardBatch,
    decode_kernel: DecodeAttention | None = None,
) -> torch.Tensor:
    """Attention output [T, heads * head_dim] for queries q [T, heads, head_dim] (K/V already written)."""
    if decode_kernel is not None:
        return _attend_native(q, cache_k, cache_v, batch, decode_kernel)
    plan = batch.decode
    if plan is not None and plan.all_tokens:
        return decode_attention(q, cache_k, cache_v, plan).flatten(1)
    out = q.new_empty(q.shape)  # [T, heads, head_dim]
    if plan is not None:
        decoded = decode_attention(q[plan.token_rows], cache_k, cache_v, plan)
        out.index_copy_(0, plan.token_rows, decoded)
    for prefill in batch.prefills:
        out[prefill.start : prefill.end] = prefill_attention(q, cache_k, cache_v, prefill)
    return out.flatten(1)


def _attend_native(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    batch: ForwardBatch,
    kernel: DecodeAttention,
) -> torch.Tensor:
    if max(batch.query_lens) <= LONG_PREFILL_TOKENS:
        return kernel(q, cache_k, cache_v, batch.token_slots, batch.token_kv_lens).flatten(1)
    long = [p for p in batch.prefills if p.end - p.start > LONG_PREFILL_TOKENS]
    short = torch.ones(q.shape[0], dtype=torch.bool)
    for prefill in long:
        short[prefill.start : prefill.end] = False
    rows = short.nonzero().flatten()
    out = q.new_empty(q.shape)  # [T, heads, head_dim]
    if rows.numel():
        out[rows] = kernel(q[rows], cache_k, cache_v, batch.token_slots[rows], batch.token_kv_lens[rows])
    for prefill in long:
        out[prefill.start : prefill.end] = prefill_attention(q, cache_k, cache_v, prefill)
    return out.flatten(1)


def decode_attention(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, plan: DecodePlan
) -> torch.Tensor:
    """q [B, heads, head_dim] (one token per sequence) -> [B, heads, head_dim].

    In bf16/fp16 the query heads sharing a kv head become that kv head's query rows
    ([R, kv_heads, group, head_dim]), so SDPA needs no GQA expansion: on CPU that is ~6x faster than
    `enable_gqa=True` with one query row, while in fp32 `enable_gqa` is ~20% faster (measured with
    scripts/bench_llama_step.py --attention). Unlike a gather of the slots' rows, the view copies nothing.
    """
    rows, heads, head_dim = plan.slot_hi - plan.slot_lo, q.shape[1], q.shape[2]
    kv_heads = cache_k.shape[1]
    heads_as_rows = q.dtype != torch.float32
    shape = (kv_heads, heads // kv_heads, head_dim) if heads_as_rows else (heads, 1, head_dim)
    keys = cache_k[plan.slot_lo : plan.slot_hi, :, : plan.kv_len]  # [R, kv_heads, kv_len, head_dim] view
    values = cache_v[plan.slot_lo : plan.slot_hi, :, : plan.kv_len]
    if plan.in_slot_order:
        queries = q.reshape(rows, *shape)
    else:  # place each sequence's query on its slot's row; other rows compute garbage, discarded
        queries = q.new_zeros(rows, *shape).index_copy_(0, plan.slot_rows, q.reshape(-1, *shape))
    out = functional.scaled_dot_product_attention(
        queries, keys, values, attn_mask=plan.mask, enable_gqa=not heads_as_rows
    )
    out = out.reshape(rows, heads, head_dim)
    return out if plan.in_slot_order else out[plan.slot_rows]


def prefill_attention(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, plan: PrefillPlan
) -> torch.Tensor:
    """Causal attention of one sequence's chunk over its cache prefix -> [chunk_len, heads, head_dim]."""
    queries = q[plan.start : plan.end].transpose(0, 1).unsqueeze(0)  # [1, heads, chunk_len, head_dim]
    keys = cache_k[plan.slot : plan.slot + 1, :, : plan.context_len]  # [1, kv_heads, context_len, head_dim]
    values = cache_v[plan.slot : plan.slot + 1, :, : plan.context_len]
    out = functional.scaled_dot_product_attention(
        queries, keys, values, attn_mask=plan.mask, is_causal=plan.mask is None, enable_gqa=True
    )
    return out.squeeze(0).transpose(0, 1)  # [chunk_len, heads, head_dim]
