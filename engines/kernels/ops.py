"""The decoder's hot-path ops behind one small interface: plain-torch references and kernels.

`TorchOps` is the definition (HF's rounding, step by step; attention as in engines/kernels/paged.py)
and runs anywhere; `NativeOps` runs the same ops as compiled CPU kernels (csrc/fused_ops.cpp,
csrc/paged_attention.cpp) and `TritonOps` (engines/kernels/triton_ops.py) as Triton kernels for GPUs;
both are tested against `TorchOps`. `option.kernels` picks one: auto (native on CPU when it builds,
Triton on CUDA when it imports), native, triton, or torch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.nn import functional

from engines.kernels.build import KernelBuildError, load_kernel
from engines.kernels.native_attention import native_paged_attention, native_prefill_attention
from engines.kernels.paged import (
    PagedAttentionMeta,
    batched_decode_attention,
    paged_attention_reference,
)

log = logging.getLogger("engines.kernels")

CHOICES = ("auto", "native", "triton", "torch")
MAX_GROUP, MAX_HEAD_DIM = 16, 256
"""Limits of the native kernels' stack buffers (csrc/paged_attention.cpp kMaxGroup, kMaxHeadDim)."""
LONG_PREFILL_TOKENS = 16
"""Batches with a chunk longer than this many tokens take the query-tiled kernel (native_prefill_attention),
which runs their decodes and short chunks token by token as before. Measured on 2 cores, prefill
attention of one layer against the per-token kernel: bf16 gains from 4 tokens (16: 7 vs 21 us, 1024:
3.8 vs 15 ms), fp32 from about 16 (16: 12 vs 15 us, 1024: 9 vs 24 ms; 8 tokens: 8 vs 8 us)."""


def native_unsupported(heads: int, kv_heads: int, head_dim: int) -> str | None:
    """Why the native kernels cannot run a model with these attention shapes; None if they can."""
    if kv_heads < 1 or heads % kv_heads:
        return f"{heads} heads are not a multiple of {kv_heads} kv heads"
    if heads // kv_heads > MAX_GROUP or head_dim > MAX_HEAD_DIM or head_dim % 2:
        group = heads // kv_heads
        return f"group {group} / head_dim {head_dim} exceed the limits ({MAX_GROUP} / even, {MAX_HEAD_DIM})"
    return None


class TorchOps:
    """Reference implementations."""

    name = "torch"

    @staticmethod
    def attention(
        q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, meta: PagedAttentionMeta
    ) -> torch.Tensor:
        """q [T, heads, head_dim] over the paged cache (this step's K/V already written) -> same shape."""
        if meta.decode_only:
            return batched_decode_attention(q, cache_k, cache_v, meta)
        return paged_attention_reference(q, cache_k, cache_v, meta)

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """HF's LlamaRMSNorm: normalise in float32, cast back, then scale (same rounding as HF)."""
        normed = functional.rms_norm(x.float(), weight.shape, eps=eps)
        return weight * normed.to(x.dtype)

    @classmethod
    def add_rms_norm(
        cls, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual)."""
        h = x + residual
        return cls.rms_norm(h, weight, eps), h

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] -> silu(gate) * up, [T, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return functional.silu(gate) * up

    @staticmethod
    def argmax(logits: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] -> [rows] int64: greedy decoding's pick (the first of equal maxima; NaN wins)."""
        return torch.argmax(logits, -1)

    @staticmethod
    def rope_and_cache(
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        offsets: torch.Tensor,
        blocks: torch.Tensor,
        heads: int,
        kv_heads: int,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
    ) -> torch.Tensor:
        """Rotate q and k of qkv [T, (heads + 2 kv_heads) * head_dim] by each token's cos/sin rows
        [T, head_dim] and store k and v at (block, :, offset) of the paged caches.

        Returns q [T, heads, head_dim]."""
        tokens, head_dim = qkv.shape[0], cache_k.shape[-1]
        qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        half = head_dim // 2
        rotated = qk * c + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * s
        v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
        cache_k[blocks, :, offsets] = rotated[:, heads:]
        cache_v[blocks, :, offsets] = v
        return rotated[:, :heads]


class NativeOps(TorchOps):
    """The compiled CPU kernels; same signatures and results as TorchOps."""

    name = "native"

    @staticmethod
    def attention(
        q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, meta: PagedAttentionMeta
    ) -> torch.Tensor:
        """One kernel call for the whole step: token by token (decodes, short chunks) unless a chunk is
        longer than LONG_PREFILL_TOKENS, then such chunks as query tiles and the rest token by token."""
        if meta.max_query_len <= LONG_PREFILL_TOKENS:
            return native_paged_attention(q, cache_k, cache_v, meta)
        return native_prefill_attention(q, cache_k, cache_v, meta, min_tile_tokens=LONG_PREFILL_TOKENS + 1)

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return load_kernel("fused_ops").rms_norm(x, weight, eps, None)[0]

    @classmethod
    def add_rms_norm(
        cls, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        normed, h = load_kernel("fused_ops").rms_norm(x, weight, eps, residual)
        return normed, h

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        """bf16 / fp16: one pass with its own vectorised exp, within an ulp of torch's (a result moves by
        one unit of the 16-bit type about once in 2^15 elements); float32, or a build without AVX-512:
        torch's own kernels called from C++ (the same results, one dispatch)."""
        if gate_up.dim() != 2 or gate_up.stride(-1) != 1:
            return TorchOps.silu_mul(gate_up)
        return load_kernel("fused_ops").silu_mul(gate_up)

    @staticmethod
    def rope_and_cache(*args: Any) -> torch.Tensor:
        """TorchOps.rope_and_cache's arguments, in the same order."""
        return load_kernel("fused_ops").rope_and_cache(*args)

    @staticmethod
    def argmax(logits: torch.Tensor) -> torch.Tensor:
        """torch's CPU argmax is a scalar reduction: 86 us per 49,152-token row here, against a few."""
        plain = logits.dim() == 2 and logits.dtype == torch.float32 and logits.device.type == "cpu"
        if not plain or not logits.shape[1]:
            return torch.argmax(logits, -1)
        return load_kernel("fused_ops").argmax_rows(logits if logits.stride(1) == 1 else logits.contiguous())


def select_ops(
    choice: str, device: torch.device | str, shape: tuple[int, int, int] | None = None
) -> type[TorchOps]:
    """The ops for `option.kernels`: auto (native on CPU when they build and fit the model's
    (heads, kv_heads, head_dim) `shape`, Triton on GPUs when it imports, else torch with a warning);
    native, triton (or an error); torch."""
    if choice not in CHOICES:
        raise ValueError(f"option.kernels={choice!r} is not one of {', '.join(CHOICES)}")
    on_cpu = torch.device(device).type == "cpu"
    if choice == "torch":
        return TorchOps
    if choice == "triton" or (choice == "auto" and not on_cpu):
        return _triton_ops(choice, device)
    if not on_cpu:
        raise ValueError(f"option.kernels=native runs on CPU only, not on {device}")
    reason = native_unsupported(*shape) if shape else None
    if reason:
        if choice == "native":
            raise ValueError(f"option.kernels=native cannot run this model: {reason}")
        log.warning("Native kernels cannot run this model (%s); using the plain-torch ops", reason)
        return TorchOps
    try:
        load_kernel("paged_attention")
        load_kernel("fused_ops")
    except KernelBuildError as exc:
        if choice == "native":
            raise
        log.warning("%s; using the plain-torch ops instead (slower)", exc)
        return TorchOps
    return NativeOps


def _triton_ops(choice: str, device: torch.device | str) -> type[TorchOps]:
    """TritonOps where Triton runs (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    try:
        from engines.kernels.triton_ops import TritonOps, triton_available
    except ImportError as exc:
        reason: str | None = f"Triton does not import ({exc})"
    else:
        reason = triton_available(device)
    if reason is None:
        return TritonOps
    if choice == "triton":
        raise ValueError(f"option.kernels=triton cannot run on {device}: {reason}")
    log.warning("Triton kernels cannot run on %s (%s); using the plain-torch ops (slower)", device, reason)
    return TorchOps
