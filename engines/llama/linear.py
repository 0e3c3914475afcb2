"""A bias-optional linear layer whose weight can be pre-packed for oneDNN on CPU.

`F.linear` on CPU re-lays-out the weight for every call; packing it once into oneDNN's blocked format
(the private `mkldnn._reorder_linear_weight` / `_linear_pointwise` ops that inductor's freezing pass
uses) made the SmolLM2 decode step's matmuls 1.2-3x faster in bf16 and fp32. Packing is verified
against `F.linear` and silently skipped where the ops are missing, so the model still runs anywhere.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

PACK_BATCH_HINT = 64
"""Rows oneDNN tunes the packed layout for; any row count works, this one measured best for 1..64."""


def _param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return functional.linear(x, self.weight, self.bias)

    def pack(self, keep_weight: bool = False) -> bool:
        """Pre-pack the weight for oneDNN (CPU only); drops the plain weight unless `keep_weight`
        (a tied embedding still needs it). Returns whether the packed path is in use.

        The packed result is checked against `F.linear` once per shape, dtype and bias in a process:
        the check costs two more passes over the weight (F.linear re-lays it out), which was a quarter
        of a large model's load, and oneDNN lays out every weight of one shape alike."""
        if self.weight.device.type != "cpu" or not mkldnn_packing_available():
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
