"""Decode attention over a slot KV cache: the native CPU kernel and the plain-torch reference it matches.

Both take one query token per sequence, q [B, heads, head_dim], the layer's cache
[slots, kv_heads, max_len, head_dim], each sequence's slot and kv_len ([B] int64), and return
[B, heads, head_dim]. The reference is the definition; tests compare the kernel against it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.nn import functional

from engines.kernels.build import KernelBuildError, load_kernel

log = logging.getLogger("engines.kernels")

DecodeAttention = Callable[..., torch.Tensor]
"""(q, cache_k, cache_v, slots, kv_lens) -> [B, heads, head_dim], as `decode_attention_reference`."""
BACKENDS = ("auto", "native", "sdpa")


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


def select_decode_attention(backend: str, device: torch.device | str) -> DecodeAttention | None:
    """The kernel for `option.attention_backend`, or None for the engine's batched SDPA path.

    auto: the native kernel on CPU when it builds (else SDPA, with a warning); native: the kernel or an
    error; sdpa: never the kernel. On GPUs the kernel does not apply and SDPA is used.
    """
    if backend not in BACKENDS:
        raise ValueError(f"option.attention_backend={backend!r} is not one of {', '.join(BACKENDS)}")
    on_cpu = torch.device(device).type == "cpu"
    if backend == "sdpa" or (backend == "auto" and not on_cpu):
        return None
    if not on_cpu:
        raise ValueError(f"option.attention_backend=native runs on CPU only, not on {device}")
    try:
        load_kernel("decode_attention")
    except KernelBuildError as exc:
        if backend == "native":
            raise
        log.warning("%s; decode attention falls back to SDPA (slower)", exc)
        return None
    return native_decode_attention
