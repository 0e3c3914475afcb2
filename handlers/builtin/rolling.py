"""The rolling-batch text-generation handler: HTTP bodies in, token frames out, one engine step at a time.

It lives in the model worker. Requests arrive whenever the broker sends them; `step()` runs one
iteration of continuous batching and turns each TokenEvent into bytes for its client in the schema the
client used (LMI, OpenAI, TGI), streaming or not.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from engines.types import GenerationRequest, SamplingParams
from handlers.builtin import formats
from handlers.builtin.formats import ParsedRequest, RequestError
from serving import messages as msg
from serving.config import ServingConfig
from engines.scheduler import RollingScheduler

log = logging.getLogger("handlers.builtin.rolling")

Frame = tuple[bytes, str, bytes]  # (kind, request id, payload)
TGI_COMPAT_ROUTE = "tgi-compat"


def _body(request: msg.InferRequest) -> bytes:
    return next((v for k, v in request.content if k == "data"), b"") or b"{}"


@dataclass
class Job:
    writer: Any
    stream: bool
    route: str
    started: bool = False


def error_frame(request_id: str, message: str, code: int, route: str = "invocations") -> Frame:
    """An error before any token: the HTTP status plus the body the route's clients parse."""
    body, content_type = formats.error_response(route, message, code)
    head = msg.InferResponse(code, message, {"Content-Type": content_type}, body)
    return msg.RESP, request_id, msg.dumps(head)


class RollingTextHandler:
    """Capability marker for the worker: serve requests one by one through a RollingScheduler."""

    def __init__(self, engine: Any, properties: dict[str, str]) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = properties.get("model_name") or "model"
        self.output_formatter = properties.get("output_formatter")
        self.tgi_compat = properties.get("tgi_compat", "false").lower() == "true"
        # Server keys were validated at start-up (serving.config); the engine already sized its
        # slots from max_rolling_batch_size and the KV budget, so the batch limit is its slot count.
        prefill = int(
            properties.get("max_rolling_batch_prefill_tokens", ServingConfig.max_rolling_batch_prefill_tokens)
        )
        queue = int(properties.get("job_queue_size", ServingConfig.job_queue_size))
        timeout = float(properties.get("predict_timeout", ServingConfig.predict_timeout_s))
        self.capacity = engine.num_slots  # the broker holds the waiting requests (job_queue_size)
        self.scheduler = RollingScheduler(engine, engine.num_slots, prefill, queue, timeout)
        self.jobs: dict[str, Job] = {}

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def submit(self, request: msg.InferRequest) -> list[Frame]:
        route = request.properties.get(msg.API_PROPERTY, "invocations")
        tgi_compat = self.tgi_compat or route == TGI_COMPAT_ROUTE
        route = "invocations" if route == TGI_COMPAT_ROUTE else route
        try:
            parsed = formats.parse_request(route, _body(request))
            prompt_text, prompt_ids = self._tokenize(parsed)
            params = self._fit_default_length(parsed, len(prompt_ids))
            error = self.engine.check_length(len(prompt_ids), params.max_new_tokens)
            if error:
                raise RequestError(error)
            writer = formats.create_writer(
                parsed,
                request.request_id,
                self.model_name,
                prompt_text,
                len(prompt_ids),
                self.output_formatter,
                tgi_compat,
            )
            self.scheduler.submit(GenerationRequest(request.request_id, prompt_ids, params), len(prompt_ids))
        except RequestError as exc:
            return [error_frame(request.request_id, str(exc), 400, route)]
        except OverflowError as exc:
            return [
                error_frame(request.request_id, f"{exc}; retry later or raise job_queue_size", 503, route)
            ]
        except Exception as exc:  # e.g. a chat template rejecting the messages: answer, keep serving
            log.exception("Cannot prepare request %s", request.request_id)
            return [error_frame(request.request_id, f"Cannot prepare the request: {exc}", 400, route)]
        self.jobs[request.request_id] = Job(writer, parsed.stream, route)
        return []

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
        if self.scheduler.cancel(request_id):
            log.info("Request %s cancelled by the client", request_id)
        self.jobs.pop(request_id, None)

    def step(self) -> list[Frame]:
        frames = [self._expired(r.request_id) for r in self.scheduler.expire()]
        try:
            events = self.scheduler.step()
        except Exception as exc:  # a failed forward: end every sequence in-band, keep serving
            log.exception("Engine step failed")
            events = self.engine.abort_all(f"engine step failed: {exc}")
            self.scheduler.reset()
        for event in events:
            frames.extend(self._on_event(event))
        return frames

    def _expired(self, request_id: str) -> Frame:
        job = self.jobs.pop(request_id, None)
        return error_frame(
            request_id,
            "Timed out waiting for room in the rolling batch (option.predict_timeout); retry later.",
            503,
            job.route if job else "invocations",
        )

    def _on_event(self, event: Any) -> list[Frame]:
        job = self.jobs.get(event.request_id)
        if job is None:
            return []
        if event.finish_reason in ("error", "cancelled"):
            return self._end_with_error(event.request_id, job, event.error or event.finish_reason)
        frames: list[Frame] = []
        data = job.writer.on_event(event)
        if job.stream:
            frames.extend(self._start(event.request_id, job))
            if data:
                frames.append((msg.CHUNK, event.request_id, data))
        if event.finish_reason is not None:
            frames.extend(self._finish(event.request_id, job))
        return frames

    def _start(self, request_id: str, job: Job) -> list[Frame]:
        if job.started:
            return []
        job.started = True
        head = msg.InferResponse(200, "OK", {"Content-Type": job.writer.content_type()})
        return [(msg.START, request_id, msg.dumps(head))]

    def _finish(self, request_id: str, job: Job) -> list[Frame]:
        del self.jobs[request_id]
        tail = job.writer.finish()
        if job.stream:
            return ([(msg.CHUNK, request_id, tail)] if tail else []) + [(msg.END, request_id, b"")]
        head = msg.InferResponse(200, "OK", {"Content-Type": job.writer.content_type()}, tail)
        return [(msg.RESP, request_id, msg.dumps(head))]

    def _end_with_error(self, request_id: str, job: Job, message: str) -> list[Frame]:
        self.jobs.pop(request_id, None)
        if not job.started:
            return [error_frame(request_id, message, 500, job.route)]
        return [(msg.CHUNK, request_id, job.writer.error(message, 500)), (msg.END, request_id, b"")]
