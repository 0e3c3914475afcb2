"""The built-in Hugging Face handler end to end: default model, tiny T5, tiny BERT, examples."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
from support import ROOT, ServerProcess

EXAMPLES = ROOT / "properties_examples"


def _tiny_model_module():
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "scripts" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    module = _tiny_model_module()

    def build(kind: str, pooling: str | None = None):
        path = module.make_tiny_model(kind, tmp_path_factory.mktemp(kind), seed=0)
        if pooling:
            module.write_sentence_transformers_files(path, pooling=pooling)
        return path

    return build


@pytest.mark.parametrize("model_dir", [None, EXAMPLES / "default-model"], ids=["no-model-dir", "example"])
def test_default_model_answers_with_coherent_text(model_dir):
    with ServerProcess(model_dir) as srv:
        srv.wait_ready(timeout_s=240)
        body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 12}}
        resp = srv.post(json_body=body)
        assert resp.status_code == 200, resp.text
        assert "Paris" in resp.json()["generated_text"]
        bad = srv.post(json_body={"inputs": "x", "parameters": {"temperature": -1, "do_sample": True}})
        assert bad.status_code == 400
        assert "temperature" in bad.json()["error"]
        missing = srv.post(json_body={"prompt": "x"})
        assert missing.status_code == 400
        assert "inputs" in missing.json()["error"]


def test_dynamic_batching_example_serves_list_inputs_with_the_hf_handler():
    with ServerProcess(EXAMPLES / "dynamic-batching") as srv:
        srv.wait_ready(timeout_s=240)
        body = {"inputs": ["The capital of France is", "1, 2, 3,"], "parameters": {"max_new_tokens": 8}}
        listed = srv.post(json_body=body)
    assert listed.status_code == 200, listed.text
    assert [set(item) for item in listed.json()] == [{"generated_text"}, {"generated_text"}]
    assert "Paris" in listed.json()[0]["generated_text"]


def test_tiny_t5_serves_text2text(tiny):
    model = tiny("t5")
    with ServerProcess(model, {"SERVING_BATCH_SIZE": "4"}) as srv:
        srv.wait_ready()
        body = {
            "inputs": ["translate: the cat", "summarize: a dog runs"],
            "parameters": {"max_new_tokens": 5},
        }
        first = srv.post(json_body=body)
        again = srv.post(json_body=body)
    assert first.status_code == 200, first.text
    assert len(first.json()) == 2
    assert all(isinstance(item["generated_text"], str) for item in first.json())
    assert first.json() == again.json()  # greedy decoding is deterministic


def test_tiny_bert_serves_embeddings(tiny):
    model = tiny("bert", pooling="mean")
    with ServerProcess(model, {"OPTION_TASK": "feature-extraction"}) as srv:
        srv.wait_ready()
        resp = srv.post(json_body={"inputs": ["hello world", "a different sentence"]})
        single = srv.post(data=b"hello world", headers={"Content-Type": "text/plain"})
    assert resp.status_code == 200, resp.text
    vectors = resp.json()
    assert len(vectors) == 2
    assert len(vectors[0]) == len(vectors[1]) > 1
    assert vectors[0] != vectors[1]
    assert single.json()[0] == pytest.approx(vectors[0], abs=1e-5)


def test_pickle_weights_refused_with_a_clear_message(tiny, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = tiny("bert")
    target = tmp_path / "pickled"
    shutil.copytree(model, target)
    weights = target / "model.safetensors"
    torch.save(load_file(weights), target / "pytorch_model.bin")
    weights.unlink()
    with ServerProcess(target) as srv:
        failed = srv.wait_ready(expect=500, timeout_s=120)
        assert failed.json()[target.name]["status"] == "FAILED"
        resp = srv.post(json_body={"inputs": "x"})
    assert "allow_unsafe_weights" in resp.json()["message"]


def test_custom_handler_example():
    with ServerProcess(EXAMPLES / "custom-handler") as srv:
        srv.wait_ready()
        resp = srv.post(json_body={"inputs": "the quick brown fox"})
    assert resp.status_code == 200
    assert resp.json()["words"] == 4
    assert resp.json()["longest"] == "quick"
    assert resp.headers["X-Handler"] == "custom-example"
