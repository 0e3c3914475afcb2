"""Custom formatters inside the built-in handlers, driven directly (no server): the generation handler on a
tiny Llama and the task handler on a tiny BERT, each with a model.py that only defines formatters."""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path

import pytest
from support import tiny_model_script

from handlers.builtin.generation import GenerationHandler
from handlers.builtin.huggingface import HuggingFaceHandler, create_handler
from handlers.djl_api import Input
from serving.messages import InferRequest

GENERATION_FORMATTERS = """
    from djl_python.input_parser import input_formatter
    from djl_python.output_formatter import output_formatter

    @input_formatter
    def from_prompt(decoded_payload, tokenizer=None, **kwargs):
        if tokenizer is None:
            raise ValueError("the model's tokenizer was not passed")
        body = {"inputs": decoded_payload["prompt"], "parameters": {"max_new_tokens": 3}}
        return {**body, "stream": decoded_payload.get("stream", False)}

    @output_formatter
    def tag(response_data):
        if "generated_text" not in response_data:
            return None  # stream lines without the final text are dropped
        return {"text": response_data["generated_text"], "source": "custom"}
"""

EMBEDDING_FORMATTERS = """
    from djl_python.input_parser import input_formatter
    from djl_python.output_formatter import output_formatter

    @input_formatter
    def from_texts(decoded_payload, **kwargs):
        return {"inputs": decoded_payload["texts"]}

    @output_formatter
    def wrap(vectors):
        return {"embeddings": vectors, "dimensions": len(vectors[0])}
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    script = tiny_model_script()
    llama = script.make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)
    bert = script.make_tiny_model("bert", tmp_path_factory.mktemp("bert"), seed=0)
    script.write_sentence_transformers_files(bert, pooling="mean")
    (llama / "model.py").write_text(textwrap.dedent(GENERATION_FORMATTERS))
    (bert / "model.py").write_text(textwrap.dedent(EMBEDDING_FORMATTERS))
    return {"llama": llama, "bert": bert}


@pytest.fixture(scope="module")
def generation(folders) -> GenerationHandler:
    handler = create_handler({"model_dir": str(folders["llama"])})
    assert isinstance(handler, GenerationHandler)
    return handler


def run(handler: GenerationHandler, body: dict) -> tuple[int, str, bytes]:
    headers = {"Content-Type": "application/json"}
    request = InferRequest(uuid.uuid4().hex, headers, [("data", json.dumps(body).encode())])
    reply = handler.run_to_completion([request])[0]
    return reply.code, reply.headers.get("Content-Type", ""), reply.body


def test_generation_request_and_response_go_through_the_formatters(generation):
    code, content_type, body = run(generation, {"prompt": "The capital of France is"})
    assert (code, content_type) == (200, "application/json")
    answer = json.loads(body)
    assert set(answer) == {"text", "source"}
    assert answer["source"] == "custom"
    assert answer["text"]


def test_generation_stream_lines_go_through_the_formatter(generation):
    code, content_type, body = run(generation, {"prompt": "The capital of France is", "stream": True})
    assert (code, content_type) == (200, "application/jsonlines")
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert len(lines) == 1  # the per-token lines were dropped by the formatter
    assert lines[0]["source"] == "custom"


def test_generation_formatter_failure_is_a_424_that_names_it(generation):
    code, _, body = run(generation, {"inputs": "no prompt field"})
    assert code == 424
    assert "from_prompt failed: KeyError" in json.loads(body)["message"]


def test_task_handler_uses_the_formatters(folders):
    handler = create_handler({"model_dir": str(folders["bert"]), "task": "feature-extraction"})
    assert isinstance(handler, HuggingFaceHandler)
    item = Input()
    item.properties["Content-Type"] = "application/json"
    item.content.add("data", json.dumps({"texts": ["hello world", "another one"]}).encode())
    bad = Input()
    bad.content.add("data", b'{"inputs": "x"}')
    good, failed = handler.handle_batch([item, bad])
    answer = json.loads(good.content.get("data"))
    assert len(answer["embeddings"]) == 2
    assert answer["dimensions"] == len(answer["embeddings"][0]) > 1
    assert failed.code == 424
    assert "from_texts failed" in json.loads(failed.content.get("data"))["error"]
