"""AWQ checkpoints (AutoAWQ's GEMM layout, ``quant_method: awq``) read into Int4Weight exactly.

Per projection: ``qweight`` int32 [in, out / 8], eight 4-bit values per word along the *output*
dimension in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7] (nibble i, at bit 4i, holds output column
8c + ORDER[i]); ``qzeros`` int32 [in / group, out / 8] packed the same way; ``scales`` fp16
[in / group, out]. w = (q - z) * s, which is q * s + (-z * s): both products are exact in float32
(an fp16 mantissa times a 4-bit integer), so Int4Weight's scale and minimum give the same values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engines.base import EngineLoadError
from engines.quant.methods import Int4Weight

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Output column (within a packed word's eight) held by nibble i: AutoAWQ's ``order_map``."""
NATURAL = tuple(ORDER.index(column) for column in range(8))
"""Nibble holding output column j: AutoAWQ's AWQ_REVERSE_ORDER [0, 4, 1, 5, 2, 6, 3, 7]."""
SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def read(get: Callable[[str], torch.Tensor | None], name: str) -> torch.Tensor:
    """The checkpoint's tensor ``name``; EngineLoadError naming it when the checkpoint lacks it."""
    tensor = get(name)
    if tensor is None:
        raise EngineLoadError(f"The quantized checkpoint lacks {name}")
    return tensor


def unpack_words(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., m] -> int32 [..., m, 8] 0..15: nibble i of each word at index i (bits 4i..4i+3)."""
    return (packed.to(torch.int32)[..., None] >> SHIFTS) & 0xF


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """AWQ-packed int32 [rows, out / 8] -> [rows, out] 0..15 in natural column order."""
    nibbles = unpack_words(packed)[..., list(NATURAL)]
    return nibbles.reshape(packed.shape[0], -1)


@dataclass(frozen=True)
class AwqFormat:
    """An AWQ checkpoint's ``quantization_config``, checked: 4 bits, GEMM layout, zero points."""

    group: int
    """Input rows per scale; -1 in the config (one group per column) is resolved per projection."""
    method: str = "awq"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AwqFormat:
        bits = config.get("bits", config.get("w_bit"))
        version = str(config.get("version", "gemm")).lower()
        group = int(config.get("group_size", config.get("q_group_size", 128)))
        problems = []
        if bits != 4:
            problems.append(f"bits={bits}")
        if version != "gemm":
            problems.append(f"version={version!r}")
        if not config.get("zero_point", True):
            problems.append("zero_point=false")
        if problems:
            raise EngineLoadError(
                f"AWQ checkpoint with {', '.join(problems)}: the native engine reads AWQ 4-bit, version "
                "'gemm', with zero points (AutoAWQ's default). Fix: export the model with AutoAWQ's GEMM "
                "version, or serve the unquantized checkpoint with option.quantize=int4."
            )
        return cls(group)

    def describe(self) -> str:
        return f"AWQ 4-bit (gemm, group {self.group})"

    def unpack(self, get: Callable[[str], torch.Tensor | None], module: str) -> Int4Weight:
        """The Int4Weight [out, in] of ``module`` from its qweight, qzeros and scales."""
        q = unpack_columns(read(get, f"{module}.qweight"))  # [in, out]
        zeros = unpack_columns(read(get, f"{module}.qzeros"))  # [in / group, out]
        scales = read(get, f"{module}.scales")  # [in / group, out]
        group = q.shape[0] // scales.shape[0] if self.group == -1 else self.group
        if zeros.shape != scales.shape or q.shape != (scales.shape[0] * group, scales.shape[1]):
            raise EngineLoadError(
                f"{module}: AWQ tensors do not fit together (qweight unpacks to {tuple(q.shape)}, qzeros to "
                f"{tuple(zeros.shape)}, scales {tuple(scales.shape)}, group_size {self.group})"
            )
        scale = scales.float().T.contiguous()
        return Int4Weight(q.T.to(torch.uint8).contiguous(), scale, -(zeros.T.float() * scale), group)
