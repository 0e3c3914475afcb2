"""Device, dtype and thread choices made in the model worker; engines reading typed EngineConfig fields."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from support import ROOT

from engines import device
from engines.base import EngineConfig, EngineLoadError
from engines.hf.loading import resolve_dtype

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse2 avx2 avx512f {extra}
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu vme sse2 avx2 avx512f {extra}
"""


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "scripts" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0))


# ---- CPU flags ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("", []),
        ("avx512_bf16", ["avx512_bf16"]),
        ("amx_bf16 amx_tile avx512_bf16", ["amx_bf16", "avx512_bf16"]),
    ],
)
def test_cpu_bf16_flags_from_cpuinfo_text(extra, expected):
    assert device.cpu_bf16_flags(CPUINFO.format(extra=extra)) == expected
    assert device.has_native_bf16("cpu", CPUINFO.format(extra=extra)) is bool(expected)


def test_cpu_flags_ignore_other_lines():
    assert "spectre_v1" not in device.cpu_flags(CPUINFO.format(extra=""))
    assert device.cpu_flags("no flags here") == set()


def test_unreadable_cpuinfo_means_no_native_bf16(monkeypatch, tmp_path):
    monkeypatch.setattr(device, "CPUINFO", tmp_path / "missing")
    assert device.cpu_bf16_flags() == []


# ---- option.device ------------------------------------------------------------------------------


@pytest.mark.parametrize(("available", "expected"), [(True, "cuda"), (False, "cpu")])
def test_auto_device_picks_cuda_when_available_and_logs_it(monkeypatch, caplog, available, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    with caplog.at_level(logging.INFO, logger="engines.device"):
        assert device.resolve_device("auto") == expected
    assert f"Device: {expected} (option.device=auto;" in caplog.text


def test_cpu_device_is_kept():
    assert device.resolve_device("CPU") == "cpu"


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_fails_the_load_clearly(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EngineLoadError) as info:
        device.resolve_device(name)
    assert f"option.device={name} but torch" in str(info.value)
    assert "sees no CUDA device" in str(info.value)
    assert "Fix: set option.device=cpu" in str(info.value)


def test_cuda_index_beyond_the_visible_devices_fails(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(EngineLoadError, match="option.device=cuda:1 but only 1 CUDA device"):
        device.resolve_device("cuda:1")


def test_bad_device_name_fails():
    with pytest.raises(EngineLoadError, match="'gpu' is not one of"):
        device.resolve_device("gpu")


# ---- option.dtype=auto --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "where", "native", "expected"),
    [
        (torch.float32, "cpu", True, torch.bfloat16),
        (torch.float16, "cpu", True, torch.bfloat16),
        (torch.float32, "cpu", False, torch.float32),
        (torch.float16, "cpu", False, torch.float32),
        (torch.bfloat16, "cpu", False, torch.bfloat16),
        (None, "cpu", False, torch.float32),
        (torch.float32, "cuda", True, torch.bfloat16),
        (torch.float32, "cuda:1", False, torch.float16),
    ],
)
def test_auto_dtype(stored, where, native, expected):
    assert resolve_dtype("auto", SimpleNamespace(dtype=stored), where, native) == expected


def test_auto_dtype_logs_the_choice_and_why(caplog):
    with caplog.at_level(logging.INFO, logger="engines.hf"):
        resolve_dtype("auto", SimpleNamespace(dtype=torch.float32), "cpu", native_bf16=True)
    assert "dtype: bfloat16 (option.dtype=auto; the CPU computes bf16 natively)" in caplog.text


def test_explicit_dtype_ignores_the_device():
    assert (
        resolve_dtype("fp32", SimpleNamespace(dtype=torch.float16), "cuda", native_bf16=True) == torch.float32
    )


# ---- option.num_threads -------------------------------------------------------------------------


def test_num_threads_sets_torch_threads_and_none_keeps_them(caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="engines.device"):
            assert device.configure_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert "Torch threads: 1 (option.num_threads)" in caplog.text
    finally:
        torch.set_num_threads(before)
    assert device.configure_threads(None) == before


def test_workers_share_the_cores_unless_threads_are_set(caplog, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="engines.device"):
            assert device.configure_threads(None, workers=before) == 1
        assert f"{before} physical cores shared by {before} model workers" in caplog.text
        torch.set_num_threads(before)
        assert device.configure_threads(None, workers=10 * before) == 1  # never below one thread
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", str(before))
        assert device.configure_threads(None, workers=before) == before  # the user's choice wins
    finally:
        torch.set_num_threads(before)


# ---- engines read typed EngineConfig fields -----------------------------------------------------


def test_rolling_engine_reads_typed_fields(tiny_llama):
    from engines.rolling.factory import create_rolling_engine

    config = EngineConfig(
        model_path=tiny_llama, dtype="fp32", max_model_len=64, max_rolling_batch_size=3, kernels="torch"
    )
    engine = create_rolling_engine(config)
    assert (engine.capacity, engine.max_model_len) == (3, 64)
    assert engine.model.layers[0].ops.name == "torch"
    assert engine.cache.num_blocks == 3 * 64 // engine.cache.block_size  # CPU: capacity full sequences
    budget = 5 * engine.cache.bytes_per_block() + 1
    smaller = create_rolling_engine(dataclasses.replace(config, kv_cache_memory_bytes=budget))
    assert smaller.cache.num_blocks == 5
    assert smaller.capacity == 3  # sequences share the blocks; preemption handles a full cache


def test_rolling_engine_auto_dtype_follows_the_cpu(tiny_llama, monkeypatch):
    from engines.rolling import factory

    monkeypatch.setattr(factory, "has_native_bf16", lambda _device: True)
    config = EngineConfig(model_path=tiny_llama, max_model_len=32, max_rolling_batch_size=1, kernels="torch")
    assert factory.create_rolling_engine(config).cache.keys[0].dtype == torch.bfloat16


def test_hf_load_resolves_device_and_dtype(tiny_llama, monkeypatch, caplog):
    from engines.hf import loading

    monkeypatch.setattr(loading, "has_native_bf16", lambda _device: False)
    with caplog.at_level(logging.INFO):
        loaded = loading.load(EngineConfig(model_path=tiny_llama))
    assert loaded.config.device == "cpu"
    assert loaded.dtype == torch.float32
    assert "Device: cpu (option.device=auto;" in caplog.text


def test_engine_config_fills_typed_fields_from_properties(tiny_llama):
    from handlers.builtin.huggingface import engine_config

    properties = {"model_id": tiny_llama, "max_model_len": "64", "tgi_compat": "true", "my_flag": "x"}
    config = engine_config({**properties, "trust_remote_code": "TRUE", "device": "cpu", "num_threads": "2"})
    assert config.model_path == tiny_llama
    assert (config.max_model_len, config.max_rolling_batch_size, config.kernels) == (64, 32, "auto")
    assert (config.trust_remote_code, config.device, config.num_threads) == (True, "cpu", 2)
    assert config.kv_cache_memory_bytes is None
    assert config.extra["my_flag"] == "x"


def test_engine_config_takes_the_worker_specs_typed_options(tiny_llama):
    from handlers.builtin.huggingface import engine_config
    from serving.config import load_config

    options = load_config(None, {"OPTION_MAX_ROLLING_BATCH_SIZE": "5"}).settings
    config = engine_config({"model_id": tiny_llama}, options)
    assert config.max_rolling_batch_size == 5


def _resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_freed_heap_pages_go_back_to_the_system():
    """Small tensors come from glibc's heap; freed under a live allocation, their pages stay resident
    until release_freed_memory (what a model load leaves behind, on a smaller scale)."""
    chunks = [torch.ones(16 * 1024) for _ in range(2048)]  # 64 KiB each: heap, not mmap; 128 MiB
    pinned = torch.ones(16 * 1024)  # above them: the heap's top cannot shrink by itself
    del chunks
    before = _resident_bytes()
    assert device.release_freed_memory() == 1
    assert before - _resident_bytes() > 64 * 2**20
    del pinned
