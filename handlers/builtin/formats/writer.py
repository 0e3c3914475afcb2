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


PLACEHOLDER = Tok(-1, "", None, True)
"""Stands in for the token of a final line when the final event carried no token (token_id < 0)."""


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


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sse(obj: Any) -> bytes:
    """One Server-Sent Event: ``data: <json>`` and a blank line."""
    return b"data: " + dumps(obj) + b"\n\n"


def jsonline(obj: Any) -> bytes:
    return dumps(obj) + b"\n"


class ResponseWriter(ABC):
    """Turns one request's TokenEvents into response bytes.

    Protocol: ``on_event`` for every event (bytes to send now, b"" when nothing), then ``finish`` once
    (the whole body for non-streaming formats, trailers such as ``data: [DONE]`` for SSE). ``error``
    replaces ``finish`` when generation fails; for a stream that already started it produces the
    in-band error line, since the HTTP status has been sent. Events with ``token_id < 0`` carry no token
    (only a finish_reason). A finish_reason "error" event is handled like ``error(event.error, 424)``.
    """

    def __init__(self, ctx: WriterContext) -> None:
        self.ctx = ctx
        self.parsed = ctx.parsed
        self.tokens: list[Tok] = []
        self.finish_reason: str | None = None
        self.error_code: int | None = None
        """Set by ``error``; a worker that has sent nothing yet can use it as the HTTP status."""
        self.started = False
        """True once any bytes were returned: from then on the HTTP status cannot change."""
        self._closed = False

    @abstractmethod
    def content_type(self) -> str: ...

    @property
    def generated_text(self) -> str:
        return "".join(t.text for t in self.tokens)

    @property
    def full_text(self) -> str:
        """Generated text, with the prompt in front when return_full_text/echo asked for it."""
        prefix = self.ctx.prompt_text if self.parsed.return_full_text else ""
        return prefix + self.generated_text

    def on_event(self, event: TokenEvent) -> bytes:
        if self._closed or self.finish_reason is not None:
            return b""
        if event.finish_reason == "error":
            return self.error(event.error or "generation failed", GENERATION_ERROR_CODE)
        tok = None
        if event.token_id >= 0:
            special = event.finish_reason == "eos_token"
            tok = Tok(event.token_id, event.text, finite(event.logprob), special)
            self.tokens.append(tok)
        self.finish_reason = event.finish_reason
        last = event.finish_reason is not None
        if tok is None and not last:
            return b""
        return self._emit(self._token_bytes(tok, last))

    def finish(self) -> bytes:
        """Final bytes; a request that ended without a final event is reported as cancelled."""
        if self._closed:
            return b""
        head = b""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
            head = self._token_bytes(None, True)
        self._closed = True
        return self._emit(head + self._final_bytes())

    def error(self, message: str, code: int = GENERATION_ERROR_CODE) -> bytes:
        """The error body (non-streaming) or in-band error line(s) (streaming); later calls return b""."""
        if self._closed:
            return b""
        self._closed = True
        self.finish_reason, self.error_code = "error", code
        return self._emit(self._error_bytes(message, code))

    def _emit(self, data: bytes) -> bytes:
        self.started = self.started or bool(data)
        return data

    @abstractmethod
    def _token_bytes(self, tok: Tok | None, last: bool) -> bytes:
        """Bytes for one token (``last``: this is the final event; ``tok`` None: it had no token)."""

    @abstractmethod
    def _final_bytes(self) -> bytes: ...

    @abstractmethod
    def _error_bytes(self, message: str, code: int) -> bytes: ...
