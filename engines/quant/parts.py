"""One checkpoint projection as it was stored (Int4Weight, Int8Weight, or a float matrix), and the exact
operations that turn stored parts into one rank's fused projection: pick rows (GGUF's q/k order, a
column-parallel shard), pick whole groups of input columns (a row-parallel shard), split groups into
the kernels' sizes, and concatenate q/k/v or gate/up. None of them rounds a value.
"""

from __future__ import annotations

import logging
import math

import torch

from engines.base import EngineLoadError
from engines.quant.methods import GROUP_SIZES, Int4Weight, Int8Weight

log = logging.getLogger("engines.quant")

Part = Int4Weight | Int8Weight | torch.Tensor
"""A [out, in] projection weight: quantized as stored, or a float matrix (a layer left unquantized)."""


def shape(part: Part) -> tuple[int, int]:
    return tuple(part.shape if isinstance(part, torch.Tensor) else part.q.shape)


def take_rows(part: Part, rows: torch.Tensor | slice) -> Part:
    """Output rows of ``part``; every group lies within a row, so no scale changes."""
    if isinstance(part, torch.Tensor):
        return part[rows]
    if isinstance(part, Int8Weight):
        return Int8Weight(part.q[rows], part.scale[rows], part.group)
    return Int4Weight(part.q[rows], part.scale[rows], part.minimum[rows], part.group)


def take_columns(part: Part, start: int, stop: int, module: str) -> Part:
    """Input columns [start, stop) of ``part``: whole groups only (EngineLoadError otherwise)."""
    if isinstance(part, torch.Tensor):
        return part[:, start:stop].contiguous()
    group = part.group
    if group is None:  # int8 with one scale per output channel
        return Int8Weight(part.q[:, start:stop].contiguous(), part.scale, None)
    if start % group or stop % group:
        raise EngineLoadError(
            f"{module}: this rank's input columns [{start}, {stop}) split a quantization group of {group} "
            "columns. Fix: choose an option.tensor_parallel_degree whose shards of the attention heads and "
            "the MLP width are multiples of the group size."
        )
    groups = slice(start // group, stop // group)
    q, scale = part.q[:, start:stop].contiguous(), part.scale[:, groups].contiguous()
    if isinstance(part, Int8Weight):
        return Int8Weight(q, scale, group)
    return Int4Weight(q, scale, part.minimum[:, groups].contiguous(), group)


def regroup(part: Int4Weight, group: int) -> Int4Weight:
    """The same values in groups of ``group`` (dividing part.group): each scale and minimum repeated."""
    if group == part.group:
        return part
    repeat = part.group // group
    scale, minimum = (t.repeat_interleave(repeat, dim=1) for t in (part.scale, part.minimum))
    return Int4Weight(part.q, scale, minimum, group)


def kernel_group(group: int, module: str) -> int:
    """The largest group size the int4 kernels take (GROUP_SIZES) that divides ``group``."""
    for size in GROUP_SIZES:
        if group % size == 0:
            return size
    sizes = ", ".join(map(str, GROUP_SIZES))
    raise EngineLoadError(
        f"{module}: int4 groups of {group} columns cannot be split into groups of {sizes}, which the int4 "
        "kernels take. Fix: quantize with group_size 32, 64 or 128."
    )


def for_kernels(part: Part, module: str) -> Part:
    """``part`` with int4 groups the kernels take (a group of 256, or one per column, becomes 128s)."""
    if isinstance(part, Int4Weight) and part.group not in GROUP_SIZES:
        return regroup(part, kernel_group(part.group, module))
    return part


def fuse(parts: list[Part], module: str) -> Part:
    """The parts stacked by rows (q/k/v, gate/up) in one stored form; parts of different forms (GGUF
    may store q as Q4_K and v as Q8_0) are dequantised into one float matrix, exactly."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, Int4Weight) for p in parts):
        group = kernel_group(math.gcd(*(p.group for p in parts)), module)
        parts = [regroup(p, group) for p in parts]
        fields = [torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scale", "minimum")]
        return Int4Weight(*fields, group)
    if all(isinstance(p, Int8Weight) for p in parts) and len({p.group for p in parts}) == 1:
        q, scale = torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts])
        return Int8Weight(q, scale, parts[0].group)
    if any(not isinstance(p, torch.Tensor) for p in parts):
        kinds = sorted({type(p).__name__ for p in parts})
        log.warning("%s: its parts are stored as %s; serving it dequantised, unquantized", module, kinds)
    return torch.cat([p if isinstance(p, torch.Tensor) else p.dequantize() for p in parts])


def to_device(part: Part, device: torch.device) -> Part:
    if isinstance(part, torch.Tensor):
        return part.to(device)
    if isinstance(part, Int8Weight):
        return Int8Weight(part.q.to(device), part.scale.to(device), part.group)
    return Int4Weight(part.q.to(device), part.scale.to(device), part.minimum.to(device), part.group)
