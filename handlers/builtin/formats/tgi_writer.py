"""TGI responses: ``/generate`` JSON and ``/generate_stream`` SSE, shaped like text_generation's models."""

from __future__ import annotations

from typing import Any

from handlers.builtin.formats.writer import PLACEHOLDER, ResponseWriter, Tok, dumps, sse

TGI_FINISH = {"length": "length", "eos_token": "eos_token", "stop_sequence": "stop_sequence"}
"""TGI has no "cancelled": a cut-short generation reports "length"."""
TGI_ERROR_TYPES = {400: "validation", 422: "validation", 429: "overloaded"}


def tgi_finish(reason: str | None) -> str:
    return TGI_FINISH.get(reason or "", "length")


def tgi_token(tok: Tok) -> dict[str, Any]:
    return {"id": tok.id, "text": tok.text, "logprob": tok.logprob, "special": tok.special}


def tgi_error(message: str, code: int) -> dict[str, str]:
    """TGI's error body; text_generation maps error_type to its exception classes."""
    return {"error": message, "error_type": TGI_ERROR_TYPES.get(code, "generation")}


class _TgiWriter(ResponseWriter):
    def _seed(self) -> int | None:
        return self.parsed.params.seed if self.parsed.params.do_sample else None


class TgiGenerateWriter(_TgiWriter):
    """``/generate``: one JSON object; ``details`` (with prefill, always empty here) when requested."""

    def content_type(self) -> str:
        return "application/json"

    def _token_bytes(self, tok: Tok | None, last: bool) -> bytes:
        return b""

    def _final_bytes(self) -> bytes:
        body: dict[str, Any] = {"generated_text": self.full_text}
        if self.parsed.details:
            body["details"] = {
                "finish_reason": tgi_finish(self.finish_reason),
                "generated_tokens": len(self.tokens),
                "seed": self._seed(),
                "prefill": [],
                "tokens": [tgi_token(t) for t in self.tokens],
            }
        return dumps(body)

    def _error_bytes(self, message: str, code: int) -> bytes:
        return dumps(tgi_error(message, code))


class TgiStreamWriter(_TgiWriter):
    """``/generate_stream``: one SSE event per token; the last adds generated_text (and details)."""

    def content_type(self) -> str:
        return "text/event-stream"

    def _token_bytes(self, tok: Tok | None, last: bool) -> bytes:
        event: dict[str, Any] = {
            "index": len(self.tokens) if tok else len(self.tokens) + 1,
            "token": tgi_token(tok or PLACEHOLDER),
            "generated_text": self.full_text if last else None,
            "details": None,
        }
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
