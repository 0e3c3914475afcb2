"""``text_completion`` objects for /v1/completions (same shape streamed and not, as in OpenAI)."""

from __future__ import annotations

from typing import Any

from handlers.builtin.formats.openai_writer import MISSING_LOGPROB, OpenAIWriter
from handlers.builtin.formats.writer import Tok


def completion_logprobs(tokens: list[Tok], offset: int, top: int) -> dict[str, Any]:
    """Legacy logprobs block; ``offset`` is the character position of the first token in ``text``."""
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok.text)
    values = [MISSING_LOGPROB if t.logprob is None else t.logprob for t in tokens]
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": values,
        "top_logprobs": [{t.text: v} for t, v in zip(tokens, values, strict=True)] if top else None,
        "text_offset": offsets,
    }


class CompletionWriter(OpenAIWriter):
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl-"

    def _echo(self) -> str:
        return self.ctx.prompt_text if self.parsed.return_full_text else ""

    def _delta_choice(self, tok: Tok | None, last: bool) -> dict[str, Any] | None:
        text = tok.text if tok else ""
        if self._chunks_sent == 0:
            text = self._echo() + text
        want_logprobs = self.parsed.logprobs is not None and tok is not None
        if not (text or last or want_logprobs):
            return None
        logprobs = None
        if want_logprobs:
            offset = len(self.full_text) - len(tok.text)
            logprobs = completion_logprobs([tok], offset, self.parsed.logprobs or 0)
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": self._finish_or_none(last)}

    def _full_choice(self) -> dict[str, Any]:
        logprobs = None
        if self.parsed.logprobs is not None:
            logprobs = completion_logprobs(self.tokens, len(self._echo()), self.parsed.logprobs)
        return {
            "index": 0,
            "text": self.full_text,
            "logprobs": logprobs,
            "finish_reason": self._finish_or_none(True),
        }
