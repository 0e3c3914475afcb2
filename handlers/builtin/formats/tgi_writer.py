"""TGI responses: ``/generate`` JSON and ``/generate_stream`` SSE, shaped like text_generation's models."""

from __future__ import annotations

from typing import Any

from handlers.builtin.formats.writer import PLACEHOLDER, Choice, ResponseWriter, Tok, dumps, sse
from serving.dialects import tgi_error

TGI_FINISH = {"length": "length", "eos_token": "eos_token", "stop_sequence": "stop_sequence"}
"""TGI has no "cancelled": a cut-short generation reports "length"."""


def tgi_finish(reason: str | None) -> str:
    return TGI_FINISH.get(reason or "", "length")


def tgi_token(tok: Tok) -> dict[str, Any]:
    return {"id": tok.id, "text": tok.text, "logprob": tok.logprob, "special": tok.special}


def tgi_top_tokens(tok: Tok) -> list[dict[str, Any]]:
    return [tgi_token(alt) for alt in tok.top]


class _TgiWriter(ResponseWriter):
    def _seed(self) -> int | None:
        return self.parsed.params.seed if self.parsed.params.do_sample else None


class TgiGenerateWriter(_TgiWriter):
    """``/generate``: one JSON object; ``details`` (``prefill`` with decoder_input_details) when requested.

    With best_of > 1 the best completion (highest summed log-probability) is the answer and the others
    are ``details.best_of_sequences``, as TGI returns them.
    """

    def content_type(self) -> str:
        return "application/json"

    def _token_bytes(self, choice: Choice, tok: Tok | None, last: bool) -> bytes:
        return b""

    def _final_bytes(self) -> bytes:
        best, others = self.best_and_others()
        body: dict[str, Any] = {"generated_text": self.full_text_of(best)}
        if self.parsed.details:
            body["details"] = self._sequence(best)
            if others:
                body["details"]["best_of_sequences"] = [
                    {"generated_text": self.full_text_of(c), **self._sequence(c)} for c in others
                ]
        return dumps(body)

    def _sequence(self, choice: Choice) -> dict[str, Any]:
        sequence: dict[str, Any] = {
            "finish_reason": tgi_finish(choice.finish_reason),
            "generated_tokens": len(choice.tokens),
            "seed": self._seed(),
            "prefill": self.prefill,
            "tokens": [tgi_token(t) for t in choice.tokens],
        }
        if self.parsed.params.top_logprobs:
            sequence["top_tokens"] = [tgi_top_tokens(t) for t in choice.tokens]
        return sequence

    def _error_bytes(self, message: str, code: int) -> bytes:
        return dumps(tgi_error(message, code))


class TgiStreamWriter(_TgiWriter):
    """``/generate_stream``: one SSE event per token; the last adds generated_text (and details)."""

    def content_type(self) -> str:
        return "text/event-stream"

    def _token_bytes(self, choice: Choice, tok: Tok | None, last: bool) -> bytes:
        event: dict[str, Any] = {
            "index": len(self.tokens) if tok else len(self.tokens) + 1,
            "token": tgi_token(tok or PLACEHOLDER),
            "generated_text": self.full_text if last else None,
            "details": None,
        }
        if tok is not None and self.parsed.params.top_logprobs:
            event["top_tokens"] = tgi_top_tokens(tok)
        if last and self.parsed.details:
            event["details"] = {
                "finish_reason": tgi_finish(self.finish_reason),
                "generated_tokens": len(self.tokens),
                "seed": self._seed(),
                "input_length": self.ctx.prompt_tokens,
            }
        return sse(event)

    def _final_bytes(self) -> bytes:
        return b""

    def _error_bytes(self, message: str, code: int) -> bytes:
        return sse(tgi_error(message, code))
