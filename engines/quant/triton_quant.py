"""Weight-only int8 / int4 matmul in Triton for GPUs, in the native CPU kernel's weight layouts.

Each program computes a [BLOCK_M, BLOCK_N] tile of ``x @ W.T``: it loads 32 (int8) or 64 (int4, two per
byte) weight columns at a time, applies their scales (and int4's minimums) in registers, and multiplies
in x's dtype with float32 accumulation, so the full-precision weight never exists in memory. The int4
layout is `engines.quant.kernels.pack_int4`'s: in each 64-column chunk byte j holds column j (low nibble)
and j + 32 (high), a trailing 32-column chunk j and j + 16; int8 is `pack_int8`'s (q + 128 as uint8).
Reference: `engines.quant.methods.reference_linear` (dequantise, then matmul). Under TRITON_INTERPRET=1,
set before import, the kernels run on CPU tensors in float32 / float16, which is how CI checks them.
"""

# Triton's convention: compile-time (tl.constexpr) parameters are written in capitals.
# ruff: noqa: N803, N806

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64


def _precision(dtype: torch.dtype) -> str:
    """float32 stays exact (Triton's default tf32 would cost ~1e-3 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_m(m: int) -> int:
    """16 rows (tl.dot's minimum) for decode batches, 64 for prompts."""
    return 16 if m <= 16 else 64


@triton.jit
def _finish(acc, bias, out, rm, rn, row_ok, col_ok, stride_om, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(out + rm[:, None] * stride_om + rn[None, :], acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _int4_half(
    x, stride_xm, rm, row_ok, col, bytes_, scale, minimum, HALF: tl.constexpr, PRECISION: tl.constexpr
):
    """acc contribution of HALF columns starting at ``col`` whose 4-bit values are ``bytes_`` [BN, HALF]."""
    cols = col + tl.arange(0, HALF)
    xs = tl.load(x + rm[:, None] * stride_xm + cols[None, :], mask=row_ok[:, None], other=0.0)
    w = (bytes_.to(tl.float32) * scale[:, None] + minimum[:, None]).to(xs.dtype)
    return tl.dot(xs, tl.trans(w), input_precision=PRECISION)


@triton.jit
def _int4_mm_kernel(
    x,
    packed,
    scale,
    minimum,
    bias,
    out,
    M,
    N,
    K,
    GROUPS,
    stride_xm,
    stride_om,
    GROUP: tl.constexpr,
    TAIL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rm < M, rn < N
    rows = packed + rn[:, None].to(tl.int64) * (K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    half = tl.arange(0, 32)
    for chunk in range(0, K // 64):
        col = chunk * 64
        bytes_ = tl.load(rows + chunk * 32 + half[None, :], mask=col_ok[:, None], other=0)
        g_low, g_high = col // GROUP, (col + 32) // GROUP  # low nibbles: col..col+31; high: col+32..
        s = tl.load(scale + rn * GROUPS + g_low, mask=col_ok, other=0.0)
        low = tl.load(minimum + rn * GROUPS + g_low, mask=col_ok, other=0.0)
        acc += _int4_half(x, stride_xm, rm, row_ok, col, bytes_ & 0xF, s, low, 32, PRECISION)
        s = tl.load(scale + rn * GROUPS + g_high, mask=col_ok, other=0.0)
        low = tl.load(minimum + rn * GROUPS + g_high, mask=col_ok, other=0.0)
        acc += _int4_half(x, stride_xm, rm, row_ok, col + 32, bytes_ >> 4, s, low, 32, PRECISION)
    if TAIL:  # a trailing chunk of 32 columns: byte j holds columns j and j + 16, one group
        col = (K // 64) * 64
        quarter = tl.arange(0, 16)
        bytes_ = tl.load(rows + col // 2 + quarter[None, :], mask=col_ok[:, None], other=0)
        s = tl.load(scale + rn * GROUPS + col // GROUP, mask=col_ok, other=0.0)
        low = tl.load(minimum + rn * GROUPS + col // GROUP, mask=col_ok, other=0.0)
        acc += _int4_half(x, stride_xm, rm, row_ok, col, bytes_ & 0xF, s, low, 16, PRECISION)
        acc += _int4_half(x, stride_xm, rm, row_ok, col + 16, bytes_ >> 4, s, low, 16, PRECISION)
    _finish(acc, bias, out, rm, rn, row_ok, col_ok, stride_om, HAS_BIAS)


@triton.jit
def _int8_mm_kernel(
    x,
    q,
    scale,
    bias,
    out,
    M,
    N,
    K,
    GROUPS,
    stride_xm,
    stride_om,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rm < M, rn < N
    rows = q + rn[:, None].to(tl.int64) * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    span = tl.arange(0, 32)
    for block in range(0, K // 32):
        col = block * 32
        stored = tl.load(rows + col + span[None, :], mask=col_ok[:, None], other=128)
        s = tl.load(scale + rn * GROUPS + col // GROUP, mask=col_ok, other=0.0)
        xs = tl.load(x + rm[:, None] * stride_xm + col + span[None, :], mask=row_ok[:, None], other=0.0)
        w = ((stored.to(tl.float32) - 128.0) * s[:, None]).to(xs.dtype)
        acc += tl.dot(xs, tl.trans(w), input_precision=PRECISION)
    _finish(acc, bias, out, rm, rn, row_ok, col_ok, stride_om, HAS_BIAS)


def _launch_shape(x: torch.Tensor, n: int) -> tuple[torch.Tensor, tuple[int, int], int]:
    block_m = _block_m(x.shape[0])
    return x.new_empty((x.shape[0], n)), (triton.cdiv(x.shape[0], block_m), triton.cdiv(n, BLOCK_N)), block_m


def int4_mm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    group: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [m, k] @ W.T (+ bias) for W in pack_int4's layout; k and ``group`` multiples of 32."""
    (m, k), n = x.shape, packed.shape[0]
    out, grid, block_m = _launch_shape(x, n)
    _int4_mm_kernel[grid](
        x, packed, scale, minimum, bias if bias is not None else out, out, m, n, k, scale.shape[1],
        x.stride(0), out.stride(0), GROUP=group, TAIL=k % 64 != 0, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, PRECISION=_precision(x.dtype),
    )  # fmt: skip
    return out


def int8_mm(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [m, k] @ W.T (+ bias) for W in pack_int8's layout (q + 128; group = k for per-channel scales)."""
    (m, k), n = x.shape, q.shape[0]
    out, grid, block_m = _launch_shape(x, n)
    _int8_mm_kernel[grid](
        x, q, scale, bias if bias is not None else out, out, m, n, k, scale.shape[1],
        x.stride(0), out.stride(0), GROUP=group, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, PRECISION=_precision(x.dtype),
    )  # fmt: skip
    return out
