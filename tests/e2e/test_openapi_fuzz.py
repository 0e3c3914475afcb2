"""GET /openapi.json against the live server: each dialect's real answers (successes, streams and
errors) match the documented schemas, and schemathesis finds no server error in any operation.

The fuzzed server: a seeded tiny Llama with max_model_len 64 (so every documented max_new_tokens
is short), an API key (so 401s are exercised), and a 64 KiB request limit (so 413 is cheap to reach).
No 5xx is tolerated while fuzzing: 503 (queue full, shutting down) and 504 cannot happen to one
client with a free queue, and a 500 or an OpenAI-dialect generation failure is a bug. A second,
multi-model server checks the /models answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import requests
from openapi_checks import check_answer
from support import ServerProcess, tiny_model_script

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 64
FUZZ_BUDGET_S = 150
CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("fuzz") / "tiny", seed=0)
    env = {
        "OPTION_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "OPTION_DTYPE": "fp32",
        "SERVING_API_KEY": KEY,
        "SERVING_MAX_REQUEST_SIZE": "65536",
    }
    with ServerProcess(path, env) as srv:
        srv.wait_ready(timeout_s=180)
        yield srv


@pytest.fixture(scope="module")
def document(server: ServerProcess) -> dict:
    response = requests.get(server.url + "/openapi.json", timeout=10)  # open, like /ping
    assert response.status_code == 200
    return response.json()


LMI = {"inputs": "hello world", "parameters": {"max_new_tokens": 4}}
CASES = [
    # (method, path, documented path, body, status); every request but the 401s carries the key
    (
        "POST",
        "/invocations",
        "/invocations",
        {
            "inputs": "hi",
            "parameters": {
                "max_new_tokens": 4,
                "details": True,
                "top_n_tokens": 2,
                "decoder_input_details": True,
            },
        },
        200,
    ),
    (
        "POST",
        "/predictions/tiny",
        "/predictions/{model}",
        {"inputs": ["a", "b"], "parameters": {"max_new_tokens": 3}},
        200,
    ),
    ("POST", "/predictions/tiny/v1", "/predictions/{model}/{version}", {**LMI, "stream": True}, 200),
    (
        "POST",
        "/invocations",
        "/invocations",
        {
            "inputs": "hi",
            "parameters": {"max_new_tokens": 3, "n": 2, "best_of": 3, "do_sample": True, "seed": 1},
        },
        200,
    ),
    ("POST", "/models/tiny/invoke", "/models/{model}/invoke", {"messages": CHAT, "max_tokens": 3}, 200),
    ("POST", "/invocations", "/invocations", {"messages": CHAT, "max_tokens": 3, "stream": True}, 200),
    ("POST", "/invocations", "/invocations", {"inputs": "hi", "parameters": {"max_new_token": 4}}, 400),
    (
        "POST",
        "/invocations",
        "/invocations",
        {"inputs": "hi", "parameters": {"do_sample": True, "temperature": 1e-40}},
        400,
    ),
    ("POST", "/predictions/other", "/predictions/{model}", LMI, 404),
    ("POST", "/invocations", "/invocations", {"inputs": "x" * 70000}, 413),
    (
        "POST",
        "/v1/completions",
        "/v1/completions",
        {"prompt": "hello", "max_tokens": 4, "logprobs": 2, "n": 2},
        200,
    ),
    (
        "POST",
        "/v1/completions",
        "/v1/completions",
        {"prompt": "hello", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}},
        200,
    ),
    ("POST", "/v1/completions", "/v1/completions", {"prompt": "hello", "max_tokens": MAX_MODEL_LEN + 1}, 400),
    (
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        {"messages": CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 2},
        200,
    ),
    (
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        {"messages": CHAT, "max_tokens": 3, "stream": True},
        200,
    ),
    ("POST", "/v1/chat/completions", "/v1/chat/completions", {**LMI, "stream": True}, 200),
    ("POST", "/v1/chat/completions", "/v1/chat/completions", {"messages": [], "max_tokens": 3}, 400),
    ("GET", "/v1/models", "/v1/models", None, 200),
    (
        "POST",
        "/generate",
        "/generate",
        {
            "inputs": "hi",
            "parameters": {
                "max_new_tokens": 3,
                "details": True,
                "best_of": 2,
                "do_sample": True,
                "top_n_tokens": 1,
                "decoder_input_details": True,
            },
        },
        200,
    ),
    (
        "POST",
        "/generate_stream",
        "/generate_stream",
        {"inputs": "hi", "parameters": {"max_new_tokens": 3, "details": True}},
        200,
    ),
    ("POST", "/generate", "/generate", {"inputs": "hi", "parameters": {"top_p": 2}}, 422),
    ("POST", "/generate_stream", "/generate_stream", {"inputs": ""}, 422),
    ("POST", "/", "/", LMI, 200),
    ("POST", "/", "/", {**LMI, "stream": True}, 200),
    ("GET", "/generate", "/generate", None, 405),
    ("GET", "/ping", "/ping", None, 200),
    ("GET", "/metrics", "/metrics", None, 200),
]
UNAUTHORISED = [
    ("POST", "/invocations", LMI),
    ("POST", "/v1/chat/completions", {"messages": CHAT}),
    ("POST", "/generate", LMI),
    ("GET", "/v1/models", None),
]


def test_live_answers_match_the_documented_schemas(server: ServerProcess, document: dict):
    checked = 0
    for method, path, documented, body, status in CASES:
        response = requests.request(method, server.url + path, json=body, headers=AUTH, timeout=60)
        assert response.status_code == status, (path, body, response.text[:500])
        documented_method = "POST" if status == 405 else method  # 405: documented on the route's method
        content_type = response.headers["Content-Type"]
        checked += check_answer(document, documented, documented_method, status, content_type, response.text)
    for method, path, body in UNAUTHORISED:
        response = requests.request(method, server.url + path, json=body, timeout=30)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        checked += check_answer(document, path, method, 401, response.headers["Content-Type"], response.text)
    assert checked > len(CASES) + len(UNAUTHORISED)  # streams count one per event


def test_schemathesis_finds_no_server_error(server: ServerProcess, document: dict, tmp_path):
    """Every operation, up to 30 generated requests each (schemathesis' fuzzing phase)."""
    report = tmp_path / "report.json"
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        server.url + "/openapi.json",
        "--checks",
        "not_a_server_error",
        "--phases",
        "fuzzing",
        "--max-examples",
        "30",
        "--workers",
        "2",
        "--seed",
        "1",
        "--request-timeout",
        "30",
        "--header",
        f"Authorization: Bearer {KEY}",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        "--no-color",
    ]
    started = time.monotonic()
    done = subprocess.run(  # in tmp_path: schemathesis keeps its caches in the working directory
        command, cwd=tmp_path, capture_output=True, text=True, timeout=FUZZ_BUDGET_S, check=False
    )
    took = time.monotonic() - started
    summary = json.loads(report.read_text())
    cases = summary["test_cases"]
    print(f"schemathesis: {cases['generated']} requests, {len(summary['failures'])} failures in {took:.0f} s")
    assert summary["failures"] == [], done.stdout[-6000:]
    assert summary["errors"] == [], done.stdout[-6000:]
    assert done.returncode == 0, done.stdout[-6000:]
    operations = sum(len(set(item) & {"get", "post", "put", "delete"}) for item in document["paths"].values())
    assert summary["operations"]["tested"] == operations - 1 == 12  # all but /openapi.json itself
    assert cases["generated"] >= 100


def test_management_answers_match_the_documented_schemas(tmp_path):
    """SageMaker's multi-model API on the inference port: the /models answers as documented."""
    path = tiny_model_script().make_tiny_model("llama", tmp_path / "tiny", seed=0)
    env = {
        "SAGEMAKER_MULTI_MODEL": "true",
        "OPTION_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "OPTION_DTYPE": "fp32",
    }
    with ServerProcess(path, env) as srv:
        srv.wait_ready(timeout_s=180)
        document = requests.get(srv.url + "/openapi.json", timeout=10).json()
        assert "enum" not in document["paths"]["/predictions/{model}"]["post"]["parameters"][0]["schema"]
        cases = [
            ("GET", "/models?limit=1", "/models", None, 200),
            ("GET", "/models?limit=0", "/models", None, 400),
            ("GET", "/models/tiny", "/models/{name}", None, 200),
            ("GET", "/models/nope", "/models/{name}", None, 404),
            ("PUT", "/models/tiny?min_worker=1", "/models/{name}", None, 200),
            ("PUT", "/models/tiny", "/models/{name}", None, 400),
            ("DELETE", "/models/nope", "/models/{name}", None, 404),
            ("POST", "/models", "/models", {"model_name": "m2"}, 400),
            ("POST", "/predictions/tiny", "/predictions/{model}", LMI, 200),
            ("POST", "/predictions/nope", "/predictions/{model}", LMI, 404),
        ]
        for method, url, documented, body, status in cases:
            response = requests.request(method, srv.url + url, json=body, timeout=60)
            assert response.status_code == status, (url, response.text[:500])
            content_type = response.headers["Content-Type"]
            check_answer(document, documented, method, status, content_type, response.text)
