"""The Triton quantized matmuls (engines/quant/triton_quant.py) against the plain-torch reference.

Without CUDA they run on CPU tensors in Triton's interpreter (float32 / float16), which must be switched on
before the kernels module is imported; the `cuda`-marked test repeats them on a GPU in bfloat16.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from test_quantization import greedy, tiny  # noqa: E402, F401 - the shared tiny model and greedy decode

from engines.quant import triton_quant  # noqa: E402, F401 - decorated now, under the interpreter
from engines.quant.linear import QuantizedLinear, choose_kernel  # noqa: E402
from engines.quant.methods import quantize_int4, quantize_int8, quantize_int8_blocks  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
WEIGHTS = {
    "int4 g32": lambda w: quantize_int4(w, 32),
    "int4 g64": lambda w: quantize_int4(w, 64),
    "int4 g128": lambda w: quantize_int4(w, 128),
    "int8": quantize_int8,
    "int8 blocks": lambda w: quantize_int8_blocks(w, 32),
}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def check(monkeypatch, make, n, k, rows, dtype, device=DEVICE, bias=True):
    monkeypatch.setenv("LMI_QUANT_KERNEL", "triton")
    generator = torch.Generator().manual_seed(n * k + rows)
    weight = make(torch.randn(n, k, generator=generator).to(device))
    b = torch.randn(n, generator=generator).to(device) if bias else None
    layer = QuantizedLinear(weight, b, dtype)
    assert layer.kernel == "triton"
    x = torch.randn(rows, k, generator=generator).to(device, dtype)
    got, want = layer(x), layer.expected(x)
    scale = want.float().abs().max()
    assert ((got.float() - want.float()).abs().max() / scale).item() < TOLERANCE[dtype]


@pytest.mark.parametrize("method", list(WEIGHTS))
@pytest.mark.parametrize(("n", "k"), [(48, 128), (40, 160), (33, 256)])  # odd n, a 32-column tail
@pytest.mark.parametrize("rows", [1, 5, 17])  # decode, a few rows, more than one 16-row tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_equals_the_reference(monkeypatch, method, n, k, rows, dtype):
    group = {"int4 g64": 64, "int4 g128": 128}.get(method, 32)
    if k % group:
        pytest.skip(f"{group} does not divide the width {k}")
    check(monkeypatch, WEIGHTS[method], n, k, rows, dtype, bias=method != "int8")


def test_triton_refuses_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv("LMI_QUANT_KERNEL", "triton")
    with pytest.raises(ValueError, match="blocks of 32"):
        choose_kernel(quantize_int8(torch.randn(8, 40)))
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA"):
            choose_kernel(quantize_int8(torch.randn(8, 64)))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_triton_engine_tokens_equal_the_reference_kernel(tiny, monkeypatch, method):  # noqa: F811
    """The whole engine on the Triton kernels gives the tokens of the dequantise-per-call reference."""
    monkeypatch.setenv("LMI_QUANT_KERNEL", "triton")
    on_triton = greedy(tiny, quantize=method, quantize_group_size=32)
    monkeypatch.setenv("LMI_QUANT_KERNEL", "reference")
    assert on_triton == greedy(tiny, quantize=method, quantize_group_size=32)


@cuda
@pytest.mark.parametrize("method", list(WEIGHTS))
def test_triton_kernel_on_cuda_in_bf16(monkeypatch, method):
    for rows in (1, 7, 64):
        check(monkeypatch, WEIGHTS[method], 4096, 4096, rows, torch.bfloat16, device="cuda")
