"""LMI responses: ``json`` (non-stream), ``jsonlines`` and ``sse`` (stream), with the tgi_compat variants."""

from __future__ import annotations

from typing import Any

from handlers.builtin.formats.tgi_writer import tgi_error, tgi_finish, tgi_token
from handlers.builtin.formats.writer import (
    PLACEHOLDER,
    Choice,
    ResponseWriter,
    Tok,
    WriterContext,
    dumps,
    jsonline,
    sse,
)

ERROR_TOKEN = {"id": -1, "text": "", "log_prob": -1, "special_token": True}
"""The token LMI puts on the in-band error line of a stream."""


def lmi_token(tok: Tok) -> dict[str, Any]:
    out: dict[str, Any] = {"id": tok.id, "text": tok.text, "log_prob": tok.logprob}
    if tok.special:
        out["special_token"] = True
    return out


class _LmiWriter(ResponseWriter):
    """Details shared by both LMI shapes; tgi_compat switches token/finish vocabularies to TGI's.

    ``top_n_tokens`` alternatives go where TGI puts them: ``details.top_tokens`` (one list per token)
    in the JSON body, ``top_tokens`` on each stream line.
    """

    def _token(self, tok: Tok) -> dict[str, Any]:
        return tgi_token(tok) if self.ctx.tgi_compat else lmi_token(tok)

    def _top_tokens(self, tok: Tok) -> list[dict[str, Any]]:
        return [self._token(alt) for alt in tok.top]

    def _wants_details(self) -> bool:
        return self.parsed.details or (self.ctx.tgi_compat and not self.parsed.details_explicit)

    def _details(self, with_tokens: bool, choice: Choice | None = None) -> dict[str, Any]:
        """The details of ``choice`` (default: the first completion)."""
        details = self._sequence_details(with_tokens, choice or self.choices[0])
        return {**details, "inputs": self.ctx.prompt_text}

    def _sequence_details(self, with_tokens: bool, choice: Choice) -> dict[str, Any]:
        compat = self.ctx.tgi_compat
        details: dict[str, Any] = {
            "finish_reason": tgi_finish(choice.finish_reason) if compat else choice.finish_reason,
            "generated_tokens": len(choice.tokens),
        }
        if with_tokens:
            details["tokens"] = [self._token(t) for t in choice.tokens]
            if self.parsed.params.top_logprobs:
                details["top_tokens"] = [self._top_tokens(t) for t in choice.tokens]
        if self.parsed.decoder_input_details or (compat and with_tokens):
            details["prefill"] = self.prefill
        if compat:
            details["seed"] = self.parsed.params.seed if self.parsed.params.do_sample else None
        return details

    def _error_details(self) -> dict[str, Any]:
        return {
            "finish_reason": "error",
            "generated_tokens": len(self.tokens),
            "inputs": self.ctx.prompt_text,
        }


class LmiJsonWriter(_LmiWriter):
    """``{"generated_text", "details"?}``, held until the end; a one-element list under tgi_compat."""

    def content_type(self) -> str:
        return "application/json"

    def _token_bytes(self, choice: Choice, tok: Tok | None, last: bool) -> bytes:
        return b""

    def _final_bytes(self) -> bytes:
        if len(self.choices) > 1:
            result = self._best_of_result()
        else:
            result = {"generated_text": self.full_text}
            if self._wants_details():
                result["details"] = self._details(with_tokens=True)
        return dumps([result] if self.ctx.tgi_compat else result)

    def _best_of_result(self) -> dict[str, Any]:
        """n or best_of > 1, as LMI documents: the best completion, the others in best_of_sequences."""
        best, others = self.best_and_others()
        details = self._details(with_tokens=True, choice=best)
        if others:
            details["best_of_sequences"] = [
                {**self._sequence_details(True, other), "generated_text": self.full_text_of(other)}
                for other in others
            ]
        return {"generated_text": self.full_text_of(best), "details": details}

    def _error_bytes(self, message: str, code: int) -> bytes:
        if self.ctx.tgi_compat:
            return dumps(tgi_error(message, code))
        body = {"generated_text": None, "error": message, "code": code, "details": self._error_details()}
        return dumps(body)


class LmiStreamWriter(_LmiWriter):
    """One line per token (``{"token": ...}``); the last line adds generated_text and details."""

    def __init__(self, ctx: WriterContext, use_sse: bool) -> None:
        super().__init__(ctx)
        self.use_sse = use_sse
        self._frame = sse if use_sse else jsonline

    def content_type(self) -> str:
        return "text/event-stream" if self.use_sse else "application/jsonlines"

    def _token_bytes(self, choice: Choice, tok: Tok | None, last: bool) -> bytes:
        line: dict[str, Any] = {"token": self._token(tok or PLACEHOLDER)}
        if tok is not None and self.parsed.params.top_logprobs:
            line["top_tokens"] = self._top_tokens(tok)
        if last:
            line["generated_text"] = self.full_text
            if self._wants_details():
                line["details"] = self._details(with_tokens=False)
        return self._frame(line)

    def _final_bytes(self) -> bytes:
        return b""

    def _error_bytes(self, message: str, code: int) -> bytes:
        if self.ctx.tgi_compat:
            return self._frame(tgi_error(message, code))
        line = {
            "token": ERROR_TOKEN,
            "generated_text": "",
            "details": self._error_details(),
            "error": message,
            "code": code,
        }
        return self._frame(line)
