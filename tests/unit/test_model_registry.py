"""The model registry: routing by name, per-model config, and memory accounted before a load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.config import load_config
from serving.errors import BadRequest, NotFound
from serving.memory import MIB, InsufficientMemory, MemoryLedger, estimate_need
from serving.registry import ModelConflict, ModelRegistry


def model_folder(root: Path, name: str, properties: str = "", weight_bytes: int = 0) -> str:
    folder = root / name
    folder.mkdir()
    (folder / "model.py").write_text("def handle(inputs):\n    return None\n")
    (folder / "serving.properties").write_text(properties)
    if weight_bytes:
        (folder / "weights.bin").write_bytes(b"\0" * weight_bytes)
    return str(folder)


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    config = load_config(None, {"SAGEMAKER_MULTI_MODEL": "true", "SERVING_MEMORY_BUDGET_MB": "100"})
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    return ModelRegistry(config, str(runtime), environ={})


# ---- loading ------------------------------------------------------------------------------------


def test_each_model_gets_its_own_config_from_its_folder(registry: ModelRegistry, tmp_path: Path):
    a = registry.prepare("a", model_folder(tmp_path, "fa", "batch_size=4\noption.predict_timeout=7\n"), {})
    b = registry.prepare("b", model_folder(tmp_path, "fb", "minWorkers=2\n"), {})
    assert (a.config.batch_size, a.config.predict_timeout_s, len(a.slots)) == (4, 7.0, 1)
    assert (b.config.batch_size, len(b.slots)) == (1, 2)
    assert a.queue.batch_size == 4
    spec = json.loads(Path(a.spec_path).read_text())
    assert spec["model_name"] == "a"
    assert spec["properties"]["model_name"] == "a"
    assert spec["model_dir"] == str(tmp_path / "fa")


def test_load_parameters_override_the_folder_properties(registry: ModelRegistry, tmp_path: Path):
    folder = model_folder(tmp_path, "f", "batch_size=4\n")
    group = registry.prepare("m", folder, {"batch_size": "8", "max_batch_delay": "5", "model_version": "1"})
    assert (group.config.batch_size, group.config.max_batch_delay_ms) == (8, 5)


def test_name_defaults_to_the_folder_name(registry: ModelRegistry, tmp_path: Path):
    assert registry.prepare(None, model_folder(tmp_path, "resnet"), {}).name == "resnet"


def test_a_loaded_name_is_a_409_naming_the_fix(registry: ModelRegistry, tmp_path: Path):
    registry.prepare("m", model_folder(tmp_path, "f"), {})
    with pytest.raises(ModelConflict, match=r"'m' is already loaded .* DELETE /models/m first"):
        registry.prepare("m", model_folder(tmp_path, "g"), {})


@pytest.mark.parametrize(
    ("name", "url", "params", "message"),
    [
        ("m", "/no/such/folder", {}, "is not a local folder. Fix: pass the folder"),
        ("m", "s3://bucket/model/", {}, "`lmi pull SOURCE`"),
        ("bad/name", None, {}, "Invalid model_name 'bad/name'"),
        ("m", None, {"min_workers": "2"}, "Unknown load parameter(s) ['min_workers']. Fix: use"),
        ("m", None, {"batch_size": "x"}, "Invalid value 'x' for batch_size (from the load request"),
    ],
)
def test_bad_load_requests_are_400_saying_what_to_fix(registry, tmp_path, name, url, params, message):
    with pytest.raises(BadRequest) as info:
        registry.prepare(name, url or model_folder(tmp_path, "f"), params)
    assert message in info.value.message
    assert registry.names() == []


# ---- memory -------------------------------------------------------------------------------------


def test_memory_is_estimated_at_1_2_times_the_files_per_worker(tmp_path: Path):
    folder = model_folder(tmp_path, "f", weight_bytes=10 * MIB)
    need = estimate_need(folder, None)
    assert need.per_worker_mb == 13  # ceil(1.2 × 10.0x MB)
    assert "1.2 × 10.0 MB of files" in need.how
    assert estimate_need(folder, 300).per_worker_mb == 300
    assert estimate_need(None, None).per_worker_mb == 0


def test_a_model_beyond_the_budget_is_a_507_naming_the_numbers(registry: ModelRegistry, tmp_path: Path):
    registry.prepare("small", model_folder(tmp_path, "s", "required_memory_mb=30\n"), {})
    with pytest.raises(InsufficientMemory) as info:
        registry.prepare("big", model_folder(tmp_path, "b", "required_memory_mb=40\nminWorkers=2\n"), {})
    message = info.value.message
    assert info.value.status_code == 507
    assert "it needs 80 MB (2 worker(s) × 40 MB, required_memory_mb=40)" in message
    assert "only 70 MB of memory_budget_mb=100 MB are free (30 MB reserved by 'small' 30 MB)" in message
    assert "DELETE /models/<name>" in message
    assert registry.names() == ["small"]
    assert registry.ledger.used_mb == 30


def test_unloading_frees_the_name_at_once_and_the_memory_on_release(registry: ModelRegistry, tmp_path: Path):
    big = registry.prepare("big", model_folder(tmp_path, "b", "required_memory_mb=80\n"), {})
    registry.remove(big)
    assert registry.names() == []
    with pytest.raises(InsufficientMemory, match=r"reserved by 'big \(unloading"):
        registry.prepare("big", model_folder(tmp_path, "c", "required_memory_mb=80\n"), {})
    registry.release(big)
    assert not Path(big.spec_path).parent.exists()
    assert registry.prepare("big", str(tmp_path / "c"), {}).memory_mb == 80
    assert registry.ledger.used_mb == 80


def test_the_startup_model_is_served_whatever_the_estimate(registry: ModelRegistry, tmp_path: Path):
    config = load_config(model_folder(tmp_path, "f", "required_memory_mb=500\n"), {})
    group = registry.add_startup(config, str(tmp_path / "worker.json"))
    assert group.at_startup
    assert registry.ledger.used_mb == 500  # accounted, so run-time loads see it


def test_ledger_checks_only_growth():
    ledger = MemoryLedger(budget_mb=100, reserved={"a": 90})
    ledger.reserve("a", 60, "shrink")
    with pytest.raises(InsufficientMemory):
        ledger.reserve("b", 41, "grow")
    ledger.reserve("b", 40, "fits")
    assert ledger.used_mb == 100


# ---- routing ------------------------------------------------------------------------------------


def test_requests_name_their_model_or_get_the_default(registry: ModelRegistry, tmp_path: Path):
    with pytest.raises(NotFound, match="No model is loaded"):
        registry.resolve(None)
    only = registry.prepare("a", model_folder(tmp_path, "fa"), {})
    assert registry.resolve(None) is only
    other = registry.prepare("b", model_folder(tmp_path, "fb"), {})
    assert registry.resolve("b") is other
    with pytest.raises(BadRequest, match=r"model_name is required: 2 models are loaded \(\['a', 'b'\]\)"):
        registry.resolve(None)
    with pytest.raises(NotFound, match=r"Model 'c' not found. Loaded models: \['a', 'b'\]"):
        registry.resolve("c")


def test_an_unnamed_request_goes_to_the_startup_model(registry: ModelRegistry, tmp_path: Path):
    startup = registry.add_startup(load_config(model_folder(tmp_path, "s"), {}), str(tmp_path / "w.json"))
    registry.prepare("extra", model_folder(tmp_path, "e"), {})
    assert registry.resolve(None) is startup


def test_pages_follow_the_name_order(registry: ModelRegistry, tmp_path: Path):
    for name in ("c", "a", "b"):
        registry.prepare(name, model_folder(tmp_path, f"f{name}"), {})
    first, token = registry.page(limit=2, token=0)
    assert [g.name for g in first] == ["a", "b"]
    rest, end = registry.page(limit=2, token=token)
    assert ([g.name for g in rest], end) == (["c"], None)
