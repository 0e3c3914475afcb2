"""OpenAI responses shared by completions and chat: envelope, usage, finish reasons, errors, framing."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from handlers.builtin.formats.writer import (
    SSE_DONE,
    Choice,
    ResponseWriter,
    Tok,
    WriterContext,
    dumps,
    jsonline,
    sse,
)
from serving.dialects import openai_error

OPENAI_FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}
"""OpenAI knows only stop/length here; a cut-short ("cancelled") generation reports "length"."""
MISSING_LOGPROB = -9999.0
"""What OpenAI reports for a log-probability too small to represent; its schema does not allow null."""


def openai_finish(reason: str | None) -> str:
    return OPENAI_FINISH.get(reason or "", "length")


def logprob_or_missing(logprob: float | None) -> float:
    return MISSING_LOGPROB if logprob is None else logprob


class OpenAIWriter(ResponseWriter):
    """Non-stream: one object. Stream: a chunk per token, a usage chunk if asked, then ``[DONE]`` (SSE).

    With ``n`` > 1 every choice carries its completion's ``index`` (a stream interleaves them) and the
    usage counts every generated token. ``use_sse`` False gives LMI's jsonlines framing of the same
    chunks (chat through /invocations).
    """

    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(self, ctx: WriterContext, stream: bool, use_sse: bool = True) -> None:
        super().__init__(ctx)
        self.stream, self.use_sse = stream, use_sse
        self._frame = sse if use_sse else jsonline

    def content_type(self) -> str:
        if not self.stream:
            return "application/json"
        return "text/event-stream" if self.use_sse else "application/jsonlines"

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        return {
            "id": f"{self.id_prefix}{self.ctx.request_id}",
            "object": self.chunk_object_name if chunk else self.object_name,
            "created": self.ctx.created,
            "model": self.ctx.model_name,
        }

    def _usage(self) -> dict[str, Any]:
        """Every generated token counts, best_of's unreturned completions included (as OpenAI bills);
        prompt tokens served from the prefix cache are reported as OpenAI does, when there are any."""
        prompt, completion = self.ctx.prompt_tokens, sum(len(c.tokens) for c in self.choices)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if self.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage

    def _token_bytes(self, choice: Choice, tok: Tok | None, last: bool) -> bytes:
        if not self.stream:
            return b""
        delta = self._delta_choice(choice, tok, last)
        if delta is None:
            return b""
        choice.chunks_sent += 1
        chunk = {**self._envelope(chunk=True), "choices": [delta]}
        if self.parsed.include_usage:
            chunk["usage"] = None
        return self._frame(chunk)

    def _final_bytes(self) -> bytes:
        if not self.stream:
            choices = [self._full_choice(c, i) for i, c in enumerate(self.returned_choices())]
            return dumps({**self._envelope(chunk=False), "choices": choices, "usage": self._usage()})
        out = b""
        if self.parsed.include_usage:
            out += self._frame({**self._envelope(chunk=True), "choices": [], "usage": self._usage()})
        return out + (SSE_DONE if self.use_sse else b"")

    def _error_bytes(self, message: str, code: int) -> bytes:
        if not self.stream:
            return dumps(openai_error(message, code))
        return self._frame(openai_error(message, code)) + (SSE_DONE if self.use_sse else b"")

    @staticmethod
    def _finish_or_none(choice: Choice, last: bool) -> str | None:
        return openai_finish(choice.finish_reason) if last else None

    @abstractmethod
    def _delta_choice(self, choice: Choice, tok: Tok | None, last: bool) -> dict[str, Any] | None:
        """The choice of one stream chunk for ``choice``, or None when there is nothing worth a chunk."""

    @abstractmethod
    def _full_choice(self, choice: Choice, index: int) -> dict[str, Any]:
        """``choice`` as entry ``index`` of the non-stream response's choices."""
