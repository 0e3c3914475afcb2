"""Response-writer base: accumulates one request's TokenEvents; subclasses only decide the bytes."""

from __future__ import annotations

import json
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from engines.types import TokenEvent
from handlers.builtin.formats.request import ParsedRequest

GENERATION_ERROR_CODE = 424
"""What LMI reports for a failure inside generation (its handler-failure code)."""
SSE_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Tok:
    """One generated token as the formats need it."""

    id: int
    text: str
    logprob: float | None
    special: bool = False
    top: tuple[Tok, ...] = ()
    """The most likely tokens at this step, most likely first (when the request asked for them)."""


PLACEHOLDER = Tok(-1, "", None, True)
"""Stands in for the token of a final line when the final event carried no token (token_id < 0)."""


@dataclass
class Choice:
    """One of a request's completions (``index`` of ``params.num_sequences``) as its events arrive."""

    index: int
    tokens: list[Tok] = field(default_factory=list)
    finish_reason: str | None = None
    cumulative_logprob: float = 0.0
    """Sum of the tokens' log-probabilities: what best_of ranks by."""
    chunks_sent: int = 0
    """Stream chunks sent for this completion so far."""

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)


@dataclass(frozen=True)
class WriterContext:
    """Everything about the request a writer needs besides the events."""

    parsed: ParsedRequest
    request_id: str
    model_name: str
    prompt_text: str
    prompt_tokens: int
    tgi_compat: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def finite(value: float | None) -> float | None:
    """JSON has no NaN/Infinity; a non-finite log-probability becomes null."""
    return value if value is not None and math.isfinite(value) else None


def token_of(event: TokenEvent, num_top: int) -> Tok:
    """The Tok of an event that carries a token, with (at most ``num_top`` of) its alternatives."""
    texts = event.top_texts
    top = tuple(
        Tok(token_id, texts[i] if i < len(texts) else "", finite(logprob))
        for i, (token_id, logprob) in enumerate(event.top_logprobs[:num_top])
    )
    special = event.finish_reason == "eos_token"
    return Tok(event.token_id, event.text, finite(event.logprob), special, top)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sse(obj: Any) -> bytes:
    """One Server-Sent Event: ``data: <json>`` and a blank line."""
    return b"data: " + dumps(obj) + b"\n\n"


def jsonline(obj: Any) -> bytes:
    return dumps(obj) + b"\n"


class ResponseWriter(ABC):
    """Turns one request's TokenEvents into response bytes.

    Protocol: ``on_event`` for every event (bytes to send now, b"" when nothing) until ``done``, then
    ``finish`` once (the whole body for non-streaming formats, trailers such as ``data: [DONE]`` for
    SSE). ``error`` replaces ``finish`` when generation fails; for a stream that already started it
    produces the in-band error line, since the HTTP status has been sent. Events with ``token_id < 0``
    carry no token (only a finish_reason). A finish_reason "error" event is handled like
    ``error(event.error, 424)``. ``event.index`` says which completion an event belongs to; a request
    has ``params.num_sequences`` of them, each ending with its own final event.
    """

    def __init__(self, ctx: WriterContext) -> None:
        self.ctx = ctx
        self.parsed = ctx.parsed
        self.choices = [Choice(i) for i in range(ctx.parsed.params.num_sequences)]
        self.prefill: list[dict[str, Any]] = []
        self.cached_tokens = 0
        """Prompt tokens the engine found in its prefix cache (reported in OpenAI usage)."""
        """TGI/LMI ``details.prefill``: the prompt tokens with their log-probabilities, when asked."""
        self.error_code: int | None = None
        """Set by ``error``; a worker that has sent nothing yet can use it as the HTTP status."""
        self.started = False
        """True once any bytes were returned: from then on the HTTP status cannot change."""
        self._closed = False

    @abstractmethod
    def content_type(self) -> str: ...

    @property
    def done(self) -> bool:
        """True once every completion has had its final event, or the request failed: call ``finish``."""
        return self.error_code is not None or all(c.finish_reason is not None for c in self.choices)

    @property
    def tokens(self) -> list[Tok]:
        """The first completion's tokens (the only one unless n or best_of > 1)."""
        return self.choices[0].tokens

    @property
    def finish_reason(self) -> str | None:
        """The first completion's finish reason; "error" once the request failed."""
        return "error" if self.error_code is not None else self.choices[0].finish_reason

    @property
    def generated_text(self) -> str:
        return self.choices[0].text

    @property
    def full_text(self) -> str:
        return self.full_text_of(self.choices[0])

    def full_text_of(self, choice: Choice) -> str:
        """Generated text, with the prompt in front when return_full_text/echo asked for it."""
        prefix = self.ctx.prompt_text if self.parsed.return_full_text else ""
        return prefix + choice.text

    def returned_choices(self) -> list[Choice]:
        """The completions the client gets: all in index order, or with best_of > n the n with the highest
        cumulative log-probability, best first (as vLLM)."""
        n = self.parsed.params.n
        if len(self.choices) <= n:
            return self.choices
        return sorted(self.choices, key=lambda c: c.cumulative_logprob, reverse=True)[:n]

    def best_and_others(self) -> tuple[Choice, list[Choice]]:
        """LMI/TGI best_of: the returned completion with the highest cumulative log-probability, and the
        other returned ones."""
        returned = self.returned_choices()
        best = max(returned, key=lambda c: c.cumulative_logprob)
        return best, [c for c in returned if c is not best]

    def on_event(self, event: TokenEvent) -> bytes:
        if self._closed or self.error_code is not None:
            return b""
        if event.finish_reason == "error":
            return self.error(event.error or "generation failed", GENERATION_ERROR_CODE)
        if not 0 <= event.index < len(self.choices):
            raise ValueError(
                f"event index {event.index} of request {event.request_id} is outside its "
                f"{len(self.choices)} completions (params.num_sequences)"
            )
        choice = self.choices[event.index]
        if choice.finish_reason is not None:
            return b""
        self.cached_tokens = max(self.cached_tokens, event.cached_tokens)
        if event.prompt_tokens:
            self.prefill = [
                {"id": token, "text": text, "logprob": finite(logprob)}
                for token, text, logprob in event.prompt_tokens
            ]
        tok = None
        if event.token_id >= 0:
            tok = token_of(event, self.parsed.params.top_logprobs)
            choice.tokens.append(tok)
            choice.cumulative_logprob += event.logprob
        choice.finish_reason = event.finish_reason
        last = event.finish_reason is not None
        if tok is None and not last:
            return b""
        return self._emit(self._token_bytes(choice, tok, last))

    def finish(self) -> bytes:
        """Final bytes; completions that ended without a final event are reported as cancelled."""
        if self._closed:
            return b""
        head = b""
        for choice in self.choices:
            if choice.finish_reason is None:
                choice.finish_reason = "cancelled"
                head += self._token_bytes(choice, None, True)
        self._closed = True
        return self._emit(head + self._final_bytes())

    def error(self, message: str, code: int = GENERATION_ERROR_CODE) -> bytes:
        """The error body (non-streaming) or in-band error line(s) (streaming); later calls return b""."""
        if self._closed:
            return b""
        self._closed = True
        self.error_code = code
        return self._emit(self._error_bytes(message, code))

    def _emit(self, data: bytes) -> bytes:
        self.started = self.started or bool(data)
        return data

    @abstractmethod
    def _token_bytes(self, choice: Choice, tok: Tok | None, last: bool) -> bytes:
        """Bytes for one token of ``choice`` (``last``: its final event; ``tok`` None: it had no token)."""

    @abstractmethod
    def _final_bytes(self) -> bytes: ...

    @abstractmethod
    def _error_bytes(self, message: str, code: int) -> bytes: ...
