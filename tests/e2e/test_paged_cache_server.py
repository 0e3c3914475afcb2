"""The paged KV cache through the real server: preemption when the cache fills, and prefix caching.

A cache too small for the concurrent requests must preempt (and recompute) rather than fail, and a
preempted request's greedy output must equal the output it gets alone. A request sharing a long
prefix with an earlier one must find it in the prefix cache (OpenAI usage reports the cached tokens)
and get its first token in a fraction of the first one's time.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import pytest
import requests
from support import ServerProcess, tiny_model_script

from engines.rolling.factory import DEFAULT_BLOCK_SIZE

NEW_TOKENS, MAX_LEN, BLOCK = 100, 128, 16
PROMPTS = ["alpha beta", "one two three four", "the quick brown fox", "x y z"]


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory):
    path = tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)
    config = json.loads((path / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_block = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * BLOCK * head_dim * 4
    blocks = MAX_LEN // BLOCK + 2  # one full-length sequence and a little: 4 concurrent ones cannot fit
    env = {
        "OPTION_DTYPE": "fp32",
        "OPTION_MAX_ROLLING_BATCH_SIZE": "4",
        "OPTION_MAX_MODEL_LEN": str(MAX_LEN),
        "OPTION_BLOCK_SIZE": str(BLOCK),
        "OPTION_KV_CACHE_MEMORY_BYTES": str(blocks * per_block),
    }
    with ServerProcess(path, env) as srv:
        srv.wait_ready(timeout_s=180)
        yield srv


def _generate(srv: ServerProcess, prompt: str) -> list[int]:
    body = {
        "inputs": prompt,
        "parameters": {"max_new_tokens": NEW_TOKENS, "ignore_eos": True, "details": True},
    }
    resp = srv.post("/invocations", body, timeout=120)
    assert resp.status_code == 200, resp.text
    return [token["id"] for token in resp.json()["details"]["tokens"]]


def test_preempted_requests_finish_with_their_unpreempted_output(tight_server):
    alone = [_generate(tight_server, prompt) for prompt in PROMPTS]
    assert "preempted" not in tight_server.output()
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: _generate(tight_server, p), PROMPTS))
    assert "KV cache full: preempted" in tight_server.output()
    assert all(len(tokens) == NEW_TOKENS for tokens in together)
    assert together == alone


@pytest.fixture(scope="module")
def default_server():
    with ServerProcess(None, {"OPTION_MAX_ROLLING_BATCH_SIZE": "8"}) as srv:
        srv.wait_ready(timeout_s=300)
        yield srv


def _first_token(srv: ServerProcess, prompt: str) -> tuple[float, dict]:
    """(seconds to the first streamed token, the usage chunk) of a streamed OpenAI completion."""
    body = {"prompt": prompt, "max_tokens": 4, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    started, first, usage = time.perf_counter(), None, {}
    with requests.post(srv.url + "/v1/completions", json=body, stream=True, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"]:  # the first token's chunk, whatever its text
                first = time.perf_counter() - started
            usage = chunk.get("usage") or usage
    assert first is not None
    return first, usage


def test_shared_prefix_is_served_from_the_prefix_cache(default_server):
    prefix = " ".join(
        f"Record {i}: the {('red', 'green', 'blue')[i % 3]} box weighs {i * 7 % 50} kg." for i in range(88)
    )
    _first_token(default_server, "Warm up.")
    cold, cold_usage = _first_token(default_server, prefix + " Which box is heaviest?")
    warm, warm_usage = _first_token(default_server, prefix + " Which box is lightest?")
    assert cold_usage["prompt_tokens"] >= 1000
    assert "prompt_tokens_details" not in cold_usage  # nothing to reuse the first time
    shared = warm_usage["prompt_tokens_details"]["cached_tokens"]
    # every full block of the common prefix (the default server has the CPU's default block size)
    assert shared >= cold_usage["prompt_tokens"] - 2 * DEFAULT_BLOCK_SIZE["cpu"]
    print(f"TTFT cold {cold:.3f} s, warm {warm:.3f} s, {shared} cached tokens")
    assert warm <= 0.3 * cold, f"first token after {warm:.3f} s with the prefix cached, {cold:.3f} s without"
