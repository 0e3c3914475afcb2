"""``chat.completion`` / ``chat.completion.chunk`` objects for chat requests."""

from __future__ import annotations

from typing import Any

from handlers.builtin.formats.openai_writer import OpenAIWriter, logprob_or_missing
from handlers.builtin.formats.writer import Choice, Tok


def chat_token(tok: Tok) -> dict[str, Any]:
    return {"token": tok.text, "logprob": logprob_or_missing(tok.logprob), "bytes": list(tok.text.encode())}


def chat_logprobs(tokens: list[Tok]) -> dict[str, Any]:
    """Per-token logprobs, each with its most likely alternatives (``top_logprobs`` of them)."""
    content = [{**chat_token(tok), "top_logprobs": [chat_token(alt) for alt in tok.top]} for tok in tokens]
    return {"content": content, "refusal": None}


class ChatWriter(OpenAIWriter):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def _delta_choice(self, choice: Choice, tok: Tok | None, last: bool) -> dict[str, Any] | None:
        delta: dict[str, Any] = {"role": "assistant"} if choice.chunks_sent == 0 else {}
        text = tok.text if tok else ""
        want_logprobs = self.parsed.logprobs is not None and tok is not None
        if text or delta or want_logprobs:
            delta["content"] = text
        if not (delta or last):
            return None
        logprobs = chat_logprobs([tok]) if want_logprobs else None
        return {
            "index": choice.index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": self._finish_or_none(choice, last),
        }

    def _full_choice(self, choice: Choice, index: int) -> dict[str, Any]:
        logprobs = None
        if self.parsed.logprobs is not None:
            logprobs = chat_logprobs(choice.tokens)
        return {
            "index": index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": logprobs,
            "finish_reason": self._finish_or_none(choice, True),
        }
