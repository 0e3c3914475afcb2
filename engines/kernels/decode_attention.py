"""Decode attention over a slot KV cache: the native CPU kernel and the plain-torch reference it matches.

Both take one query token per sequence, q [B, heads, head_dim], the layer's cache
[slots, kv_heads, max_len, head_dim], each sequence's slot and kv_len ([B] int64), and return
[B, heads, head_dim]. The reference is the definition; tests compare the kernel against it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional

from engines.kernels.build import load_kernel

DecodeAttention = Callable[..., torch.Tensor]
"""(q, cache_k, cache_v, slots, kv_lens) -> [B, heads, head_dim], as `decode_attention_reference`."""


def decode_attention_reference(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, slots: torch.Tensor, kv_lens: torch.Tensor
) -> torch.Tensor:
    """One SDPA call per sequence over exactly its own cache prefix."""
    out = torch.empty_like(q)
    for row, (slot, kv_len) in enumerate(zip(slots.tolist(), kv_lens.tolist(), strict=True)):
        keys = cache_k[slot, :, :kv_len].unsqueeze(0)  # [1, kv_heads, kv_len, head_dim]
        values = cache_v[slot, :, :kv_len].unsqueeze(0)
        query = q[row].unsqueeze(0).unsqueeze(2)  # [1, heads, 1, head_dim]
        out[row] = functional.scaled_dot_product_attention(query, keys, values, enable_gqa=True)[0, :, 0]
    return out


def native_decode_attention(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, slots: torch.Tensor, kv_lens: torch.Tensor
) -> torch.Tensor:
    """The compiled kernel (csrc/decode_attention.cpp); CPU only."""
    kernel = load_kernel("decode_attention")
    return kernel.decode_attention(q, cache_k, cache_v, slots, kv_lens, q.shape[-1] ** -0.5)
