"""A bias-optional linear layer with a fast path for CPU decode steps.

`F.linear` on CPU re-lays-out a bf16 or fp32 weight for every call: for a few rows it took twice as
long as a layout prepared once. Two preparations exist (`Linear.pack`):
- the native dense kernel (engines/kernels/csrc/dense_gemm.cpp, AVX-512 BF16 CPUs): up to
  DENSE_MAX_ROWS rows it reads the weight as stored, faster than oneDNN's packed layout there, and
  nothing is re-laid-out at start-up, so a weight stays where it was loaded; larger batches, which are
  compute-bound, take `F.linear`;
- elsewhere, oneDNN's blocked format (the private `mkldnn._reorder_linear_weight` /
  `_linear_pointwise` ops inductor's freezing pass uses), verified against `F.linear` and silently
  skipped where the ops are missing, so the model still runs anywhere.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch import nn
from torch.nn import functional

log = logging.getLogger("engines.llama")

DENSE_MAX_ROWS = 16
"""Rows up to which the dense kernel runs. Measured on this CPU (bf16, two threads, the default model's
and a 1.1 B model's tensor-parallel shard's projections): at 1-8 rows it took 0.4-0.9x the time of
oneDNN's packed layout, at 16 1.07-1.3x (F.linear on the plain layout 1.35-1.4x); from 32 rows F.linear
beats it (which is 1.1-1.2x the packed layout there: the cost of not packing at larger batches)."""
DENSE_DTYPES = (torch.bfloat16, torch.float32)

PACK_BATCH_HINT = 64
"""Rows oneDNN tunes the packed layout for; any row count works, this one measured best for 1..64."""


def _param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def dense_kernel(dtype: torch.dtype) -> Any | None:
    """The compiled dense kernel when it runs here for weights of `dtype` (built with AVX-512 BF16 and
    not turned off by LMI_DENSE_KERNEL=0); None otherwise (a build failure is logged once)."""
    if dtype not in DENSE_DTYPES or os.environ.get("LMI_DENSE_KERNEL", "1") == "0":
        return None
    return _load_dense()


@cache
def _load_dense() -> Any | None:
    from engines.device import cpu_bf16_flags
    from engines.kernels.build import KernelBuildError, load_kernel

    if "avx512_bf16" not in cpu_bf16_flags():
        return None
    try:
        kernel = load_kernel("dense_gemm")
    except KernelBuildError as exc:
        log.warning("%s; projections use oneDNN's packed layout instead", exc)
        return None
    return kernel if kernel.available() else None


def dense_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the dense kernel computes: float32 sums of x @ weight.T (+ bias), rounded once to x's dtype.
    (In bf16 the kernel's vdpbf16ps flushes subnormal inputs and results to zero; the reference keeps
    them: values below 1.2e-38, far under anything a model's weights and activations hold.)"""
    out = functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


def mkldnn_packing_available() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
    )


class Linear(nn.Module):
    """y = x @ weight.T + bias for x [T, in_features]; `pack()` after loading for speed on CPU."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype, device=device)
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None
        self.packed: torch.Tensor | None = None
        self.dense: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.dim() == 2 and x.shape[0] <= DENSE_MAX_ROWS:
            return self.dense(x.contiguous(), self.weight, self.bias)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return functional.linear(x, self.weight, self.bias)

    def pack(self, keep_weight: bool = False) -> bool:
        """Prepare the CPU fast path: the dense kernel where it runs (the weight stays as it is), else
        oneDNN's packed copy, which replaces the plain weight unless `keep_weight` (a tied embedding
        still needs it). Returns whether a fast path is in use.

        The packed result is checked against `F.linear` once per shape, dtype and bias in a process:
        the check costs two more passes over the weight (F.linear re-lays it out), which was a quarter
        of a large model's load, and oneDNN lays out every weight of one shape alike."""
        if self.weight.device.type != "cpu":
            return False
        kernel = dense_kernel(self.weight.dtype)
        if kernel is not None and self.weight.is_contiguous():
            self.dense = kernel.dense_mm
            return True
        if not mkldnn_packing_available():
            return False
        key = (*self.weight.shape, self.weight.dtype, self.bias is not None)
        if _PACK_VERIFIED.get(key) is False:
            return False
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_BATCH_HINT)
            if key not in _PACK_VERIFIED:
                _PACK_VERIFIED[key] = self._matches(packed)
        except RuntimeError:
            _PACK_VERIFIED[key] = False
        if not _PACK_VERIFIED[key]:
            return False
        self.packed = packed
        if not keep_weight:
            self.weight = None  # the packed copy replaces it
        return True

    def _matches(self, packed: torch.Tensor) -> bool:
        probe = torch.randn(3, self.weight.shape[1], dtype=self.weight.dtype)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, self.bias, "none", [], "")
        expected = functional.linear(probe, self.weight, self.bias)
        return torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2)


_PACK_VERIFIED: dict[tuple, bool] = {}
"""(out_features, in_features, dtype, has bias) -> whether oneDNN's packed weight computed F.linear."""
