"""The dense CPU kernel (engines/kernels/csrc/dense_gemm.cpp) against its reference
(engines/llama/linear.py:dense_reference), and the Linear layer's choice between it, oneDNN and F.linear.

Shapes cover a lone row (the decode path), blocks of 4 rows with remainders, widths below, at and off
one vector (32 bf16 / 16 fp32 values), and weight rows off the 4-row blocks and the 64-row tasks."""

from __future__ import annotations

import pytest
import torch

from engines.device import cpu_bf16_flags
from engines.kernels.build import load_kernel
from engines.llama.linear import DENSE_MAX_ROWS, Linear, dense_kernel, dense_reference

pytestmark = pytest.mark.skipif(
    "avx512_bf16" not in cpu_bf16_flags(), reason="the dense kernel needs an AVX-512 BF16 CPU"
)


def test_the_kernel_builds_with_its_instructions_here():
    """On such a CPU a failed build must fail, not skip: load_kernel raises, Linear would fall back."""
    assert load_kernel("dense_gemm").available()
    assert dense_kernel(torch.bfloat16) is not None


SHAPES = [(1, 5, 7), (1, 576, 576), (1, 131, 200), (2, 9, 32), (3, 64, 48), (5, 67, 100), (8, 130, 576),
          (16, 33, 2048), (17, 4, 40)]  # fmt: skip


def _error_bound(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """How far a float32 sum of the k products (+ bias), in any order, may lie from the exact value
    (k + 1 roundings of 2^-24 of the sum of magnitudes), plus the final rounding to bf16 (2^-8 relative)."""
    k = x.shape[1]
    magnitude = x.double().abs() @ w.double().abs().T + (0 if bias is None else bias.double().abs())
    exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
    rounding = exact.abs() * 2**-8 if x.dtype == torch.bfloat16 else 0
    return (k + 1) * 2**-24 * magnitude + rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_its_reference(dtype, m, n, k, bias):
    generator = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=generator).to(dtype)
    w = torch.randn(n, k, generator=generator).to(dtype)
    b = torch.randn(n, generator=generator).to(dtype) if bias else None
    got = dense_kernel(dtype).dense_mm(x, w, b)
    expected = dense_reference(x, w, b)
    assert got.dtype == dtype
    assert got.shape == (m, n)
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    bound = _error_bound(x, w, b)
    assert bool(((got.double() - exact).abs() <= bound).all())
    assert bool(((expected.double() - exact).abs() <= bound).all())  # the bound holds for the reference too


def test_kernel_refuses_what_it_cannot_compute():
    kernel = dense_kernel(torch.bfloat16)
    w = torch.randn(8, 32).bfloat16()
    with pytest.raises(RuntimeError, match="both be bfloat16 or both float32"):
        kernel.dense_mm(torch.randn(1, 32), w)
    with pytest.raises(RuntimeError, match=r"x must be \[m, k\] and w \[n, k\]"):
        kernel.dense_mm(torch.randn(1, 16).bfloat16(), w)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel.dense_mm(torch.randn(32, 2).bfloat16().T, w)
    with pytest.raises(RuntimeError, match="bias must be"):
        kernel.dense_mm(torch.randn(1, 32).bfloat16(), w, torch.randn(7).bfloat16())
    assert kernel.dense_mm(torch.empty(0, 32).bfloat16(), w).shape == (0, 8)


def test_inputs_other_than_a_matrix_take_f_linear():
    layer = Linear(64, 8, bias=False, dtype=torch.bfloat16, device="cpu")
    torch.nn.init.normal_(layer.weight)
    assert layer.pack()
    for shape in [(64,), (2, 3, 64)]:
        x = torch.randn(shape).bfloat16()
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_takes_the_kernel_up_to_its_row_limit_then_f_linear(dtype, monkeypatch):
    layer = Linear(96, 40, bias=True, dtype=dtype, device="cpu")
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    assert layer.pack()
    assert layer.dense is not None
    assert layer.weight is not None
    calls = []
    kernel = layer.dense
    layer.dense = lambda *args: calls.append(args[0].shape[0]) or kernel(*args)
    for rows in (1, DENSE_MAX_ROWS, DENSE_MAX_ROWS + 1):
        x = torch.randn(rows, 96).to(dtype)
        expected = dense_reference(x, layer.weight, layer.bias)
        torch.testing.assert_close(layer(x), expected, rtol=1e-2, atol=1e-2)
    assert calls == [1, DENSE_MAX_ROWS]  # the larger batch went to F.linear
    monkeypatch.setenv("LMI_DENSE_KERNEL", "0")
    other = Linear(96, 40, bias=True, dtype=dtype, device="cpu")
    other.pack()
    assert other.dense is None  # turned off: oneDNN's packing (or F.linear) as before
