"""The native CPU int4 / int8 matmul (engines/kernels/csrc/quant_gemm.cpp): its weight layouts and the
plain-torch reference it is tested against.

The kernel quantizes the activations per block of 32 columns to int8 (symmetric, scale = max|x| / 127,
round half to even) and multiplies them with the integer weights, as llama.cpp does on CPUs: one
AVX-512 VNNI instruction does 64 multiply-adds, so a batch-1 decode is bound by reading the weights.
``reference_mm`` performs the same activation quantization in torch and sums exactly (float64), so the
kernel differs from it only by float32 rounding.
"""

from __future__ import annotations

from types import ModuleType

import torch

from engines.quant.methods import Int4Weight, Int8Weight

BLOCK = 32


def native_module() -> ModuleType:
    """The compiled kernel (raises engines.kernels.build.KernelBuildError when it cannot be built)."""
    from engines.kernels.build import load_kernel

    return load_kernel("quant_gemm")


def supports(weight: Int8Weight | Int4Weight) -> bool:
    """Whether the native kernel takes this weight: widths in whole blocks of 32."""
    k = weight.q.shape[1]
    group = getattr(weight, "group", None) or k
    return k % BLOCK == 0 and group % BLOCK == 0


def pack_int4(weight: Int4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed [n, k/2] uint8, scale, minimum as float32 [n, k/group]): in each 64-column chunk byte j
    holds column j (low nibble) and j + 32 (high); a trailing 32-column chunk holds j and j + 16."""
    q = weight.q.to(torch.uint8)
    n, k = q.shape
    full = k // 64 * 64
    chunks = q[:, :full].reshape(n, -1, 2, 32)
    parts = [(chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(n, -1)]
    if k > full:
        tail = q[:, full:]
        parts.append(tail[:, :16] | (tail[:, 16:] << 4))
    packed = torch.cat(parts, dim=1).contiguous()
    return packed, weight.scale.float().contiguous(), weight.minimum.float().contiguous()


def pack_int8(weight: Int8Weight) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(q + 128 as uint8 [n, k], scale float32 [n, k/group], group): per-channel scales are group = k."""
    n, k = weight.q.shape
    stored = (weight.q.to(torch.int16) + 128).to(torch.uint8).contiguous()
    group = weight.group or k
    return stored, weight.scale.float().reshape(n, k // group).contiguous(), group


TILE = 16


def pack_int8_tiles(weight: Int8Weight) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(q + 128 as uint8 [ceil(n/16), k/4, 16, 4], scale float32 [ceil(n/16), k/group, 16], group): the
    native kernel's VNNI tiles, each 16 output channels' bytes one stream, 4 columns of 16 channels per
    64 bytes. Padded channels store 128 (zero) with scale 0."""
    n, k = weight.q.shape
    group = weight.group or k
    stored = (weight.q.to(torch.int16) + 128).to(torch.uint8)
    scale = weight.scale.float().reshape(n, k // group)
    pad = -n % TILE
    if pad:
        stored = torch.cat([stored, stored.new_full((pad, k), 128)])
        scale = torch.cat([scale, scale.new_zeros(pad, k // group)])
    tiles = stored.reshape(-1, TILE, k // 4, 4).permute(0, 2, 1, 3).contiguous()
    return tiles, scale.reshape(-1, TILE, k // group).permute(0, 2, 1).contiguous(), group


def pack_int4_tiles(weight: Int4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(q [ceil(n/16), k/8, 16, 4] uint8, scale and minimum float32 [ceil(n/16), k/group, 16], group):
    int4 in the same tiles, 8 columns of 16 channels per 64 bytes, byte j of a channel holding column j
    (low nibble) and j + 4 (high). Padded channels are zero with scale and minimum 0."""
    n, k = weight.q.shape
    groups = k // weight.group
    q = weight.q.to(torch.uint8)
    scale, minimum = weight.scale.float().reshape(n, groups), weight.minimum.float().reshape(n, groups)
    pad = -n % TILE
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
        scale, minimum = (torch.cat([t, t.new_zeros(pad, groups)]) for t in (scale, minimum))
    pairs = q.reshape(-1, TILE, k // 8, 2, 4)
    packed = (pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)).permute(0, 2, 1, 3).contiguous()
    by_tile = [t.reshape(-1, TILE, groups).permute(0, 2, 1).contiguous() for t in (scale, minimum)]
    return packed, by_tile[0], by_tile[1], weight.group


def quantize_activations(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq [m, k] integers as float64, scale [m, k/32] float32): the kernel's activation quantization,
    symmetric per block of 32 to ``bits`` (8, or 16 for the kernel's ``wide`` path)."""
    m, k = x.shape
    limit = 2 ** (bits - 1) - 1
    blocks = x.float().reshape(m, k // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=-1) / limit
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    xq = torch.round(blocks * inverse[..., None]).clamp(-limit, limit)
    return xq.reshape(m, k).double(), scale


def reference_mm(
    x: torch.Tensor, weight: Int8Weight | Int4Weight, bias: torch.Tensor | None, bits: int = 8
) -> torch.Tensor:
    """What the kernel computes, in torch: activations quantized to ``bits`` times the weights, summed
    exactly, plus bias, in x's dtype."""
    xq, x_scale = quantize_activations(x, bits)
    k = x.shape[1]
    w = weight.dequantize().double()  # [n, k]
    per_block = xq.reshape(xq.shape[0], 1, k // BLOCK, BLOCK) * w.reshape(1, w.shape[0], k // BLOCK, BLOCK)
    out = (per_block.sum(-1) * x_scale.double()[:, None, :]).sum(-1)
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)
