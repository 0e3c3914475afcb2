"""GenerationHandler's terminal paths over a scripted engine: every request ends with exactly one
answer, and no bookkeeping (jobs, owners, scheduler, engine sequences) is left behind."""

from __future__ import annotations

import json

import pytest

from engines.base import EngineStats, GenerationEngine
from engines.types import GenerationRequest, TokenEvent
from handlers.builtin.generation import GenerationHandler, GenerationSettings
from handlers.replies import Reply, StreamChunk, StreamEnd, StreamStart
from serving import messages as msg
from serving.dialects import Api


class CharTokenizer:
    """One token per character; enough for the handler (encode, length, no chat template)."""

    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) % 250 + 1 for c in text]}

    def __len__(self) -> int:
        return 256


class ScriptedEngine:
    """Emits one token "x" per running completion per step; ``fail_step`` raises inside ``step``;
    ``forget`` makes abort_all lose those requests (a buggy engine); ``error_index`` ends that
    completion of every request with an error event."""

    def __init__(self, capacity: int = 4, tokens: int = 3) -> None:
        self.capacity, self.max_model_len, self.tokenizer = capacity, 64, CharTokenizer()
        self.tokens = tokens
        self.running: dict[tuple[str, int], int] = {}
        self.fail_step = False
        self.forget = False
        self.error_index: int | None = None

    def free_capacity(self) -> int:
        return self.capacity - len(self.running)

    def check_length(self, prompt_len: int, max_new_tokens: int) -> str | None:
        return None if prompt_len + max_new_tokens <= self.max_model_len else "too long"

    def step(self, admit: list[GenerationRequest], cancel: list[str]) -> list[TokenEvent]:
        events = []
        for key in [k for k in self.running if k[0] in cancel]:
            del self.running[key]
            events.append(TokenEvent(key[0], -1, "", 0.0, "cancelled", index=key[1]))
        for request in admit:
            for index in range(request.params.num_sequences):
                self.running[(request.request_id, index)] = 0
        if self.fail_step:
            raise RuntimeError("device lost")
        for key in list(self.running):
            if key[1] == self.error_index:
                del self.running[key]
                events.append(TokenEvent(key[0], -1, "", 0.0, "error", "row failed", index=key[1]))
                continue
            self.running[key] += 1
            done = self.running[key] >= self.tokens
            events.append(TokenEvent(key[0], 120, "x", -0.5, "length" if done else None, index=key[1]))
            if done:
                del self.running[key]
        return events

    def abort_all(self, reason: str) -> list[TokenEvent]:
        keys = [] if self.forget else list(self.running)
        self.running.clear()
        return [TokenEvent(rid, -1, "", 0.0, "error", reason, index=i) for rid, i in keys]

    steps = 0

    def stats(self) -> EngineStats:
        return EngineStats(len(self.running), self.capacity, steps=self.steps)


def make(engine: ScriptedEngine | None = None, **settings) -> tuple[GenerationHandler, ScriptedEngine]:
    engine = engine or ScriptedEngine()
    assert isinstance(engine, GenerationEngine)
    return GenerationHandler(engine, GenerationSettings(**settings)), engine


def request(rid: str, body: dict, api: Api = Api.LMI, deadline: float | None = None) -> msg.InferRequest:
    return msg.InferRequest(rid, {}, [("data", json.dumps(body).encode())], api, deadline)


def drain(handler: GenerationHandler, limit: int = 50) -> list:
    replies = []
    for _ in range(limit):
        if not handler.has_work():
            return replies
        replies += handler.step()
    raise AssertionError("the handler never ran out of work")


def assert_clean(handler: GenerationHandler, engine: ScriptedEngine) -> None:
    assert handler.jobs == {}
    assert handler.owner == {}
    assert not handler.scheduler.has_work()
    assert engine.running == {}


LMI = {"inputs": "hi", "parameters": {"max_new_tokens": 3}}


def test_a_list_answers_one_json_list_in_prompt_order():
    handler, engine = make()
    assert handler.submit(request("r", {**LMI, "inputs": ["a", "b", "c"]})) == []
    (reply,) = drain(handler)
    assert isinstance(reply, Reply)
    assert reply.code == 200
    assert json.loads(reply.body) == [{"generated_text": "xxx"}] * 3
    assert_clean(handler, engine)


@pytest.mark.parametrize("formatter", ["jsonlines", "sse"])
def test_a_list_with_a_streaming_formatter_is_a_400_not_a_crash(formatter):
    handler, engine = make(output_formatter=formatter)
    (reply,) = handler.submit(request("r", {**LMI, "inputs": ["a", "b"]}))
    assert reply.code == 400
    assert "one JSON list" in json.loads(reply.body)["message"]
    assert_clean(handler, engine)


def test_a_streaming_formatter_streams_a_single_prompt_without_the_stream_flag():
    handler, engine = make(output_formatter="jsonlines")
    handler.submit(request("r", LMI))
    replies = drain(handler)
    assert isinstance(replies[0], StreamStart)
    assert isinstance(replies[-1], StreamEnd)
    lines = b"".join(r.data for r in replies if isinstance(r, StreamChunk)).splitlines()
    assert json.loads(lines[-1])["generated_text"] == "xxx"
    assert_clean(handler, engine)


def test_cancelling_a_list_frees_every_prompt():
    handler, engine = make()
    handler.submit(request("r", {**LMI, "inputs": ["a", "b"], "parameters": {"max_new_tokens": 20}}))
    engine.tokens = 20
    handler.step()
    assert len(engine.running) == 2
    handler.cancel("r")
    assert drain(handler) == []  # the client is gone: nothing to answer
    assert_clean(handler, engine)


def test_a_request_past_its_deadline_gets_a_504_in_its_dialect():
    handler, engine = make(ScriptedEngine(capacity=1, tokens=10))
    handler.submit(request("first", LMI))
    handler.step()  # "first" holds the only sequence
    handler.submit(request("late", {"prompt": "x", "max_tokens": 3}, Api.OPENAI_COMPLETIONS, deadline=0.0))
    replies = handler.step()
    late = next(r for r in replies if r.request_id == "late")
    assert late.code == 504
    assert json.loads(late.body)["error"]["code"] == 504
    assert "predict_timeout" in json.loads(late.body)["error"]["message"]
    drain(handler)
    assert_clean(handler, engine)


def test_a_failed_step_answers_every_admitted_request_even_those_the_engine_lost():
    handler, engine = make()
    handler.submit(request("a", LMI))
    handler.submit(request("b", {"inputs": "hi", "stream": True, "parameters": {"max_new_tokens": 3}}))
    engine.fail_step, engine.forget = True, True
    replies = handler.step()
    assert sorted(r.request_id for r in replies) == ["a", "b"]
    assert all(r.code == 424 for r in replies if isinstance(r, Reply))
    assert_clean(handler, engine)
    engine.fail_step = False
    handler.submit(request("c", LMI))
    assert [r.code for r in drain(handler)] == [200]  # the handler keeps serving


def test_an_error_in_one_of_n_completions_fails_the_request_and_frees_the_others():
    engine = ScriptedEngine(tokens=5)
    engine.error_index = 1
    handler, _ = make(engine)
    handler.submit(request("r", {"prompt": "x", "max_tokens": 5, "n": 2}, Api.OPENAI_COMPLETIONS))
    replies = drain(handler)
    assert [(r.request_id, r.code) for r in replies] == [("r", 500)]  # OpenAI: a failed generation
    assert_clean(handler, engine)


def test_n_completions_answer_once_with_every_choice():
    handler, engine = make()
    handler.submit(request("r", {"prompt": "x", "max_tokens": 3, "n": 3}, Api.OPENAI_COMPLETIONS))
    (reply,) = drain(handler)
    body = json.loads(reply.body)
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 9
    assert_clean(handler, engine)


def test_more_completions_than_the_engine_holds_is_a_400():
    handler, engine = make()
    (reply,) = handler.submit(request("r", {"prompt": "x", "max_tokens": 3, "n": 5}, Api.OPENAI_COMPLETIONS))
    assert reply.code == 400
    assert "max_rolling_batch_size" in json.loads(reply.body)["error"]["message"]
    assert_clean(handler, engine)


def test_a_burst_larger_than_the_slots_waits_in_the_worker_and_is_all_served():
    handler, engine = make(ScriptedEngine(capacity=2))
    for i in range(10):
        assert handler.submit(request(f"r{i}", LMI)) == []
    replies = drain(handler)
    assert sorted(r.request_id for r in replies) == sorted(f"r{i}" for i in range(10))
    assert all(r.code == 200 for r in replies)
    assert_clean(handler, engine)


def test_the_worker_logs_what_the_engine_holds_while_it_works(caplog):
    import logging

    from handlers.worker import GenerationWorker

    handler, engine = make(ScriptedEngine(tokens=10))
    worker = GenerationWorker(None, handler)  # no socket needed to log
    handler.submit(request("r", {**LMI, "parameters": {"max_new_tokens": 10}}))
    handler.step()
    handler.step()
    engine.steps = 2
    worker._stats_at -= 1.0
    with caplog.at_level(logging.INFO, logger="handlers.worker"):
        worker._log_stats()
    assert "engine: 1/4 sequences" in caplog.text
