"""Every API dialect without the native engine's continuous batching, through the real server.

A tiny Llama served with ``rolling_batch=disable``, a tiny GPT-2 with ``rolling_batch=disable`` and
``batch_size=4`` (DJL's dynamic batching), and a tiny T5 (text2text) all go through the Hugging Face
generate engine behind the same request layer as the native engine: the openai and text_generation
clients parse every answer, streams included, and the sampling parameters OpenAI clients send (n,
top_logprobs, penalties) work.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from support import ROOT, ServerProcess

openai = pytest.importorskip("openai")
text_generation = pytest.importorskip("text_generation")

CHAT = [{"role": "user", "content": "hello there"}]


def _tiny(kind: str, dest):
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "scripts" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny_model(kind, dest, seed=0)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = _tiny("gpt2", tmp_path_factory.mktemp("gpt2"))
    env = {"OPTION_ROLLING_BATCH": "disable", "SERVING_BATCH_SIZE": "4", "OPTION_DTYPE": "fp32"}
    with ServerProcess(path, env) as srv:
        srv.wait_ready(timeout_s=180)
        yield srv


@pytest.fixture(scope="module")
def llama_disabled(tmp_path_factory):
    path = _tiny("llama", tmp_path_factory.mktemp("llama"))
    with ServerProcess(path, {"OPTION_ROLLING_BATCH": "disable", "OPTION_DTYPE": "fp32"}) as srv:
        srv.wait_ready(timeout_s=180)
        yield srv


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    path = _tiny("t5", tmp_path_factory.mktemp("t5"))
    with ServerProcess(path, {"OPTION_DTYPE": "fp32"}) as srv:
        srv.wait_ready(timeout_s=180)
        yield srv


def client(srv: ServerProcess):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("server", ["llama_disabled", "gpt2", "t5"])
def test_openai_completions_and_chat_stream_and_not(server, request):
    srv = request.getfixturevalue(server)
    api = client(srv)
    greedy = {"temperature": 0, "extra_body": {"ignore_eos": True}}  # OpenAI's default temperature is 1
    done = api.completions.create(model="m", prompt="hello", max_tokens=5, **greedy)
    assert done.usage.completion_tokens == 5
    assert isinstance(done.choices[0].text, str)
    chunks = list(api.completions.create(model="m", prompt="hello", max_tokens=5, stream=True, **greedy))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text  # greedy
    assert chunks[-1].choices[0].finish_reason == "length"
    if server != "t5":  # T5 has no chat template
        chat = api.chat.completions.create(model="m", messages=CHAT, max_tokens=4)
        assert chat.choices[0].message.role == "assistant"


def test_openai_n_top_logprobs_and_penalties(gpt2):
    api = client(gpt2)
    two = api.completions.create(
        model="m", prompt="hello", max_tokens=6, n=2, temperature=1.0, seed=3, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in two.choices) == [0, 1]
    assert two.usage.completion_tokens == 12
    chat = api.chat.completions.create(
        model="m", messages=CHAT, max_tokens=3, logprobs=True, top_logprobs=3, temperature=0
    )
    content = chat.choices[0].logprobs.content
    assert content
    assert all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob for t in content)
    greedy = {"model": "m", "prompt": "hello", "max_tokens": 16, "temperature": 0, "logprobs": 0}
    plain = api.completions.create(**greedy, extra_body={"ignore_eos": True})
    penalised = api.completions.create(
        **greedy, presence_penalty=2.0, frequency_penalty=2.0, extra_body={"ignore_eos": True}
    )
    plain_tokens, penalised_tokens = plain.choices[0].logprobs.tokens, penalised.choices[0].logprobs.tokens
    assert len(plain_tokens) == len(penalised_tokens) == 16
    assert len(set(plain_tokens)) < 16  # the tiny model repeats itself when greedy ...
    assert len(set(penalised_tokens)) > len(set(plain_tokens))  # ... and the penalties push it apart


@pytest.mark.parametrize("server", ["llama_disabled", "gpt2", "t5"])
def test_tgi_client_generate_and_stream(server, request):
    srv = request.getfixturevalue(server)
    tgi = text_generation.Client(srv.url, timeout=60)
    answer = tgi.generate("hello", max_new_tokens=4)  # the client always asks for details
    assert answer.details.generated_tokens <= 4
    streamed = list(tgi.generate_stream("hello", max_new_tokens=4))
    assert "".join(r.token.text for r in streamed if not r.token.special) == answer.generated_text
    assert streamed[-1].generated_text == answer.generated_text
    if server != "t5":  # decoder_input_details: the prompt tokens scored (an encoder input is not)
        prefill = tgi.generate("a b c", max_new_tokens=1, decoder_input_details=True).details.prefill
        assert len(prefill) >= 3
        assert prefill[0].logprob is None
        assert all(t.logprob is not None and t.logprob <= 0 for t in prefill[1:])


@pytest.mark.parametrize("server", ["llama_disabled", "gpt2", "t5"])
def test_lmi_bodies_single_list_and_stream(server, request):
    srv = request.getfixturevalue(server)
    log = Path(srv.log.name).read_text(errors="replace")
    assert "Text generation on the 'hf-generate' engine" in log  # not the native engine
    one = srv.post(json_body={"inputs": "hello", "parameters": {"max_new_tokens": 4}})
    assert one.status_code == 200, one.text
    listed = srv.post(json_body={"inputs": ["hello", "a b c"], "parameters": {"max_new_tokens": 4}})
    assert listed.status_code == 200, listed.text
    assert listed.json()[0] == one.json()  # the same prompt gives the same greedy text inside a list
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 4}, "stream": True}
    with srv.post(json_body=body, stream=True) as resp:
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert lines[-1]["generated_text"] == one.json()["generated_text"]


def test_errors_have_each_dialects_shape(gpt2):
    bad_openai = gpt2.post("/v1/completions", json_body={"prompt": "x", "max_tokens": 0})
    assert bad_openai.status_code == 400
    assert set(bad_openai.json()["error"]) == {"message", "type", "param", "code"}
    assert "max_tokens" in bad_openai.json()["error"]["message"]
    bad_tgi = gpt2.post("/generate", json_body={"inputs": "x", "parameters": {"max_new_tokens": 0}})
    assert bad_tgi.status_code == 422
    assert bad_tgi.json()["error_type"] == "validation"
    bad_lmi = gpt2.post(json_body={"inputs": "x", "parameters": {"max_new_tokens": 0}})
    assert bad_lmi.status_code == 400
    assert set(bad_lmi.json()) == {"code", "type", "message", "error"}
    too_long = gpt2.post("/v1/completions", json_body={"prompt": "a " * 100, "max_tokens": 100})
    assert too_long.status_code == 400
    assert "max_model_len" in too_long.json()["error"]["message"]
