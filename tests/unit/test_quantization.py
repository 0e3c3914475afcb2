"""Weight-only int8 / int4 (option.quantize): the kernels against the plain-torch reference, and the
engine's greedy tokens against the same model with its weights replaced by their dequantised values."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import tiny_model_script

from engines.base import EngineConfig, EngineLoadError
from engines.quant.kernels import native_module, pack_int4, pack_int4_tiles, pack_int8, pack_int8_tiles
from engines.quant.linear import SMALL_BATCH, QuantizedLinear
from engines.quant.methods import (
    Int8Weight,
    group_size_for,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    quantize_int8_blocks,
    reference_linear,
)
from engines.rolling.factory import create_rolling_engine
from engines.types import GenerationRequest, SamplingParams

SHAPES = [(64, 128), (40, 192), (72, 64), (8, 256), (24, 32)]
"""(out, in): odd output counts and widths that take 128, 64 and 32-column groups; 32 columns is a
row-parallel shard's width under tensor parallelism (no whole 64-column chunk)."""
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_int8_and_int4_round_trip_within_half_a_step():
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    q8 = quantize_int8(w)
    assert q8.q.dtype == torch.int8
    assert ((q8.dequantize() - w).abs() <= q8.scale[:, None] / 2 + 1e-6).all()
    q4 = quantize_int4(w, 64)
    assert int(q4.q.max()) <= 15
    step = q4.scale.repeat_interleave(64, dim=1)
    assert ((q4.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_group_size_falls_back_to_one_that_divides():
    assert group_size_for(4096, 128) == 128
    assert group_size_for(576, 128) == 64  # SmolLM2's hidden size
    assert group_size_for(96, 128) == 32
    with pytest.raises(ValueError, match="No int4 group size up to 128 divides the input width 100"):
        group_size_for(100, 128)


@pytest.mark.parametrize(
    ("kernel", "method"),
    [
        ("native", "int8"),
        ("native", "int4"),
        ("native", "int8-grouped"),
        ("native", "int8-wide"),
        ("native", "int4-wide"),
        ("aten", "int8"),
        ("aten", "int4"),
    ],
)
@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 5, 9, SMALL_BATCH + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_reference(monkeypatch, kernel, method, n, k, rows, dtype):
    """``expected`` is plain torch: the dequantised weights times the activations, which the native
    kernel first quantizes per block of 32 for batches up to SMALL_BATCH rows (engines.quant.kernels)."""
    monkeypatch.setenv("LMI_QUANT_KERNEL", kernel)
    generator = torch.Generator().manual_seed(n * k + rows)
    w = torch.randn(n, k, generator=generator) * 0.05
    bias = torch.randn(n, generator=generator)
    weight = {
        "int8": lambda: quantize_int8(w),
        "int8-wide": lambda: quantize_int8_blocks(w, 32),
        "int4": lambda: quantize_int4(w, group_size_for(k, 128)),
        "int4-wide": lambda: quantize_int4(w, 32),
        "int8-grouped": lambda: Int8Weight(
            torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8),
            torch.rand(n, k // 32, generator=generator) * 0.01,
            32,
        ),
    }[method]()
    bits = 16 if method.endswith("-wide") else 8
    layer = QuantizedLinear(weight, bias, dtype, activation_bits=bits)
    assert layer.kernel == kernel
    x = torch.randn(rows, k, generator=generator).to(dtype)
    got = layer(x)
    want = layer.expected(x)
    assert got.dtype == dtype
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    torch.testing.assert_close(got.float(), want.float(), **tolerance)
    if kernel == "native" and rows <= SMALL_BATCH:  # the quantized activations are in the result
        floats = reference_linear(x, weight, bias).float()
        assert not torch.allclose(got.float(), floats, atol=1e-6, rtol=0)
        assert (got.float() - floats).abs().max() < 0.02 * floats.abs().max() + 0.05
        if dtype == torch.float32:  # 16 bits: within float rounding of the float product, 8 bits are not
            error = (got - floats).abs().max()
            assert error < 2e-4 if bits == 16 else error > 2e-4


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_portable_path_equals_the_vector_path(method, wide):
    """The fallback for CPUs without AVX-512 VNNI computes the same sums (compiled here side by side)."""
    module = native_module()
    generator = torch.Generator().manual_seed(7)
    w = torch.randn(96, 160, generator=generator)
    x = torch.randn(3, 160, generator=generator)
    if method == "int8":
        q, scale, group = pack_int8(quantize_int8(w))
        run = lambda portable: module.int8_mm(x, q, scale, group, None, portable, False, wide)  # noqa: E731
    else:
        packed, scale, minimum = pack_int4(quantize_int4(w, 32))
        run = lambda portable: module.int4_mm(x, packed, scale, minimum, 32, None, portable, False, wide)  # noqa: E731
    torch.testing.assert_close(run(True), run(False), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("method", ["int8", "int8-grouped", "int4-g32", "int4-g64"])
@pytest.mark.parametrize("rows", [1, 8, 19])
def test_tiles_portable_path_equals_the_vector_path(method, rows):
    """The VNNI tiles: the fallback's sums equal the vector path's, and both the row layout's, for a
    channel count that leaves a partial tile and row counts on each side of the 8-row register tile."""
    module = native_module()
    generator = torch.Generator().manual_seed(11)
    w = torch.randn(50, 192, generator=generator)
    x = torch.randn(rows, 192, generator=generator)
    bias = torch.randn(50, generator=generator)
    if method.startswith("int8"):
        weight = quantize_int8_blocks(w, 32) if method == "int8-grouped" else quantize_int8(w)
        tiles, tile_scale, group = pack_int8_tiles(weight)
        assert tiles.shape == (4, 48, 16, 4)
        run = lambda portable: module.int8_tiles_mm(x, tiles, tile_scale, group, 50, bias, portable)  # noqa: E731
        q, scale, _ = pack_int8(weight)
        rows_layout = module.int8_mm(x, q, scale, group, bias, False, False, False)
    else:
        group = int(method.removeprefix("int4-g"))
        weight = quantize_int4(w, group)
        tiles, tile_scale, tile_minimum, _ = pack_int4_tiles(weight)
        assert tiles.shape == (4, 24, 16, 4)
        run = lambda portable: module.int4_tiles_mm(  # noqa: E731
            x, tiles, tile_scale, tile_minimum, group, 50, bias, portable
        )
        packed, scale, minimum = pack_int4(weight)
        rows_layout = module.int4_mm(x, packed, scale, minimum, group, bias, False, False, False)
    vector = run(False)
    torch.testing.assert_close(run(True), vector, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(rows_layout, vector, atol=1e-4, rtol=1e-5)


def test_int8_tiles_refuse_a_mismatched_channel_count():
    tiles, scale, group = pack_int8_tiles(quantize_int8(torch.randn(20, 64)))
    with pytest.raises(RuntimeError, match="does not fill 2 tiles"):
        native_module().int8_tiles_mm(torch.randn(1, 64), tiles, scale, group, 40, None, False)


def dequantized_copy(source: Path, dest: Path, method: str) -> Path:
    """The checkpoint with every decoder projection and the LM head replaced by its quantize ->
    dequantize value."""
    shutil.copytree(source, dest)
    for file in dest.glob("*.safetensors"):
        tensors = load_file(file)
        for name, tensor in tensors.items():
            if name.endswith(".weight") and any(f".{p}." in name for p in PROJECTIONS):
                weight = (
                    quantize_int8(tensor)
                    if method == "int8"
                    else quantize_int4(tensor, group_size_for(tensor.shape[1], 128))
                )
                tensors[name] = weight.dequantize().to(tensor.dtype)
            if name == "lm_head.weight" and method == "int4":  # a 4-bit model's head: int8 in blocks of 32
                tensors[name] = quantize_int8_blocks(tensor, 32).dequantize().to(tensor.dtype)
        assert "lm_head.weight" in tensors, "an untied model: its head can differ from the embedding"
        save_file(tensors, file, metadata={"format": "pt"})
    return dest


PROMPTS = {"a": list(range(3, 40)), "b": [5, 6, 7], "c": list(range(50, 70))}


def greedy(
    path: Path, prompts: dict[str, list[int]] = PROMPTS, tokens: int = 16, **fields
) -> dict[str, list[int]]:
    """Greedy tokens of the native engine (fp32, torch ops) on ``prompts`` joining one batch."""
    engine = create_rolling_engine(
        EngineConfig(model_path=str(path), dtype="fp32", kernels="torch", max_model_len=96, **fields)
    )
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    out: dict[str, list[int]] = {}
    admit = [GenerationRequest(rid, ids, params) for rid, ids in prompts.items()]
    while admit or engine.running:
        for event in engine.step(admit, []):
            out.setdefault(event.request_id, []).append(event.token_id)
        admit = []
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_engine_tokens_equal_the_dequantised_reference(tiny, tmp_path, monkeypatch, method):
    """ATen's kernels multiply the activations as they are: the model with dequantised weights is the
    reference. (The native kernel's small batches quantize activations: see the next test.)"""
    monkeypatch.setenv("LMI_QUANT_KERNEL", "aten")
    reference = greedy(dequantized_copy(tiny, tmp_path / "dequantized", method))
    quantized = greedy(tiny, quantize=method)
    assert quantized == reference
    if method == "int4":
        assert quantized != greedy(tiny)  # 4 bits do change this model's tokens (8 bits do not)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_native_kernel_tokens_equal_its_torch_reference(tiny, monkeypatch, method):
    """The engine on the native kernel against the same engine whose projections compute ``expected``
    in plain torch (quantized activations for small batches, dequantised tiles for large ones)."""
    monkeypatch.setenv("LMI_QUANT_KERNEL", "native")
    native = greedy(tiny, quantize=method)
    monkeypatch.setattr(QuantizedLinear, "forward", QuantizedLinear.expected)
    assert native == greedy(tiny, quantize=method)


def test_the_projections_are_stored_quantized(tiny):
    from engines.llama.weights import load_llama

    model, _ = load_llama(str(tiny), torch.float32, quantize="int4", group_size=128)
    layer = model.layers[0]
    assert isinstance(layer.qkv, QuantizedLinear)
    assert layer.qkv.method == "int4"
    assert not [
        name for name, _ in layer.named_parameters() if name.endswith("weight") and "norm" not in name
    ]
    assert isinstance(model.lm_head, QuantizedLinear)  # the head too: int8 in blocks of 32
    assert (model.lm_head.method, model.lm_head.expected_weight.group) == ("int8", 32)
    assert model.lm_head.activation_bits == 16
    assert layer.qkv.activation_bits == 8
    eight_bit, _ = load_llama(str(tiny), torch.float32, quantize="int8")
    assert isinstance(eight_bit.layers[0].qkv, QuantizedLinear)  # its head: test_rescored_head.py


@pytest.mark.parametrize(("n", "k"), [(48, 64), (32, 96), (16, 256)])
@pytest.mark.parametrize("rows", [1, 5, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_scaled_mm_equals_its_reference(monkeypatch, n, k, rows, dtype):
    """Row-scaled fp8 activations times per-channel-scaled fp8 weights (torch._scaled_mm, which runs on
    CPUs too) against the same quantization multiplied exactly; both round to bfloat16 at one point."""
    monkeypatch.delenv("LMI_QUANT_KERNEL", raising=False)
    generator = torch.Generator().manual_seed(n + k + rows)
    weight = quantize_fp8(torch.randn(n, k, generator=generator))
    bias = torch.randn(n, generator=generator) if rows != 5 else None
    layer = QuantizedLinear(weight, bias, dtype)
    assert layer.kernel == "scaled_mm"
    x = torch.randn(2, rows, k, generator=generator).to(dtype)
    got, want = layer(x), layer.expected(x)
    assert got.dtype == dtype
    assert got.shape == (2, rows, n)
    assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < 1e-2


def test_fp8_keeps_three_mantissa_bits():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    quantized = quantize_fp8(w)
    error = (quantized.dequantize() - w).abs()
    bound = w.abs() * 2**-4 + quantized.scale[:, None] * 2**-9  # half a step, or e4m3's smallest subnormal
    assert quantized.q.dtype == torch.float8_e4m3fn
    assert bool((error <= bound).all())


def test_fp8_on_cpu_is_refused_clearly(tiny):
    with pytest.raises(EngineLoadError, match="option.quantize=fp8 needs a GPU with fp8 matmuls"):
        create_rolling_engine(EngineConfig(model_path=str(tiny), quantize="fp8"))


def test_an_unknown_method_fails_start_up():
    from serving.config import load_config
    from serving.errors import ConfigError

    with pytest.raises(ConfigError, match="option.quantize"):
        load_config(None, {"OPTION_QUANTIZE": "awq"})


def test_int4_in_groups_of_32_is_exactly_the_default_models_q4_1_grid():
    """The bundled SmolLM2 ships as Q4_1 GGUF (blocks of 32: q, scale d, minimum m) and is dequantised at
    conversion; quantizing it again to int4 in groups of 32 gives back those blocks bit for bit, so
    option.quantize=int4 with quantize_group_size=32 serves the GGUF's own 4-bit weights."""
    import numpy as np
    from gguf import GGUFReader
    from safetensors import safe_open

    from engines.hf.default_model import ensure_default_model, find_default_gguf

    tensor = next(
        t for t in GGUFReader(str(find_default_gguf())).tensors if t.name == "blk.3.ffn_down.weight"
    )
    assert tensor.tensor_type.name == "Q4_1"
    blocks = np.asarray(tensor.data).reshape(tensor.data.shape[0], -1, 20)  # d f16, m f16, 16 bytes of q
    scale = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    minimum = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    packed = torch.from_numpy(blocks[..., 4:20].copy())
    q = torch.cat([packed & 0xF, packed >> 4], dim=-1).reshape(blocks.shape[0], -1)
    name = "model.layers.3.mlp.down_proj.weight"
    for file in Path(ensure_default_model()).glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            if name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                requantized = quantize_int4(handle.get_tensor(name), 32)
    assert torch.equal(requantized.q, q)
    assert torch.equal(requantized.scale, scale)
    assert torch.equal(requantized.minimum, minimum)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 16, 64])
def test_fp8_scaled_mm_on_cuda(rows):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 matmuls need compute capability 8.9")
    generator = torch.Generator().manual_seed(rows)
    weight = quantize_fp8(torch.randn(4096, 4096, generator=generator).cuda())
    layer = QuantizedLinear(weight, None, torch.bfloat16)
    x = torch.randn(rows, 4096, generator=generator).cuda().bfloat16()
    got, want = layer(x), layer.expected(x)
    assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < 1e-2


def test_the_fast_path_follows_buffers_replaced_by_apply():
    """.to() / .share_memory() replace a module's buffers: the bound kernel call must use the new ones."""
    layer = QuantizedLinear(quantize_int8(torch.randn(40, 64) * 0.05), None, torch.float32)
    x = torch.randn(3, 64)
    before = layer(x)
    layer._apply(lambda t: t.clone())
    torch.testing.assert_close(layer(x), before)
    layer.scale.zero_()  # the new buffer, not the one the first binding held
    assert layer(x).abs().max() == 0
