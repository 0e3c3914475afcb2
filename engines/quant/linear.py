"""A projection that computes with int8 or int4 weights and never keeps a dequantised copy.

On CPU the matmuls are ATen's weight-only kernels (``_weight_int8pack_mm``, and
``_weight_int4pack_mm_for_cpu`` over weights packed by ``_convert_weight_to_int4pack_for_cpu``), which
dequantise inside the kernel, tile by tile. Elsewhere (no such kernel) the forward dequantises per call
through the reference (engines.quant.methods) and logs that once.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engines.quant.methods import Int4Weight, Int8Weight, reference_linear

log = logging.getLogger("engines.quant")


INT4_ROWS = 16


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with zero rows appended up to ``rows`` (padded outputs are computed, then dropped)."""
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))])


class QuantizedLinear(nn.Module):
    """y = x @ W.T + bias with W held quantized; built from a loaded ``engines.llama.linear.Linear``."""

    def __init__(
        self, weight: Int8Weight | Int4Weight, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.method = "int8" if isinstance(weight, Int8Weight) else "int4"
        self.in_features, self.out_features = weight.q.shape[1], weight.q.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.dtype = dtype
        self.reference: Int8Weight | Int4Weight | None = None
        on_cpu = weight.q.device.type == "cpu"
        grouped_int8 = isinstance(weight, Int8Weight) and weight.group is not None
        if not on_cpu or grouped_int8:
            log.warning("No %s kernel on %s yet: dequantising per call (slow)", self.method, weight.q.device)
            self.reference = weight
        elif isinstance(weight, Int8Weight):
            self.register_buffer("q", weight.q.contiguous())
            self.register_buffer("scale", weight.scale.to(dtype))
        else:
            self.group = weight.group
            rows = -(-self.out_features // INT4_ROWS) * INT4_ROWS  # the packing takes 16 rows at a time
            q, scale, low = (_pad_rows(t, rows) for t in (weight.q.int(), weight.scale, weight.minimum))
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            zero = low + 8 * scale  # the kernel reads w = (q - 8) * scale + zero: zero is the value at q = 8
            stacked = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()  # [k / group, rows, 2]
            self.register_buffer("scale_zero", stacked.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference is not None:
            return reference_linear(x, self.reference, self.bias)
        x = x.to(self.dtype)
        if self.method == "int8":
            out = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scale_zero)
            if out.shape[-1] != self.out_features:
                out = out[..., : self.out_features]
        return out if self.bias is None else out + self.bias

    def pack(self, keep_weight: bool = False) -> bool:
        """Already in the kernel's layout (the model packs every projection after loading)."""
        return True

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
