"""Quantized weight formats and their plain-torch reference: what every kernel is tested against.

int8: symmetric, one scale per output channel (or per ``group`` input columns of it, as GGUF's Q8_0
blocks): w ~= q * scale, q in [-127, 127].
int4: asymmetric, one scale and minimum per ``group`` input columns of each output channel:
w ~= q * scale + minimum, q in [0, 15].
fp8: float8 e4m3 with one scale per output channel: w ~= q * scale, |q| <= 448.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("int8", "int4", "fp8")
GROUP_SIZES = (128, 64, 32)


@dataclass
class Int8Weight:
    q: torch.Tensor
    """[n, k] int8."""
    scale: torch.Tensor
    """[n] float32 (one per output channel), or [n, k / group] with ``group`` set (GGUF's Q8_0)."""
    group: int | None = None

    def dequantize(self) -> torch.Tensor:
        if self.group is None:
            return self.q.float() * self.scale[:, None]
        n, k = self.q.shape
        grouped = self.q.float().reshape(n, k // self.group, self.group) * self.scale[..., None]
        return grouped.reshape(n, k)


@dataclass
class Int4Weight:
    q: torch.Tensor
    """[n, k] uint8 holding 0..15 (packed for the kernel by engines.quant.linear)."""
    scale: torch.Tensor
    """[n, k / group] float32."""
    minimum: torch.Tensor
    """[n, k / group] float32: the value q = 0 stands for."""
    group: int

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        grouped = self.q.float().reshape(n, k // self.group, self.group)
        return (grouped * self.scale[..., None] + self.minimum[..., None]).reshape(n, k)


FP8_MAX = 448.0
"""The largest finite float8 e4m3 value."""


@dataclass
class Fp8Weight:
    q: torch.Tensor
    """[n, k] float8_e4m3fn."""
    scale: torch.Tensor
    """[n] float32."""
    group = None

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


def quantize_fp8(weight: torch.Tensor) -> Fp8Weight:
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return Fp8Weight((w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as float8 e4m3, scale [m, 1] float32): activations scaled per row (token) for fp8 matmuls."""
    scale = (x.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return Int8Weight(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale)


def quantize_int8_blocks(weight: torch.Tensor, group: int) -> Int8Weight:
    """Symmetric int8 with one scale per ``group`` input columns (GGUF's Q8_0 for group 32)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    scale = (w.abs().amax(dim=-1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q.reshape(n, k), scale, group)


def quantize_int4(weight: torch.Tensor, group: int) -> Int4Weight:
    n, k = weight.shape
    if k % group:
        raise ValueError(f"int4 group size {group} does not divide the input width {k}")
    w = weight.float().reshape(n, k // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return Int4Weight(q.reshape(n, k), scale, low, group)


def group_size_for(width: int, wanted: int) -> int:
    """``wanted`` when it divides ``width``, else the largest of GROUP_SIZES below it that does (SmolLM2's
    576-wide projections take 64); ValueError when none does."""
    for size in (wanted, *(g for g in GROUP_SIZES if g < wanted)):
        if width % size == 0:
            return size
    raise ValueError(
        f"No int4 group size up to {wanted} divides the input width {width}; use option.quantize=int8"
    )


def reference_linear(
    x: torch.Tensor, weight: Int8Weight | Int4Weight | Fp8Weight, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [m, k] @ dequantize(weight).T (+ bias) in float32, cast back to x's dtype."""
    out = x.float() @ weight.dequantize().T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
