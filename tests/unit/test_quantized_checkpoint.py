"""Quantized checkpoints (``lmi quantize``, ``lmi partition --quantize``): stored in a portable form,
loaded without quantizing again, and serving exactly what quantizing at load time serves."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import tiny_model_script

from engines.base import EngineConfig, EngineLoadError
from engines.parallel.partition import Manifest
from engines.quant.linear import QuantizedLinear
from engines.rolling.factory import create_rolling_engine
from engines.types import GenerationRequest, SamplingParams
from serving.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)


def cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code


def greedy(path: Path, **fields) -> dict[str, list[int]]:
    engine = create_rolling_engine(
        EngineConfig(model_path=str(path), dtype="fp32", kernels="torch", max_model_len=96, **fields)
    )
    try:
        admit = [
            GenerationRequest(rid, ids, SamplingParams(max_new_tokens=12, ignore_eos=True))
            for rid, ids in {"a": list(range(3, 40)), "b": [5, 6, 7]}.items()
        ]
        out: dict[str, list[int]] = {}
        while admit or engine.running:
            for event in engine.step(admit, []):
                out.setdefault(event.request_id, []).append(event.token_id)
            admit = []
        layer = engine.model.layers[0]
        assert isinstance(layer.gate_up, QuantizedLinear)
        return out
    finally:
        engine.close()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_checkpoint_serves_what_quantizing_at_load_serves(tiny, tmp_path, method):
    output = tmp_path / method
    assert cli("quantize", "--model-dir", str(tiny), "--method", method, "--group-size", "32",
               "--dtype", "fp32", "--output", str(output)) == 0  # fmt: skip
    manifest = Manifest.read(output)
    assert (manifest.quantize, manifest.group_size) == (method, 32 if method == "int4" else None)
    original = sum(f.stat().st_size for f in tiny.glob("*.safetensors"))
    assert manifest.files[0].bytes < original
    assert greedy(output) == greedy(tiny, quantize=method, quantize_group_size=32)


def test_quantized_partitions_for_two_ranks(tiny, tmp_path):
    output = tmp_path / "tp2"
    assert cli("partition", "--model-dir", str(tiny), "--tensor-parallel-degree", "2", "--quantize", "int4",
               "--group-size", "32", "--dtype", "fp32", "--output", str(output)) == 0  # fmt: skip
    assert greedy(output, tensor_parallel_degree=2) == greedy(
        tiny, tensor_parallel_degree=2, quantize="int4", quantize_group_size=32
    )


def test_another_method_on_a_quantized_checkpoint_is_refused(tiny, tmp_path):
    output = tmp_path / "int4"
    assert cli("quantize", "--model-dir", str(tiny), "--method", "int4", "--output", str(output)) == 0
    with pytest.raises(EngineLoadError, match="holds int4 weights; option.quantize=int8 cannot re-quantize"):
        create_rolling_engine(EngineConfig(model_path=str(output), quantize="int8"))
