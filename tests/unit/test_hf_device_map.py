"""The HF handler's accelerate path: option.tensor_parallel_degree / option.device_map become
from_pretrained's ``device_map`` and a ``max_memory`` naming exactly the GPUs to use (DJL's
"huggingface accelerate" path for architectures the native engine lacks)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from support import tiny_model_script

from engines.base import EngineConfig, EngineLoadError
from engines.hf import loading
from engines.hf.loading import check_placement, device_map_kwargs

GIB = 2**30
FOUR_GPUS = [80 * GIB, 80 * GIB, 40 * GIB, 80 * GIB]


def config(device: str = "cuda", degree: int = 1, device_map: str | None = None) -> EngineConfig:
    return EngineConfig("/unused", device=device, tensor_parallel_degree=degree, device_map=device_map)


@pytest.mark.parametrize("degree", [2, 3])
def test_degree_limits_max_memory_to_the_first_n_gpus(degree):
    kwargs = device_map_kwargs(config(degree=degree), FOUR_GPUS)
    assert kwargs["device_map"] == "auto"
    assert sorted(kwargs["max_memory"]) == list(range(degree))
    assert kwargs["max_memory"][0] == int(80 * GIB * 0.9)  # gpu_memory_utilization of the free memory


def test_max_uses_every_visible_gpu_from_the_chosen_one():
    assert sorted(device_map_kwargs(config(degree=0), FOUR_GPUS)["max_memory"]) == [0, 1, 2, 3]
    assert sorted(device_map_kwargs(config("cuda:2", 0), FOUR_GPUS)["max_memory"]) == [2, 3]
    assert sorted(device_map_kwargs(config("cuda:1", 2), FOUR_GPUS)["max_memory"]) == [1, 2]


def test_more_gpus_than_visible_fails_with_the_numbers():
    numbers = r"tensor_parallel_degree=8 .* 8 GPUs, but 4 GPU\(s\) are visible"
    with pytest.raises(EngineLoadError, match=numbers):
        device_map_kwargs(config(degree=8), FOUR_GPUS)
    with pytest.raises(EngineLoadError, match=r"3 GPUs, but 1 GPU\(s\) are visible from cuda:3 on"):
        device_map_kwargs(config("cuda:3", 3), FOUR_GPUS)


def test_one_gpu_and_no_device_map_loads_whole():
    assert device_map_kwargs(config(degree=1), FOUR_GPUS) == {}


def test_explicit_strategy_passes_through_over_every_gpu_unless_a_degree_limits_it():
    kwargs = device_map_kwargs(config(device_map="Sequential"), FOUR_GPUS)
    assert kwargs["device_map"] == "sequential"
    assert sorted(kwargs["max_memory"]) == [0, 1, 2, 3]
    kwargs = device_map_kwargs(config(degree=2, device_map="balanced"), FOUR_GPUS)
    assert kwargs["device_map"] == "balanced"
    assert sorted(kwargs["max_memory"]) == [0, 1]


def test_explicit_placement_passes_through_as_given():
    assert device_map_kwargs(config(device_map='{"": 1}'), FOUR_GPUS) == {"device_map": {"": 1}}
    assert device_map_kwargs(config(device_map="cuda:1"), FOUR_GPUS) == {"device_map": "cuda:1"}
    assert device_map_kwargs(config(device_map="0"), FOUR_GPUS) == {"device_map": 0}
    with pytest.raises(EngineLoadError, match="not valid JSON"):
        device_map_kwargs(config(device_map="{bad"), FOUR_GPUS)


@pytest.mark.parametrize("fields", [{"degree": 4}, {"degree": 0}, {"device_map": "auto"}])
def test_cpu_loads_whole_with_a_warning(fields, caplog):
    with caplog.at_level(logging.WARNING, logger="engines.hf"):
        assert device_map_kwargs(config("cpu", **fields), []) == {}
    assert "does not split layers on CPU" in caplog.text


def test_cpu_without_a_degree_is_quiet(caplog):
    with caplog.at_level(logging.WARNING, logger="engines.hf"):
        assert device_map_kwargs(config("cpu"), []) == {}
    assert not caplog.records


def test_placement_spilling_off_the_gpus_fails_start_up(caplog):
    placement = device_map_kwargs(config(degree=2), FOUR_GPUS)
    with caplog.at_level(logging.INFO, logger="engines.hf"):
        check_placement({"embed": 0, "h.0": 0, "h.1": 1, "lm_head": 1}, placement)
    assert "placed modules on {'0': 2, '1': 2}" in caplog.text
    spilled = {"embed": 0, "h.0": 1, "h.1": "cpu", "h.2": "disk", "lm_head": "disk"}
    with pytest.raises(EngineLoadError, match="GPU.s. 0, 1 .* put 3 module.s. on cpu, disk"):
        check_placement(spilled, placement)
    with pytest.raises(EngineLoadError, match="put 1 module.s. on cpu"):
        check_placement({"": "cpu"}, placement)  # all of it on one device: transformers sets no hf_device_map
    check_placement({"h.0": 0, "h.1": "cpu"}, {"device_map": {"h.0": 0, "h.1": "cpu"}})  # as the user asked


def test_missing_accelerate_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate raises ImportError
    with pytest.raises(EngineLoadError, match="pip install accelerate"):
        loading._require_accelerate("auto")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> str:
    """A seeded random GPT-2 (an architecture the native engine does not run) with a tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    tokenizer = tiny_model_script().build_tokenizer("llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(
            GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=128,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        )  # fmt: skip
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


def generate(path: str, device: str, degree: int) -> tuple[object, list[int]]:
    from engines.hf.generate_engine import create_hf_generate_engine
    from engines.types import GenerationRequest, SamplingParams

    engine = create_hf_generate_engine(
        EngineConfig(path, dtype="fp32", device=device, tensor_parallel_degree=degree)
    )
    params = SamplingParams(max_new_tokens=6, n=2)  # n > 1 exercises the cache-row copy across devices
    request = GenerationRequest("r", engine.tokenizer("Hello world")["input_ids"], params)
    events = engine.step([request], [])
    for _ in range(20):
        if sum(1 for e in events if e.finish_reason) == 2:
            break
        events += engine.step([], [])
    return engine, [e.token_id for e in events if e.index == 0]


def test_degree_on_cpu_loads_the_whole_model(gpt2, caplog):
    with caplog.at_level(logging.WARNING, logger="engines.hf"):
        engine, tokens = generate(gpt2, "cpu", 2)
    assert "does not split layers on CPU" in caplog.text
    assert getattr(engine.model, "hf_device_map", None) is None
    assert tokens


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_max_degree_spreads_over_the_gpus_and_generates(gpt2):
    engine, tokens = generate(gpt2, "cuda", 0)
    placed = {parameter.device for parameter in engine.model.parameters()}
    assert placed <= {torch.device("cuda", i) for i in range(torch.cuda.device_count())}  # no CPU offload
    assert engine.device == torch.device("cuda", 0)
    _, expected = generate(gpt2, "cuda", 1)
    assert tokens == expected  # greedy: the same tokens as the whole model moved to the GPU
