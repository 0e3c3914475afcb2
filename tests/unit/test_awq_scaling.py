"""Activation-aware scaling before quantization (engines.quant.awq_scaling, ``lmi quantize --calibration``):
folding keeps the float function, the search never loses to plain quantization and wins where a few input
channels carry outliers, and the CLI writes a checkpoint that records its calibration and serves."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from support import tiny_model_script

from engines.base import EngineLoadError
from engines.evaluate.quality import position_log_probs
from engines.llama.weights import load_llama
from engines.parallel.partition import Manifest, write_partition
from engines.quant.awq_scaling import best_scales, fold_scales, foldable, quantizer, scale_for_quantization
from engines.quant.methods import quantize_int4
from serving.cli import main

TEXT = " ".join(f"The {i}th river runs past {i % 7} hills and {i % 5} towns to the sea." for i in range(80))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)


@pytest.fixture(scope="module")
def tiny_mha(tiny, tmp_path_factory) -> Path:
    """The tiny llama with one KV head per head, so o_proj's input can be folded into v."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dest = tmp_path_factory.mktemp("mha")
    for file in tiny.iterdir():
        if "token" in file.name or file.name.endswith((".json", ".model")) and file.name != "config.json":
            shutil.copy(file, dest / file.name)
    config = LlamaConfig.from_pretrained(tiny)
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(dest)
    return dest


@pytest.mark.parametrize("kind", ["tiny", "tiny_mha"])
def test_folded_scales_keep_the_float_model(request, kind):
    path = request.getfixturevalue(kind)
    model, _ = load_llama(str(path), torch.float64, "cpu", max_model_len=128, pack=False)
    ids = list(range(3, 60))
    before = position_log_probs(model, ids)
    generator = torch.Generator().manual_seed(0)
    names = foldable(model.layers[0])
    assert ("o_proj" in names) == (kind == "tiny_mha")
    for layer in model.layers:
        for name in names:
            width = getattr(layer, name).weight.shape[1]
            fold_scales(layer, name, torch.rand(width, generator=generator, dtype=torch.float64) * 3 + 0.25)
    torch.testing.assert_close(position_log_probs(model, ids), before, atol=1e-8, rtol=1e-8)


def test_the_search_wins_on_outlier_channels_and_never_loses():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 128, generator=generator)
    inputs = torch.randn(512, 128, generator=generator)
    inputs[:, :4] *= 30  # a few channels carry most of the activation mass, as in real LLMs
    s, loss, plain = best_scales(weight, inputs, quantizer("int4", 32))
    assert loss < 0.8 * plain
    assert s[:4].min() > s[4:].max()  # the outlier channels' weights are the ones kept finer
    effective = quantize_int4(weight * s, 32).dequantize() / s
    assert (inputs @ effective.T - inputs @ weight.T).pow(2).mean().item() == pytest.approx(loss, rel=1e-4)
    flat = torch.randn(512, 128, generator=generator)
    _, loss, plain = best_scales(weight, flat, quantizer("int8", 128))
    assert loss <= plain


def test_scaling_a_model_lowers_its_quantization_loss(tiny):
    model, _ = load_llama(str(tiny), torch.float32, "cpu", max_model_len=300, pack=False)
    report = scale_for_quantization(model, [list(range(3, 200))], "int4", 32)
    assert report["projections"] == 2 * 3  # two layers; o_proj is not foldable under grouped KV heads
    assert report["loss_ratio"] <= 1.0


def test_lmi_quantize_with_a_calibration_text(tiny, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text(TEXT)
    output = tmp_path / "int4-awq"
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--model-dir", str(tiny), "--method", "int4", "--group-size", "32",
              "--dtype", "fp32", "--calibration", str(text), "--output", str(output)])  # fmt: skip
    assert exit_info.value.code == 0
    manifest = Manifest.read(output)
    assert manifest.quantize == "int4"
    assert manifest.calibration_sha256 is not None
    assert len(manifest.calibration_sha256) == 64
    model, _ = load_llama(str(output), torch.float32, "cpu", max_model_len=64, pack=False)
    assert position_log_probs(model, list(range(3, 30))).isfinite().all()


def test_calibration_needs_one_rank_and_enough_text(tiny, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text(TEXT)
    with pytest.raises(EngineLoadError, match="one rank"):
        write_partition(tiny, tmp_path / "tp2", 2, quantize="int4", calibration=text)
    text.write_text("Too short.")
    with pytest.raises(EngineLoadError, match="at least a paragraph"):
        write_partition(tiny, tmp_path / "short", 1, quantize="int4", calibration=text)
    with pytest.raises(EngineLoadError, match="No such file"):
        write_partition(tiny, tmp_path / "missing", 1, quantize="int4", calibration=tmp_path / "absent.txt")
