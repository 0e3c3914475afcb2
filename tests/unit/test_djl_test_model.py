"""djl_python.test_model: DJL's request builders, output readers, TestHandler and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from support import ROOT

from djl_python import Output, test_model
from djl_python.test_model import TestHandler

ECHO_MODEL = """
    from djl_python import Input, Output

    def handle(inputs: Input):
        if inputs.is_empty():
            return None
        out = Output()
        for i, item in enumerate(inputs.get_batches()):
            seen = {"body": item.get_as_string(), "properties": dict(item.get_properties())}
            out.add_as_json(seen, batch_index=i if inputs.is_batch() else None)
        return out.add_property("X-Echo", "yes")
"""


def write_model(folder: Path, source: str, properties: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(textwrap.dedent(source), encoding="utf-8")
    if properties:
        (folder / "serving.properties").write_text(textwrap.dedent(properties), encoding="utf-8")
    return folder


# ---- request builders and output readers ---------------------------------------------------------


def test_text_request():
    inputs = test_model.create_text_request("Hello World")
    assert inputs.get_as_string() == "Hello World"
    assert inputs.get_property("Content-Type") == "text/plain"
    with pytest.raises(KeyError):
        inputs.get_as_string("not-exist-key")
    assert test_model.create_text_request("x", key="prompt").get_as_string("prompt") == "x"


def test_json_request():
    inputs = test_model.create_json_request({"Hello": "World"})
    assert inputs.get_as_json() == {"Hello": "World"}
    assert inputs.get_data() == {"Hello": "World"}


def test_numpy_and_npz_requests_round_trip():
    nd = [np.ones((1, 3, 2)), np.arange(4, dtype=np.int32)]
    for request, read in (
        (test_model.create_numpy_request(nd), "get_as_numpy"),
        (test_model.create_npz_request(nd), "get_as_npz"),
    ):
        result = getattr(request, read)()
        assert [r.tolist() for r in result] == [a.tolist() for a in nd]
        assert result[1].dtype == np.int32


def test_concurrent_batch_request_uses_djl_batch_layout():
    bodies = [{"inputs": "who won?", "parameters": {"max_new_tokens": 8}}, {"inputs": "second"}]
    properties = [{"eula": "true", "Content-type": "application/json"}, {"eula": "false"}]
    serving = {"engine": "MPI", "option.model_id": "llama"}
    batch = test_model.create_concurrent_batch_request(bodies, properties, serving)
    assert batch.properties["batch_size"] == "2"
    assert batch.content.get_keys() == ["batch_000_data", "batch_001_data"]
    first, second = batch.get_batches()
    assert first.get_as_json() == bodies[0]
    assert second.get_as_json() == bodies[1]
    assert first.get_property("eula") == "true"
    assert second.get_property("eula") == "false"
    for key, value in serving.items():
        assert batch.get_properties()[key] == value
    assert serving == {"engine": "MPI", "option.model_id": "llama"}  # the caller's dict is not changed


def test_extract_output_readers():
    nd = [np.ones((1, 3, 2))]
    outputs = Output().add_as_json({"Key": "Value"}, "dict").add_as_numpy(nd, "ndlist").add_as_npz(nd, "npz")
    assert json.loads(test_model.extract_output_as_string(outputs, "dict")) == {"Key": "Value"}
    assert json.loads(test_model.extract_output_as_bytes(outputs, "dict")) == {"Key": "Value"}
    assert np.array_equal(test_model.extract_output_as_numpy(outputs, "ndlist")[0], nd[0])
    assert np.array_equal(test_model.extract_output_as_npz(outputs, "npz")[0], nd[0])


def test_decode_encoded_output_binary_reads_rolling_batch_payloads():
    payload = Output.binary_encode({"data": "tok", "last": True, "code": None})
    assert test_model.decode_encoded_output_binary(payload) == {"data": "tok", "last": "true", "code": None}


def test_create_request_from_files_keys_and_literals(tmp_path):
    request_file = tmp_path / "req.json"
    request_file.write_text('{"inputs": "a=b"}')
    extra = tmp_path / "extra.bin"
    extra.write_bytes(b"\x00\x01")
    request = test_model.create_request([str(request_file), f"blob={extra}"], ["max_new_tokens=5"])
    assert request.get_property("content-type") == "application/json"
    assert request.get_as_json() == {"inputs": "a=b"}
    assert request.get_as_bytes("blob") == b"\x00\x01"
    assert request.get_property("max_new_tokens") == "5"
    literal = test_model.create_request(['{"inputs": "x=1"}'])
    assert literal.get_as_json() == {"inputs": "x=1"}
    assert literal.get_property("content-type") == "application/json"
    with pytest.raises(ValueError, match="key=value"):
        test_model.create_request(["x"], ["no-equals"])


# ---- properties ----------------------------------------------------------------------------------


def test_load_properties_strips_option_prefix_and_comments(tmp_path):
    (tmp_path / "serving.properties").write_text("# comment\nengine=Python\n\noption.model_id = m \n")
    assert test_model.load_properties(str(tmp_path)) == {"engine": "Python", "model_id": "m"}
    assert test_model.load_properties(None) == {}
    assert test_model.load_properties(str(tmp_path / "none")) == {}


def test_env_options_are_defaults(monkeypatch):
    monkeypatch.setenv("OPTION_ROLLING_BATCH", "auto")
    monkeypatch.setenv("OPTION_ENTRYPOINT", "model.py")
    monkeypatch.setenv("HF_MODEL_ID", "org/model")
    result = test_model.update_properties_with_env_vars({"rolling_batch": "disable"})
    assert result["rolling_batch"] == "disable"
    assert result["entryPoint"] == "model.py"
    assert result["model_id"] == "org/model"


# ---- TestHandler ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("isolated_imports")
def test_handler_runs_model_py_with_folder_properties(tmp_path):
    folder = write_model(tmp_path / "m", ECHO_MODEL, "engine=Python\noption.greeting=hi\n")
    handler = TestHandler("model.py", str(folder))
    outputs = handler.inference(test_model.create_text_request("hello"))
    assert outputs.get_property("X-Echo") == "yes"
    seen = json.loads(test_model.extract_output_as_string(outputs))
    assert seen["body"] == "hello"
    assert seen["properties"]["greeting"] == "hi"
    assert seen["properties"]["model_dir"] == str(folder)


@pytest.mark.usefixtures("isolated_imports")
def test_handler_inference_batch_answers_each_request(tmp_path):
    handler = TestHandler(None, str(write_model(tmp_path / "m", ECHO_MODEL)))
    outputs = handler.inference_batch([{"n": 1}, {"n": 2}], [{"k": "a"}, {"k": "b"}])
    assert outputs.content.get_keys() == ["batch_0.data", "batch_1.data"]
    second = json.loads(outputs.content.get("batch_1.data"))
    assert json.loads(second["body"]) == {"n": 2}
    assert second["properties"]["k"] == "b"


@pytest.mark.usefixtures("isolated_imports")
def test_handler_runs_sagemaker_style_modules(tmp_path):
    source = """
        def model_fn(model_dir):
            return lambda data: {"length": len(data["inputs"])}
    """
    handler = TestHandler("model.py", str(write_model(tmp_path / "sm", source)))
    outputs = handler.inference(test_model.create_json_request({"inputs": "four"}))
    assert json.loads(test_model.extract_output_as_string(outputs)) == {"length": 4}


@pytest.mark.usefixtures("isolated_imports")
def test_handler_without_a_handler_function_says_what_is_missing(tmp_path):
    handler = TestHandler("model.py", str(write_model(tmp_path / "none", "X = 1\n")))
    with pytest.raises(AttributeError, match="no handler function handle"):
        handler.inference(test_model.create_text_request("x"))


def test_cli_runs_a_model_folder_without_a_server(tmp_path):
    folder = write_model(tmp_path / "cli", ECHO_MODEL, "option.greeting=hi\n")
    request_file = tmp_path / "request.txt"
    request_file.write_text("from the CLI")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "djl_python.test_model",
        "--model-dir",
        str(folder),
        "--input",
        str(request_file),
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["200 OK", "X-Echo: yes"]
    seen = json.loads("\n".join(lines[3:]))
    assert seen["body"] == "from the CLI"
    assert seen["properties"]["greeting"] == "hi"
    assert seen["properties"]["content-type"] == "text/plain"


def test_cli_exit_status_reports_a_failed_handler(tmp_path):
    source = """
        from djl_python import Output

        def handle(inputs):
            return Output().error("bad input", code=400)
    """
    folder = write_model(tmp_path / "fail", source)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "djl_python.test_model", "--model-dir", str(folder), "--input", "literal"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stdout.startswith("400 ")
    assert "bad input" in done.stdout
