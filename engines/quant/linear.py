"""A projection that computes with int8 or int4 weights and never keeps a dequantised copy.

Kernels, chosen once per projection (``LMI_QUANT_KERNEL`` = auto, native, aten or reference):
- native (CPU, widths in blocks of 32; engines/kernels/csrc/quant_gemm.cpp): the activations are
  quantized to int8 per block of 32 and multiplied with integer dot products (AVX-512 VNNI where
  built), as llama.cpp does. int8 and int4 weights (any group size, GGUF's blocks included) are held
  in VNNI tiles of 16 channels and take that path at every batch size; on this CPU a step's
  projections against bf16 oneDNN: int8 4.3 / 13.7 ms at 1 row, 26.9 / 43.2 at 64, 372 / 550 at
  1,024; int4 (groups of 32) 3.0 / 12.3, 32.1 / 42.6, 603 / 588. Layers built with activation_bits=16
  (int16 activations: the int8 LM head of 4-bit models) keep the row layout: up to SMALL_BATCH rows on
  integer products, larger batches dequantize the weights slab by slab in cache for at::mm.
- aten: ATen's weight-only kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``), where the
  native kernel cannot be built; per-channel int8 and int4 only.
- triton (CUDA; CPU tensors only under TRITON_INTERPRET=1, for tests; engines/quant/triton_quant.py):
  the native kernel's row layouts, scales applied in registers, x's dtype with float32 accumulation.
- scaled_mm (fp8, every device torch implements it for): activations scaled per row to float8 e4m3 and
  ``torch._scaled_mm`` with the weights' per-channel scales (Hopper/Ada tensor cores on GPUs).
- reference: dequantise per call (engines.quant.methods / engines.quant.kernels), for devices with no
  kernel yet and for tests. ``expected`` is what the chosen kernel must equal up to float rounding.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from engines.quant import kernels
from engines.quant.methods import Fp8Weight, Int4Weight, Int8Weight, quantize_fp8_rows, reference_linear

log = logging.getLogger("engines.quant")


INT4_ROWS = 16
SMALL_BATCH = 32
"""Rows up to which the row layout (int16 activations) quantizes activations; above, dequantised slabs
and at::mm. Measured when int4 used the row layout too: integer products won up to 32 rows (59 against
66 ms a step at 32) and lost at 64. The tiles quantize activations at every size."""


@contextmanager
def decode_numerics() -> Iterator[None]:
    """Within: every batch size takes the small-batch path (quantized activations), so a quality
    measurement that scores whole windows in one forward (lmi eval) sees the numerics of decoding."""
    global SMALL_BATCH
    saved, SMALL_BATCH = SMALL_BATCH, 1 << 62
    try:
        yield
    finally:
        SMALL_BATCH = saved


KERNEL_ENV = "LMI_QUANT_KERNEL"
KERNELS = ("auto", "native", "aten", "triton", "reference")


def choose_kernel(weight: Int8Weight | Int4Weight | Fp8Weight) -> str:
    """native, aten or reference for ``weight`` under ``LMI_QUANT_KERNEL`` (auto: the best that runs)."""
    wanted = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if wanted not in KERNELS:
        raise ValueError(f"{KERNEL_ENV}={wanted!r} is not one of {', '.join(KERNELS)}")
    grouped_int8 = isinstance(weight, Int8Weight) and weight.group is not None
    if wanted == "reference":
        return "reference"
    if isinstance(weight, Fp8Weight):
        return "scaled_mm"
    if wanted == "triton" or (wanted == "auto" and weight.q.device.type == "cuda"):
        from engines.kernels.triton_ops import triton_available

        fits = kernels.supports(weight)
        reason = triton_available(weight.q.device) or (None if fits else "a width not in blocks of 32")
        if reason is None:
            return "triton"
        if wanted == "triton":
            raise ValueError(f"{KERNEL_ENV}=triton cannot run here: {reason}")
        log.warning("No Triton quantized kernel (%s): dequantising per call (slow)", reason)
        return "reference"
    if weight.q.device.type != "cpu":
        return "reference"
    if wanted in ("auto", "native") and kernels.supports(weight):
        try:
            kernels.native_module()
            return "native"
        except Exception as exc:  # noqa: BLE001 - KernelBuildError or a loader error: fall back
            if wanted == "native":
                raise
            log.warning("Native quantized kernel unavailable (%s); using ATen's", exc)
    return "reference" if grouped_int8 else "aten"


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with zero rows appended up to ``rows`` (padded outputs are computed, then dropped)."""
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))])


class QuantizedLinear(nn.Module):
    """y = x @ W.T + bias with W held quantized; built from a loaded ``engines.llama.linear.Linear``."""

    def __init__(
        self,
        weight: Int8Weight | Int4Weight | Fp8Weight,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        activation_bits: int = 8,
    ) -> None:
        """activation_bits: what the native kernel quantizes activations to at small batches; 16 where
        near-tie outputs matter (the LM head: see engines.quant.apply.quantize_head)."""
        super().__init__()
        if activation_bits not in (8, 16):
            raise ValueError(f"activation_bits must be 8 or 16, got {activation_bits}")
        self.activation_bits = activation_bits
        methods = {Int8Weight: "int8", Int4Weight: "int4", Fp8Weight: "fp8"}
        self.method = methods[type(weight)]
        self.in_features, self.out_features = weight.q.shape[1], weight.q.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.dtype = dtype
        self.reference: Int8Weight | Int4Weight | Fp8Weight | None = None
        self.kernel = choose_kernel(weight)
        self.tiles = self.kernel == "native" and activation_bits == 8 and kernels.native_module().has_vnni()
        """int8 / int4 in the native kernel's VNNI tiles (every batch size on integer products). Without
        AVX-512 VNNI the tiles' fallback is a scalar loop, so the row layout (slabs above SMALL_BATCH
        rows) serves there."""
        if self.kernel == "reference":
            if weight.q.device.type != "cpu":
                device = weight.q.device
                log.warning("No %s kernel on %s yet: dequantising per call (slow)", self.method, device)
            self.reference = weight
        elif self.kernel == "scaled_mm":
            self.register_buffer("q", weight.q.contiguous())
            self.register_buffer("scale", weight.scale.float().reshape(1, -1).contiguous())
        elif self.tiles and isinstance(weight, Int8Weight):
            q, scale, self.group = kernels.pack_int8_tiles(weight)
            self.register_buffer("q", q)
            self.register_buffer("scale", scale)
        elif self.tiles:
            packed, scale, minimum, self.group = kernels.pack_int4_tiles(weight)
            self.register_buffer("packed", packed)
            self.register_buffer("scale", scale)
            self.register_buffer("minimum", minimum)
        elif self.kernel in ("native", "triton"):  # the same row layouts
            self.group = weight.group or self.in_features
            if isinstance(weight, Int8Weight):
                q, scale, _ = kernels.pack_int8(weight)
                self.register_buffer("q", q)
                self.register_buffer("scale", scale)
            else:
                packed, scale, minimum = kernels.pack_int4(weight)
                self.register_buffer("packed", packed)
                self.register_buffer("scale", scale)
                self.register_buffer("minimum", minimum)
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
        self.expected_weight = weight
        self._native_call = self._bind_native()

    def _bind_native(self) -> Callable[[torch.Tensor, bool], torch.Tensor] | None:
        """The native kernel with this projection's buffers bound, for forward's fast path: a decode
        step makes 120 projection calls, and looking the buffers and the module up per call cost
        about a fifth of the kernel's own time at batch 1."""
        if self.kernel != "native":
            return None
        module, wide, bias = kernels.native_module(), self.activation_bits == 16, self.bias
        n = self.out_features
        if self.tiles and self.method == "int8":
            q, scale, group = self.q, self.scale, self.group
            return lambda x, tiled: module.int8_tiles_mm(x, q, scale, group, n, bias, False)
        if self.tiles:
            packed, scale, minimum, group = self.packed, self.scale, self.minimum, self.group
            return lambda x, tiled: module.int4_tiles_mm(x, packed, scale, minimum, group, n, bias, False)
        if self.method == "int8":
            q, scale, group = self.q, self.scale, self.group
            return lambda x, tiled: module.int8_mm(x, q, scale, group, bias, False, tiled, wide)
        packed, scale, minimum, group = self.packed, self.scale, self.minimum, self.group
        return lambda x, tiled: module.int4_mm(x, packed, scale, minimum, group, bias, False, tiled, wide)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantizedLinear:
        """Rebinds the fast path after .to(), .share_memory() and the like replace the buffers."""
        out = super()._apply(fn, recurse)
        self._native_call = self._bind_native()
        return out

    def expected(self, x: torch.Tensor) -> torch.Tensor:
        """The plain-torch result the chosen kernel must equal up to float rounding (tests)."""
        rows = x.reshape(-1, self.in_features)
        if self.kernel == "scaled_mm":
            xq, x_scale = quantize_fp8_rows(rows.to(self.dtype))
            exact = (xq.double() * x_scale.double()) @ self.expected_weight.dequantize().double().T
            out = exact.to(torch.bfloat16)
            out = (out if self.bias is None else out.to(self.bias.dtype) + self.bias).to(self.dtype)
        elif self.kernel == "native" and (self.tiles or rows.shape[0] <= SMALL_BATCH):
            out = kernels.reference_mm(
                rows.to(self.dtype), self.expected_weight, self.bias, self.activation_bits
            )
        else:
            out = reference_linear(rows.to(self.dtype), self.expected_weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self._native_call
        if call is not None and x.dim() == 2 and x.dtype == self.dtype and x.is_contiguous():
            return call(x, x.shape[0] > SMALL_BATCH)
        if self.reference is not None:
            return reference_linear(x, self.reference, self.bias)
        x = x.to(self.dtype)
        if self.kernel == "triton":
            return self._triton(x)
        if self.kernel == "scaled_mm":
            return self._scaled_mm(x)
        if self.kernel == "native":
            rows = x.reshape(-1, self.in_features).contiguous()
            out = self._native_call(rows, rows.shape[0] > SMALL_BATCH)
            return out.reshape(*x.shape[:-1], self.out_features)
        if self.method == "int8":
            out = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scale_zero)
            if out.shape[-1] != self.out_features:
                out = out[..., : self.out_features]
        return out if self.bias is None else out + self.bias

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        """Row-wise scaled fp8 matmul; its output is bfloat16 (what row-wise scaling produces on GPUs)."""
        rows = x.reshape(-1, self.in_features)
        xq, x_scale = quantize_fp8_rows(rows)
        out = torch._scaled_mm(xq, self.q.t(), scale_a=x_scale, scale_b=self.scale, out_dtype=torch.bfloat16)
        out = out if self.bias is None else out.to(self.bias.dtype) + self.bias
        return out.to(self.dtype).reshape(*x.shape[:-1], self.out_features)

    def _triton(self, x: torch.Tensor) -> torch.Tensor:
        from engines.quant import triton_quant

        rows = x.reshape(-1, self.in_features).contiguous()
        if self.method == "int8":
            out = triton_quant.int8_mm(rows, self.q, self.scale, self.group, self.bias)
        else:
            out = triton_quant.int4_mm(rows, self.packed, self.scale, self.minimum, self.group, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def pack(self, keep_weight: bool = False) -> bool:
        """Already in the kernel's layout (the model packs every projection after loading)."""
        return True

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
