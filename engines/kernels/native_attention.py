"""The native CPU attention over the paged KV cache (csrc/paged_attention.cpp).

`native_paged_attention` treats every packed token as one query over its own sequence's cached prefix,
so decode tokens and short prefill chunks share one call per layer; `native_prefill_attention` cuts
longer chunks into query tiles that share each key and value row they read. The definition both are
tested against is engines/kernels/paged.py:paged_attention_reference.
"""

from __future__ import annotations

import torch

from engines.kernels.build import load_kernel
from engines.kernels.paged import PagedAttentionMeta


def native_paged_attention(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    meta: PagedAttentionMeta,
) -> torch.Tensor:
    """q [T, heads, head_dim] -> [T, heads, head_dim], every packed token one query."""
    kernel = load_kernel("paged_attention")
    return kernel.paged_attention(
        q, cache_k, cache_v, meta.block_tables, meta.token_seq, meta.token_kv_lens, q.shape[-1] ** -0.5
    )


def native_prefill_attention(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    meta: PagedAttentionMeta,
    min_tile_tokens: int = 1,
) -> torch.Tensor:
    """q [T, heads, head_dim] -> [T, heads, head_dim], every sequence in one call: chunks of at least
    ``min_tile_tokens`` tokens as query tiles, shorter ones (decodes) token by token."""
    kernel = load_kernel("paged_attention")
    return kernel.paged_prefill_attention(
        q,
        cache_k,
        cache_v,
        meta.block_tables,
        meta.query_start,
        meta.context_lens,
        q.shape[-1] ** -0.5,
        min_tile_tokens,
    )
