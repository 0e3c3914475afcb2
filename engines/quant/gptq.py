"""GPTQ checkpoints (AutoGPTQ / GPTQModel, ``quant_method: gptq``, 4 bits) read into Int4Weight exactly.

Per projection: ``qweight`` int32 [in / 8, out], eight 4-bit values per word along the *input*
dimension (input row 8r + j at bits 4j of word r); ``qzeros`` int32 [in / group, out / 8] packed along
the output dimension in plain order; ``scales`` fp16 [in / group, out]; ``g_idx`` int32 [in], the group
of each input row. w = (q - z) * s. The v1 format ("gptq", AutoGPTQ) stores every zero minus one and
GPTQModel reads it by adding 0x11111111 to each word (carries included), which is what is done here;
"gptq_v2" stores the zeros as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engines.base import EngineLoadError
from engines.quant.awq import read, unpack_words
from engines.quant.methods import Int4Weight

FORMATS = ("gptq", "gptq_v2")
V1_ZERO_OFFSET = 0x11111111
"""One added to each of a word's eight nibbles: v1's stored zero - 1 back to the zero."""


@dataclass(frozen=True)
class GptqFormat:
    """A GPTQ checkpoint's ``quantization_config``, checked: 4 bits, int32 words, v1 or v2 zeros."""

    group: int
    """Input rows per scale; -1 (one group per column) is resolved per projection."""
    v2: bool
    sym: bool = True
    method: str = "gptq"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GptqFormat:
        bits = config.get("bits")
        fmt = str(config.get("checkpoint_format") or config.get("format") or "gptq").lower()
        problems = []
        if bits != 4:
            problems.append(f"bits={bits}")
        if fmt not in FORMATS:
            problems.append(f"checkpoint_format={fmt!r}")
        if str(config.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
            problems.append(f"pack_dtype={config['pack_dtype']}")
        if config.get("dynamic"):
            problems.append("per-module overrides (dynamic)")
        if config.get("lm_head"):
            problems.append("a quantized lm_head")
        if problems:
            raise EngineLoadError(
                f"GPTQ checkpoint with {', '.join(problems)}: the native engine reads GPTQ 4-bit in int32 "
                "words, checkpoint_format gptq or gptq_v2, decoder projections only. Fix: quantize again "
                "with bits=4 (GPTQModel/AutoGPTQ defaults), or serve the unquantized checkpoint with "
                "option.quantize=int4."
            )
        return cls(int(config.get("group_size", 128)), fmt == "gptq_v2", bool(config.get("sym", True)))

    def describe(self) -> str:
        zeros = "symmetric" if self.sym else "asymmetric"
        return f"GPTQ 4-bit ({'gptq_v2' if self.v2 else 'gptq'}, {zeros}, group {self.group})"

    def unpack(self, get: Callable[[str], torch.Tensor | None], module: str) -> Int4Weight:
        """The Int4Weight [out, in] of ``module`` from its qweight, qzeros, scales (and g_idx)."""
        packed = read(get, f"{module}.qweight")  # [in / 8, out]
        q = unpack_words(packed.T).reshape(packed.shape[1], -1)  # [out, in]: word r's nibble j is row 8r + j
        words = read(get, f"{module}.qzeros")
        zeros = unpack_words(words if self.v2 else add_one(words)).reshape(words.shape[0], -1)
        scales = read(get, f"{module}.scales")  # [in / group, out]
        group = q.shape[1] // scales.shape[0] if self.group == -1 else self.group
        if zeros.shape != scales.shape or q.shape != (scales.shape[1], scales.shape[0] * group):
            raise EngineLoadError(
                f"{module}: GPTQ tensors do not fit together (qweight unpacks to {tuple(q.T.shape)}, qzeros "
                f"to {tuple(zeros.shape)}, scales {tuple(scales.shape)}, group_size {self.group})"
            )
        check_g_idx(get(f"{module}.g_idx"), group, module)
        scale = scales.float().T.contiguous()
        return Int4Weight(q.to(torch.uint8).contiguous(), scale, -(zeros.T.float() * scale), group)


def add_one(words: torch.Tensor) -> torch.Tensor:
    """v1 zeros (each stored minus one) -> the zeros: 0x11111111 added to every int32 word, modulo 2**32."""
    total = (words.to(torch.int64) + V1_ZERO_OFFSET) & 0xFFFFFFFF
    return torch.where(total >= 2**31, total - 2**32, total).to(torch.int32)


def check_g_idx(g_idx: torch.Tensor | None, group: int, module: str) -> None:
    """EngineLoadError unless every input row is in group row // group (no act-order reordering)."""
    if g_idx is None:
        return
    trivial = torch.arange(g_idx.shape[0], dtype=torch.int64) // group
    if not torch.equal(g_idx.to(torch.int64), trivial):
        raise EngineLoadError(
            f"{module}: this GPTQ checkpoint was quantized with desc_act (act-order): its g_idx assigns "
            "input rows to groups out of order, which the native engine's int4 kernels cannot read. "
            "Fix: quantize again with desc_act=False, or serve the unquantized checkpoint with "
            "option.quantize=int4."
        )
