"""``text_completion`` objects for /v1/completions (same shape streamed and not, as in OpenAI)."""

from __future__ import annotations

from typing import Any

from handlers.builtin.formats.openai_writer import OpenAIWriter, logprob_or_missing
from handlers.builtin.formats.writer import Choice, Tok


def top_entries(tok: Tok) -> dict[str, float]:
    """The sampled token and the most likely ones, text -> log-probability (up to ``logprobs`` + 1
    entries, as OpenAI documents)."""
    entries = {tok.text: logprob_or_missing(tok.logprob)}
    for alt in tok.top:
        entries.setdefault(alt.text, logprob_or_missing(alt.logprob))
    return entries


def completion_logprobs(tokens: list[Tok], offset: int) -> dict[str, Any]:
    """Legacy logprobs block; ``offset`` is the character position of the first token in ``text``."""
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [logprob_or_missing(t.logprob) for t in tokens],
        "top_logprobs": [top_entries(t) for t in tokens],
        "text_offset": offsets,
    }


class CompletionWriter(OpenAIWriter):
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl-"

    def _echo(self) -> str:
        return self.ctx.prompt_text if self.parsed.return_full_text else ""

    def _delta_choice(self, choice: Choice, tok: Tok | None, last: bool) -> dict[str, Any] | None:
        text = tok.text if tok else ""
        if choice.chunks_sent == 0:
            text = self._echo() + text
        want_logprobs = self.parsed.logprobs is not None and tok is not None
        if not (text or last or want_logprobs):
            return None
        logprobs = None
        if want_logprobs:
            offset = len(self.full_text_of(choice)) - len(tok.text)
            logprobs = completion_logprobs([tok], offset)
        return {
            "index": choice.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": self._finish_or_none(choice, last),
        }

    def _full_choice(self, choice: Choice, index: int) -> dict[str, Any]:
        logprobs = None
        if self.parsed.logprobs is not None:
            logprobs = completion_logprobs(choice.tokens, len(self._echo()))
        return {
            "index": index,
            "text": self.full_text_of(choice),
            "logprobs": logprobs,
            "finish_reason": self._finish_or_none(choice, True),
        }
