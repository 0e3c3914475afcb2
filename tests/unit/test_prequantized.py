"""Pre-quantized checkpoints load as they are stored (engines.quant.prequantized): AWQ, GPTQ and GGUF
blocks become Int4Weight / Int8Weight whose dequantised values equal the format's own dequantisation,
and the engine's greedy tokens equal those of the same model with those values as float weights.

The checkpoints are written here from the formats' descriptions (AutoAWQ's and AutoGPTQ's packing,
GPTQModel's v1 zeros, ggml's blocks through the gguf package), independently of the loaders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file
from support import tiny_model_script
from test_quantization import greedy

from engines.base import EngineConfig, EngineLoadError
from engines.parallel.layout import ParallelLayout, ShardPlan
from engines.quant.awq import AwqFormat
from engines.quant.gguf import GgufBlocks, decode
from engines.quant.gptq import GptqFormat
from engines.quant.linear import QuantizedLinear
from engines.quant.methods import Int4Weight, quantize_int8_blocks
from engines.quant.parts import for_kernels, fuse
from engines.quant.prequantized import PARTS, open_source, rank_part
from engines.rolling.factory import create_rolling_engine

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
"""AutoAWQ's order_map: nibble i of a packed word holds output column 8c + AWQ_ORDER[i]."""
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- packing, written from the formats' descriptions ---------------------------------------------


def as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) as the int32 the checkpoints store."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] 0..15 -> int32 [rows, cols / 8], AutoAWQ's interleaved order."""
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for column in range(words.shape[1]):
        for i, offset in enumerate(AWQ_ORDER):
            words[:, column] |= values[:, 8 * column + offset].long() << (4 * i)
    return as_int32(words)


def pack_gptq_rows(values: torch.Tensor) -> torch.Tensor:
    """[in, out] 0..15 -> int32 [in / 8, out]: row 8r + j at bits 4j of word r."""
    words = torch.zeros(values.shape[0] // 8, values.shape[1], dtype=torch.int64)
    for j in range(8):
        words |= values[j::8].long() << (4 * j)
    return as_int32(words)


def pack_gptq_zeros(zeros: torch.Tensor, v1: bool) -> torch.Tensor:
    """[groups, out] zeros -> int32 [groups, out / 8] in plain order; v1 stores every zero minus one,
    GPTQModel's way (0x11111111 off each word, borrows included)."""
    words = torch.zeros(zeros.shape[0], zeros.shape[1] // 8, dtype=torch.int64)
    for j in range(8):
        words |= zeros[:, j::8].long() << (4 * j)
    return as_int32(words - 0x11111111 if v1 else words)


def random_int4(n: int, k: int, group: int, seed: int, sym: bool = False):
    """Random nibbles [n, k], zeros [n, k / group] (8 when symmetric) and fp16 scales [n, k / group]."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=generator)
    zeros = (
        torch.full((n, k // group), 8) if sym else torch.randint(0, 16, (n, k // group), generator=generator)
    )
    scales = (torch.rand(n, k // group, generator=generator) * 0.04 + 0.01).half()
    return q, zeros, scales


def dequantised(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """(q - z) * s in float32 (exact: a 5-bit integer times an fp16)."""
    z, s = zeros.repeat_interleave(group, 1), scales.float().repeat_interleave(group, 1)
    return (q - z).float() * s


def awq_tensors(module: str, q, zeros, scales) -> dict[str, torch.Tensor]:
    return {
        f"{module}.qweight": pack_awq(q.T),
        f"{module}.qzeros": pack_awq(zeros.T),
        f"{module}.scales": scales.T.contiguous(),
    }


def gptq_tensors(module: str, q, zeros, scales, group: int, v1: bool) -> dict[str, torch.Tensor]:
    return {
        f"{module}.qweight": pack_gptq_rows(q.T),
        f"{module}.qzeros": pack_gptq_zeros(zeros.T, v1),
        f"{module}.scales": scales.T.contiguous(),
        f"{module}.g_idx": (torch.arange(q.shape[1]) // group).to(torch.int32),
    }


# ---- the formats, one projection at a time -------------------------------------------------------


def test_awq_unpacks_to_its_own_dequantisation():
    q, zeros, scales = random_int4(40, 256, 64, seed=1)
    tensors = awq_tensors("m", q, zeros, scales)
    weight = AwqFormat(64).unpack(tensors.get, "m")
    assert isinstance(weight, Int4Weight)
    assert weight.group == 64
    assert torch.equal(weight.dequantize(), dequantised(q, zeros, scales, 64))
    # AutoAWQ's own reference computes in fp16: the exact values round to exactly its results
    fp16 = (q - zeros.repeat_interleave(64, 1)).half() * scales.repeat_interleave(64, 1)
    assert torch.equal(weight.dequantize().half(), fp16)


@pytest.mark.parametrize(("v1", "sym"), [(True, True), (True, False), (False, True), (False, False)])
def test_gptq_unpacks_to_its_own_dequantisation(v1, sym):
    q, zeros, scales = random_int4(48, 128, 32, seed=2, sym=sym)
    if not sym:
        zeros[0, :2] = torch.tensor([0, 15])  # v1 stores zero 0 as -1: the word borrows
    tensors = gptq_tensors("m", q, zeros, scales, 32, v1)
    weight = GptqFormat(32, v2=not v1, sym=sym).unpack(tensors.get, "m")
    assert torch.equal(weight.dequantize(), dequantised(q, zeros, scales, 32))


def test_gptq_with_act_order_is_refused_with_the_fix():
    q, zeros, scales = random_int4(16, 64, 32, seed=3)
    tensors = gptq_tensors("m", q, zeros, scales, 32, v1=True)
    tensors["m.g_idx"] = tensors["m.g_idx"].flip(0)
    with pytest.raises(EngineLoadError, match="desc_act.*Fix: quantize again with desc_act=False"):
        GptqFormat(32, v2=False).unpack(tensors.get, "m")


@pytest.mark.parametrize(
    ("method", "config", "message"),
    [
        (
            "gptq",
            {"bits": 8, "group_size": 128},
            "GPTQ checkpoint with bits=8: the native engine reads GPTQ 4-bit",
        ),
        ("awq", {"bits": 4, "version": "gemv"}, "AWQ checkpoint with version='gemv'"),
        ("awq", {"bits": 3, "version": "gemm"}, "AWQ checkpoint with bits=3"),
    ],
)
def test_unsupported_variants_say_what_is_supported(method, config, message):
    parse = {"awq": AwqFormat, "gptq": GptqFormat}[method].from_config
    with pytest.raises(EngineLoadError, match=message):
        parse(config)


def q4_k_blocks(rows: int, superblocks: int, seed: int) -> np.ndarray:
    """Random Q4_K bytes with finite fp16 d and dmin (the rest of a super-block is any bytes)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, superblocks, 144), dtype=np.uint8)
    for offset in (0, 2):
        raw[..., offset : offset + 2] = (
            (rng.random((rows, superblocks, 1)) * 0.1).astype(np.float16).view(np.uint8)
        )
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "F32", "F16", "BF16"])
def test_gguf_blocks_dequantise_bit_for_bit(kind):
    qtype = GGMLQuantizationType[kind]
    rows = np.random.default_rng(0).standard_normal((24, 512)).astype(np.float32)
    raw = q4_k_blocks(24, 2, seed=1) if kind == "Q4_K" else quantize(rows, qtype)
    part = decode(kind, torch.from_numpy(raw), "blk.0.attn_q.weight")
    got = part if isinstance(part, torch.Tensor) else part.dequantize()
    assert torch.equal(got, torch.from_numpy(dequantize(raw, qtype)))
    if kind.startswith("Q"):
        assert part.group == 32


def test_an_unsupported_gguf_type_is_named():
    with pytest.raises(EngineLoadError, match="GGUF tensor blk.2.ffn_down.weight is Q6_K"):
        decode("Q6_K", torch.zeros(4, 210, dtype=torch.uint8), "blk.2.ffn_down.weight")


@pytest.mark.parametrize(("group", "stored"), [(256, 256), (-1, 512)])  # -1: one group per column
def test_groups_the_kernels_lack_are_split_exactly(group, stored):
    q, zeros, scales = random_int4(8, 512, stored, seed=4)
    weight = AwqFormat(group).unpack(awq_tensors("m", q, zeros, scales).get, "m")
    assert weight.group == stored
    split = for_kernels(weight, "m")
    assert split.group == 128
    assert torch.equal(split.dequantize(), weight.dequantize())


# ---- whole checkpoints through the engine ---------------------------------------------------------


@pytest.fixture(autouse=True)
def aten_kernels(monkeypatch):
    """ATen's kernels (and the reference for grouped int8) multiply the activations as they are, so the
    model with dequantised weights is the exact reference here; the native kernel, which quantizes small
    batches' activations, is checked against its own torch reference in test_quantization.py."""
    monkeypatch.setenv("LMI_QUANT_KERNEL", "aten")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)


def is_projection(name: str) -> bool:
    return name.endswith(".weight") and any(f".{p}." in name for p in PROJECTIONS)


def write_packed(tiny: Path, root: Path, method: str, group: int = 32, v1: bool = True) -> tuple[Path, Path]:
    """``tiny`` with random AWQ / GPTQ projections, and the same model with their dequantised values."""
    packed, reference = root / method, root / f"{method}-reference"
    shutil.copytree(tiny, packed)
    shutil.copytree(tiny, reference)
    floats = load_file(tiny / "model.safetensors")
    stored, values = {}, dict(floats)
    for seed, (name, weight) in enumerate(sorted(floats.items())):
        if not is_projection(name):
            stored[name] = weight
            continue
        module = name.removesuffix(".weight")
        q, zeros, scales = random_int4(*weight.shape, group, seed=seed)
        values[name] = dequantised(q, zeros, scales, group)
        if method == "awq":
            stored.update(awq_tensors(module, q, zeros, scales))
        else:
            stored.update(gptq_tensors(module, q, zeros, scales, group, v1))
    values["lm_head.weight"] = quantize_int8_blocks(floats["lm_head.weight"], 32).dequantize()  # see apply.py
    save_file(stored, packed / "model.safetensors", metadata={"format": "pt"})
    save_file(values, reference / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((packed / "config.json").read_text())
    quantization = {"quant_method": method, "bits": 4, "group_size": group}
    quantization.update(
        {"version": "gemm", "zero_point": True}
        if method == "awq"
        else {"sym": False, "desc_act": False, "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    )
    config["quantization_config"] = quantization
    (packed / "config.json").write_text(json.dumps(config))
    return packed, reference


@pytest.mark.parametrize(("method", "v1"), [("awq", False), ("gptq", True), ("gptq", False)])
def test_engine_tokens_equal_the_dequantised_model(tiny, tmp_path, method, v1):
    from engines.llama.weights import load_llama

    packed, reference = write_packed(tiny, tmp_path, method, v1=v1)
    model, _ = load_llama(str(packed), torch.float32, pack=False)
    assert all(isinstance(getattr(layer, name), QuantizedLinear) for layer in model.layers for name in PARTS)
    assert greedy(packed) == greedy(reference)


def test_each_tensor_parallel_rank_holds_its_exact_slice(tiny, tmp_path):
    from engines.llama.weights import load_llama

    packed, reference = write_packed(tiny, tmp_path, "awq")
    for rank in range(2):
        layout = ParallelLayout(tensor_parallel=2, rank=rank)
        model, _ = load_llama(str(reference), torch.float32, pack=False, layout=layout)
        plan = ShardPlan.build(model.full_spec, layout)
        source = open_source(packed, None)
        for index, layer in enumerate(model.layers):
            for name, modules in PARTS.items():
                parts = [rank_part(source, f"model.layers.{index}.{m}", plan) for m in modules]
                assert torch.equal(fuse(parts, name).dequantize(), getattr(layer, name).weight)
        source.close()
        sharded, _ = load_llama(str(packed), torch.float32, pack=False, layout=layout)
        for name in PARTS:  # the kernels compute with this rank's slice
            got, want = getattr(sharded.layers[1], name), getattr(model.layers[1], name)
            x = torch.eye(want.weight.shape[1])
            torch.testing.assert_close(got(x), want(x), rtol=1e-5, atol=1e-6)


def test_a_shard_that_splits_a_group_is_refused(tiny, tmp_path):
    from engines.llama.weights import load_llama

    packed, _ = write_packed(tiny, tmp_path, "awq", group=64)
    with pytest.raises(EngineLoadError, match="input columns \\[0, 32\\) split a quantization group of 64"):
        load_llama(str(packed), torch.float32, pack=False, layout=ParallelLayout(tensor_parallel=2))


def test_quantizing_a_quantized_checkpoint_again_is_refused(tiny, tmp_path):
    packed, _ = write_packed(tiny, tmp_path, "awq")
    with pytest.raises(EngineLoadError, match="already AWQ 4-bit .*Fix: drop option.quantize"):
        create_rolling_engine(EngineConfig(model_path=str(packed), kernels="torch", quantize="int8"))


# ---- GGUF: option.quantize=gguf ------------------------------------------------------------------


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter order for q/k rows: each head's two rotary halves interleaved."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


GGUF_TYPES = {
    # GGUF name: (HF module, (layer 0's type, layer 1's)); layer 1 mixes Q4_0 and Q8_0 inside q/k/v,
    # which is served as one exact float matrix
    "attn_q": ("self_attn.q_proj", ("Q4_0", "Q4_0")),
    "attn_k": ("self_attn.k_proj", ("Q4_0", "Q4_0")),
    "attn_v": ("self_attn.v_proj", ("Q4_0", "Q8_0")),
    "attn_output": ("self_attn.o_proj", ("Q4_1", "Q4_1")),
    "ffn_gate": ("mlp.gate_proj", ("Q8_0", "Q8_0")),
    "ffn_up": ("mlp.up_proj", ("Q8_0", "Q8_0")),
    "ffn_down": ("mlp.down_proj", ("F16", "F16")),
}


def write_gguf(tiny: Path, root: Path) -> tuple[Path, Path]:
    """``tiny`` with a GGUF of its projections beside config.json (llama q/k order), and the same model
    with the GGUF's dequantised values as float weights."""
    folder, reference = root / "gguf", root / "gguf-reference"
    shutil.copytree(tiny, folder)
    shutil.copytree(tiny, reference)
    floats = load_file(tiny / "model.safetensors")
    heads = {"attn_q": 4, "attn_k": 2}
    writer = GGUFWriter(str(folder / "tiny.gguf"), "llama")
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    for layer in range(2):
        for short, (module, kinds) in GGUF_TYPES.items():
            name = f"model.layers.{layer}.{module}.weight"
            weight = floats[name].numpy()
            weight = llama_cpp_permute(weight, heads[short]) if short in heads else weight
            qtype = GGMLQuantizationType[kinds[layer]]
            if kinds[layer] == "F16":
                stored = weight.astype(np.float16)
                writer.add_tensor(f"blk.{layer}.{short}.weight", stored)
            else:
                stored = quantize(weight, qtype)
                writer.add_tensor(f"blk.{layer}.{short}.weight", stored, raw_dtype=qtype)
            values = dequantize(stored, qtype)
            if short in heads:  # back to HF order, as transformers does
                rows = values.shape[0] // heads[short] // 2
                values = values.reshape(heads[short], rows, 2, -1).swapaxes(1, 2).reshape(values.shape)
            floats[name] = torch.from_numpy(np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(floats, reference / "model.safetensors", metadata={"format": "pt"})
    return folder, reference


def test_gguf_blocks_serve_as_stored(tiny, tmp_path):
    from engines.llama.weights import load_llama

    folder, reference = write_gguf(tiny, tmp_path)
    model, _ = load_llama(str(folder), torch.float32, pack=False, quantize="gguf")
    first, second = model.layers
    assert first.qkv.method == "int4"
    assert second.o_proj.method == "int4"
    assert first.gate_up.method == "int8"
    assert not isinstance(second.qkv, QuantizedLinear)  # Q4_0 q/k with a Q8_0 v: one float matrix
    assert not isinstance(first.down, QuantizedLinear)  # stored as F16
    expected = load_file(reference / "model.safetensors")
    blocks = GgufBlocks(folder / "tiny.gguf")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj"):
        assert torch.equal(blocks.part(name).dequantize(), expected[f"{name}.weight"])
    blocks.close()
    assert torch.equal(
        second.qkv.weight,
        torch.cat([expected[f"model.layers.1.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]),
    )
    assert greedy(folder, quantize="gguf") == greedy(reference)


def test_int4_defaults_to_the_grid_of_the_4_bit_gguf_it_was_converted_from(tiny, tmp_path):
    """Unset, quantize_group_size is 128, except on weights converted from a GGUF with 4-bit projections:
    their grid is groups of 32, which coarser groups would lose (the default model ships as Q4_1)."""
    from engines.quant.gguf import write_record
    from engines.rolling.factory import group_size

    folder, _ = write_gguf(tiny, tmp_path)
    unset = EngineConfig(model_path=str(folder), quantize="int4")
    assert group_size(unset) == 128  # a .gguf beside config.json is not proof the weights came from it
    write_record(folder, folder / "tiny.gguf")
    assert group_size(unset) == 32
    assert group_size(EngineConfig(model_path=str(folder), quantize="int4", quantize_group_size=64)) == 64
    assert group_size(EngineConfig(model_path=str(tiny), quantize="int4")) == 128


def test_the_default_model_quantizes_to_int4_on_its_own_grid():
    from engines.hf.default_model import ensure_default_model
    from engines.quant.apply import int4_group_size

    assert int4_group_size(ensure_default_model(), None) == 32
    assert int4_group_size(ensure_default_model(), 128) == 128


def test_quantize_gguf_without_a_gguf_says_how_to_fix(tiny):
    with pytest.raises(EngineLoadError, match="has no .gguf file beside config.json.*Fix: put the one GGUF"):
        create_rolling_engine(EngineConfig(model_path=str(tiny), kernels="torch", quantize="gguf"))


def test_the_option_accepts_gguf():
    from serving.config import load_config

    load_config(None, {"OPTION_QUANTIZE": "gguf"})


def test_the_default_model_serves_its_own_q4_1_blocks():
    """The converted default model records its GGUF; with option.quantize=gguf each projection is the
    GGUF's Q4_1 blocks (q/k rows back in HF order), bit for bit the float weights the conversion wrote,
    and greedy tokens equal the float model's."""
    from safetensors import safe_open

    from engines.hf.default_model import ensure_default_model
    from engines.quant.prequantized import MODULES

    path = Path(ensure_default_model())
    source = open_source(path, "gguf")
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        for layer in range(30):
            for module in MODULES:
                name = f"model.layers.{layer}.{module}"
                assert torch.equal(source.part(name).dequantize(), handle.get_tensor(f"{name}.weight")), name
    source.close()
    prompts = {"a": list(range(300, 312)), "b": [504, 3937, 282]}  # kept short: int4 decode is slow on CPU
    assert greedy(path, prompts, 6, quantize="gguf") == greedy(path, prompts, 6)


def test_a_packed_checkpoint_is_not_partitioned_without_its_projections(tiny, tmp_path):
    from engines.parallel.partition import write_partition

    folder, _ = write_packed(tiny, tmp_path, "awq")
    with pytest.raises(EngineLoadError, match="tensor_parallel_degree"):
        write_partition(folder, tmp_path / "part", tensor_parallel=2)
    assert not (tmp_path / "part").exists()
