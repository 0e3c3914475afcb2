"""`TritonOps`: the fused engine's ops as Triton GPU kernels (engines/kernels/triton_kernels.py), with the
same signatures and rounding as `TorchOps`, plus paged attention over the `engines.kernels.paged` contract.

Triton is optional: this module imports without it, and `triton_available` says why the kernels cannot run.
"""

from __future__ import annotations

import os

import torch

from engines.kernels.ops import TorchOps
from engines.kernels.paged import PagedAttentionMeta

try:
    from engines.kernels import triton_kernels as kernels
except ImportError as exc:  # triton missing or broken: TritonOps is unusable, the rest still loads
    kernels = None
    _IMPORT_ERROR = str(exc)


def triton_available(device: torch.device | str) -> str | None:
    """None when the Triton kernels can run on `device` (CUDA, or CPU under TRITON_INTERPRET=1 set before
    the kernels were imported, which only tests should do); otherwise the reason they cannot."""
    if kernels is None:
        return f"triton cannot be imported ({_IMPORT_ERROR})"
    kind = torch.device(device).type
    if kind == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton kernels need a CUDA device, not {kind} (or TRITON_INTERPRET=1 for CPU tests)"


class TritonOps(TorchOps):
    """The Triton kernels; same signatures and results as TorchOps, plus `attention`."""

    name = "triton"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return kernels.rms_norm(x, weight, eps)

    @classmethod
    def add_rms_norm(
        cls, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.add_rms_norm(x, residual, weight, eps)

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        return kernels.silu_mul(gate_up)

    @staticmethod
    def rope_and_cache(
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        offsets: torch.Tensor,
        block_ids: torch.Tensor,
        heads: int,
        kv_heads: int,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
    ) -> torch.Tensor:
        """TorchOps.rope_and_cache with (positions, slots) read as the paged cache's (in-block offsets,
        block ids): token t's k and v land at cache[block_ids[t], :, offsets[t]]."""
        return kernels.rope_and_cache(qkv, cos, sin, offsets, block_ids, heads, kv_heads, cache_k, cache_v)

    @staticmethod
    def attention(
        q: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        meta: PagedAttentionMeta,
        scale: float | None = None,
    ) -> torch.Tensor:
        """`paged_attention_reference` on the GPU: flash-decoding when every sequence feeds one token,
        else the varlen causal prefill kernel (which also takes the decode rows of a mixed batch).
        `scale` defaults to SDPA's 1 / sqrt(head_dim), so TorchOps.attention's 4-argument call works.

        Decode splits come from meta.max_context_len and the batch shape (`decode_splits`): a Python
        int, so no host sync; the results do not depend on the split count."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if meta.decode_only:
            splits = kernels.decode_splits(meta.max_context_len, meta.num_seqs, cache_k.shape[1])
            return kernels.paged_decode_attention(
                q, cache_k, cache_v, meta.block_tables, meta.context_lens, scale, splits
            )
        return kernels.paged_prefill_attention(q, cache_k, cache_v, meta, scale)
