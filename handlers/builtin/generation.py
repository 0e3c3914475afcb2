"""The text-generation handler: HTTP bodies in, plain replies out, one engine step at a time.

It lives in the model worker and serves every ``GenerationEngine`` (engines/base.py) the same way:
requests arrive whenever the broker sends them, ``step()`` runs one scheduler step, and each
TokenEvent becomes bytes for its client in the dialect the route set (LMI, OpenAI, TGI), streaming or
not. An LMI body whose ``inputs`` is a list becomes one sequence per prompt and one JSON list answer,
as DJL's handlers answer batched inputs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field

from engines.base import GenerationEngine
from engines.scheduler import RollingScheduler
from engines.types import GenerationRequest, SamplingParams, TokenEvent
from handlers.batch_io import request_input
from handlers.builtin import formats
from handlers.builtin.custom_formatters import CustomFormatterError, CustomFormatters
from handlers.builtin.formats import GENERATION_ERROR_CODE, ParsedRequest, RequestError, ResponseWriter
from handlers.replies import AnyReply, Reply, StreamChunk, StreamEnd, StreamStart, Usage
from serving import dialects
from serving import messages as msg
from serving.dialects import Api

log = logging.getLogger("handlers.builtin.generation")

JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class GenerationSettings:
    """The handler's typed settings (validated at server start-up)."""

    model_name: str = "model"
    max_prefill_tokens: int = 4096
    timeout_s: float = 120.0
    """How long a request may wait for room when it arrived without the broker's deadline."""
    output_formatter: str | None = None
    tgi_compat: bool = False


@dataclass
class Job:
    """One HTTP request: one writer per prompt (several only for an LMI list of prompts)."""

    api: Api
    writers: list[ResponseWriter]
    stream: bool
    listed: bool = False
    started: bool = False
    running: set[str] = field(default_factory=set)
    """Engine request ids of this job that have not finished yet."""
    arrived: float = 0.0
    first_token_at: float = 0.0
    """time.monotonic() of arrival at the broker and of the first generated token (0.0: none yet)."""

    def usage(self) -> Usage:
        prompt = sum(w.ctx.prompt_tokens for w in self.writers)
        generated = sum(len(c.tokens) for w in self.writers for c in w.choices)
        return Usage(prompt, generated, self.arrived, self.first_token_at)


def error_reply(request_id: str, api: Api, code: int, message: str, error_type: str = "") -> Reply:
    """An error before any output: the dialect's status and body (serving.dialects.error_reply)."""
    status, body = dialects.error_reply(api, code, message, error_type)
    return Reply(request_id, status, dict(JSON), json.dumps(body).encode(), message)


def _body(request: msg.InferRequest) -> dict:
    raw = next((v for k, v in request.content if k == "data"), b"") or b"{}"
    return formats.decode_body(raw)


class GenerationHandler:
    """Serves requests one by one through a RollingScheduler over any GenerationEngine."""

    def __init__(
        self,
        engine: GenerationEngine,
        settings: GenerationSettings,
        formatters: CustomFormatters | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.settings = settings
        self.formatters = formatters or CustomFormatters()
        """model.py's @input_formatter/@output_formatter, applied to every request and response."""
        self.scheduler = RollingScheduler(
            engine, engine.capacity, settings.max_prefill_tokens, settings.timeout_s
        )
        self.jobs: dict[str, Job] = {}
        self.owner: dict[str, tuple[str, int]] = {}
        """Engine request id → (HTTP request id, prompt index)."""
        self.last_step_size = 0
        """Token events the last step produced (the batch-size metric)."""

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- requests in -------------------------------------------------------------------------
    def submit(self, request: msg.InferRequest) -> list[AnyReply]:
        api = request.api
        try:
            bodies, listed = self._split(api, self._decode(request))
            prepared = [self._prepare(api, body, request.request_id) for body in bodies]
            if listed and any(w.content_type() != "application/json" for _, w, _ in prepared):
                raise RequestError(
                    "A list of `inputs` is answered with one JSON list: send it without `stream` (and "
                    "without option.output_formatter=jsonlines/sse), or send one prompt per request."
                )
        except RequestError as exc:
            return [error_reply(request.request_id, api, 400, str(exc))]
        except CustomFormatterError as exc:
            return [error_reply(request.request_id, api, exc.status_code, str(exc))]
        except Exception as exc:  # e.g. a chat template rejecting the messages: answer, keep serving
            log.exception("Cannot prepare request %s", request.request_id)
            return [error_reply(request.request_id, api, 400, f"Cannot prepare the request: {exc}")]
        writers = [w for _, w, _ in prepared]
        # The writer decides the framing: option.output_formatter=jsonlines/sse streams on /invocations
        # even without "stream": true, as in LMI.
        streams = prepared[0][0].stream or writers[0].content_type() != "application/json"
        job = Job(api, writers, streams, listed, arrived=request.arrived or time.monotonic())
        for index, (_, _, generation) in enumerate(prepared):
            if listed:
                generation = dataclasses.replace(generation, request_id=f"{request.request_id}#{index}")
            self.scheduler.submit(generation, len(generation.prompt_ids), request.deadline)
            self.owner[generation.request_id] = (request.request_id, index)
            job.running.add(generation.request_id)
        self.jobs[request.request_id] = job
        return []

    def _decode(self, request: msg.InferRequest) -> dict:
        """The body as a dict: what the custom input formatter makes of the request, else its JSON."""
        if self.formatters.input_formatter is None:
            return _body(request)
        body = self.formatters.format_input(request_input(request), tokenizer=self.tokenizer)
        return formats.decode_body(body or {})

    @staticmethod
    def _split(api: Api, body: dict) -> tuple[list[dict], bool]:
        """An LMI body with a list of prompts becomes one body per prompt."""
        inputs = body.get("inputs")
        if api is not Api.LMI or not isinstance(inputs, list) or "messages" in body:
            return [body], False
        if not inputs or not all(isinstance(x, str) and x for x in inputs):
            raise RequestError("`inputs` must be a non-empty string or a list of non-empty strings.")
        return [{**body, "inputs": prompt} for prompt in inputs], True

    def _prepare(
        self, api: Api, body: dict, request_id: str
    ) -> tuple[ParsedRequest, ResponseWriter, GenerationRequest]:
        tgi_compat = self.settings.tgi_compat or api is Api.TGI_COMPAT
        parsed = formats.parse_request(api, body)
        prompt_text, prompt_ids = self._tokenize(parsed)
        params = self._fit_default_length(parsed, len(prompt_ids))
        if parsed.decoder_input_details:
            params = dataclasses.replace(params, prompt_logprobs=True)
        formats.check_token_ids(params, len(self.tokenizer))
        if params.num_sequences > self.engine.capacity:
            raise RequestError(
                f"{params.num_sequences} completions (n/best_of) exceed the {self.engine.capacity} sequences "
                "this server runs at once (option.max_rolling_batch_size); lower n or best_of."
            )
        error = self.engine.check_length(len(prompt_ids), params.max_new_tokens)
        if error:
            raise RequestError(error)
        writer = formats.create_writer(
            parsed,
            request_id,
            self.settings.model_name,
            prompt_text,
            len(prompt_ids),
            self.settings.output_formatter,
            tgi_compat,
        )
        return parsed, writer, GenerationRequest(request_id, prompt_ids, params)

    def _fit_default_length(self, parsed: ParsedRequest, prompt_len: int) -> SamplingParams:
        """A default max_new_tokens (the client sent none) shrinks to the room left in the context."""
        room = self.engine.max_model_len - prompt_len
        if parsed.max_new_tokens_set or parsed.params.max_new_tokens <= room or room < 1:
            return parsed.params
        return dataclasses.replace(parsed.params, max_new_tokens=room)

    def _tokenize(self, parsed: ParsedRequest) -> tuple[str, list[int]]:
        if parsed.messages is not None:
            text = self.tokenizer.apply_chat_template(
                parsed.messages, add_generation_prompt=True, tokenize=False
            )
            return text, self.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert parsed.prompt is not None
        return parsed.prompt, self.tokenizer(parsed.prompt)["input_ids"]

    def cancel(self, request_id: str) -> None:
        """The client went away: free its sequences at the next step."""
        if self._drop(request_id):
            log.info("Request %s cancelled by the client", request_id)

    def _drop(self, request_id: str) -> bool:
        job = self.jobs.pop(request_id, None)
        if job is None:
            return False
        for engine_id in job.running:
            self.scheduler.cancel(engine_id)
            self.owner.pop(engine_id, None)
        return True

    def run_to_completion(self, requests: list[msg.InferRequest]) -> list[Reply]:
        """Serve whole requests synchronously, one Reply each in order (a stream's chunks joined):
        the DJL ``handle(inputs)`` entry point, which answers a batch at once."""
        replies: dict[str, Reply] = {}

        def collect(batch: list[AnyReply]) -> None:
            for reply in batch:
                if isinstance(reply, Reply):
                    replies[reply.request_id] = reply
                elif isinstance(reply, StreamStart):
                    replies[reply.request_id] = Reply(reply.request_id, reply.code, reply.headers)
                elif isinstance(reply, StreamChunk):
                    replies[reply.request_id].body += reply.data

        for request in requests:
            collect(self.submit(request))
        while self.has_work():
            collect(self.step())
        return [replies[r.request_id] for r in requests]

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> list[AnyReply]:
        replies = [self._expired(r.request_id) for r in self.scheduler.expire()]
        try:
            events = self.scheduler.step()
        except Exception as exc:  # a failed forward: end every sequence in-band, keep serving
            log.exception("Engine step failed")
            events = self._abort_all(f"engine step failed: {exc}")
        self.last_step_size = len(events)
        for event in events:
            try:
                replies.extend(self._on_event(event))
            except Exception as exc:  # a bug in one request's formatting ends that request only
                log.exception("Cannot answer request %s", event.request_id)
                replies.extend(self._fail(event.request_id, f"Cannot format the answer: {exc}"))
        return [r for r in replies if r is not None]

    def _abort_all(self, reason: str) -> list[TokenEvent]:
        """After a failed step: the engine ends what it holds; every request the scheduler had admitted
        gets a final event even if the engine lost track of it (no request may hang)."""
        admitted = set(self.scheduler.running)
        events = self.engine.abort_all(reason)
        self.scheduler.reset()
        ended = {e.request_id for e in events if e.finish_reason is not None}
        return events + [TokenEvent(rid, -1, "", 0.0, "error", reason) for rid in admitted - ended]

    def _fail(self, engine_id: str, message: str) -> list[AnyReply]:
        request_id, _ = self.owner.get(engine_id, (engine_id, 0))
        job = self.jobs.get(request_id)
        return [] if job is None else self._end_with_error(request_id, job, message)

    def _expired(self, engine_id: str) -> AnyReply | None:
        request_id, _ = self.owner.get(engine_id, (engine_id, 0))
        job = self.jobs.get(request_id)
        if job is None:
            return None
        self._drop(request_id)  # the other prompts of a list go too: the answer is one error
        message = (
            f"The request waited option.predict_timeout={self.settings.timeout_s:g} s for room in the "
            "batch without getting it; retry later or raise option.predict_timeout."
        )
        return error_reply(request_id, job.api, 504, message, "PredictTimeoutException")

    def _on_event(self, event: TokenEvent) -> list[AnyReply]:
        request_id, index = self.owner.get(event.request_id, (event.request_id, 0))
        job = self.jobs.get(request_id)
        if job is None:
            return []
        if event.finish_reason in ("error", "cancelled"):
            return self._end_with_error(request_id, job, event.error or event.finish_reason)
        writer = job.writers[index]
        if not job.first_token_at and event.token_id >= 0:
            job.first_token_at = time.monotonic()
        data = writer.on_event(event)
        replies: list[AnyReply] = []
        if job.stream:
            data = self.formatters.format_chunk(data, writer.content_type())  # may raise: before the head
            if not job.started:
                job.started = True
                replies.append(StreamStart(request_id, 200, {"Content-Type": writer.content_type()}))
            if data:
                replies.append(StreamChunk(request_id, data))
        if writer.done:
            job.running.discard(event.request_id)
            self.owner.pop(event.request_id, None)
            if not job.running:
                replies.extend(self._finish(request_id, job))
        return replies

    def _finish(self, request_id: str, job: Job) -> list[AnyReply]:
        try:
            tails = [self.formatters.format_chunk(w.finish(), w.content_type()) for w in job.writers]
        except CustomFormatterError as exc:  # the writers are closed: answer the error directly
            self._drop(request_id)
            if job.started:
                return [StreamEnd(request_id, str(exc))]
            return [error_reply(request_id, job.api, exc.status_code, str(exc))]
        del self.jobs[request_id]
        if job.stream:
            end = StreamEnd(request_id, usage=job.usage())
            return ([StreamChunk(request_id, tails[0])] if tails[0] else []) + [end]
        headers = {"Content-Type": job.writers[0].content_type()}
        if not job.listed:
            return [Reply(request_id, 200, headers, tails[0], usage=job.usage())]
        # each prompt's JSON body (submit checked), in prompt order
        body = b"[" + b",".join(tail or b"null" for tail in tails) + b"]"
        return [Reply(request_id, 200, headers, body, usage=job.usage())]

    def _end_with_error(self, request_id: str, job: Job, message: str) -> list[AnyReply]:
        self._drop(request_id)
        if not job.started:
            reply = error_reply(request_id, job.api, GENERATION_ERROR_CODE, message)
            reply.usage = job.usage()
            return [reply]
        data = job.writers[0].error(message, GENERATION_ERROR_CODE)
        return [StreamChunk(request_id, data), StreamEnd(request_id, usage=job.usage())]
