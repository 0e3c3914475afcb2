"""``chat.completion`` / ``chat.completion.chunk`` objects for chat requests."""

from __future__ import annotations

from typing import Any

from handlers.builtin.formats.openai_writer import MISSING_LOGPROB, OpenAIWriter
from handlers.builtin.formats.writer import Tok


def chat_logprobs(tokens: list[Tok], top: int) -> dict[str, Any]:
    """Per-token logprobs; ``top_logprobs`` can only repeat the sampled token (the one we computed)."""
    content = []
    for tok in tokens:
        entry = {
            "token": tok.text,
            "logprob": MISSING_LOGPROB if tok.logprob is None else tok.logprob,
            "bytes": list(tok.text.encode("utf-8")),
        }
        content.append({**entry, "top_logprobs": [entry] if top else []})
    return {"content": content, "refusal": None}


class ChatWriter(OpenAIWriter):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def _delta_choice(self, tok: Tok | None, last: bool) -> dict[str, Any] | None:
        delta: dict[str, Any] = {"role": "assistant"} if self._chunks_sent == 0 else {}
        text = tok.text if tok else ""
        want_logprobs = self.parsed.logprobs is not None and tok is not None
        if text or delta or want_logprobs:
            delta["content"] = text
        if not (delta or last):
            return None
        logprobs = chat_logprobs([tok], self.parsed.logprobs or 0) if want_logprobs else None
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": self._finish_or_none(last)}

    def _full_choice(self) -> dict[str, Any]:
        logprobs = None
        if self.parsed.logprobs is not None:
            logprobs = chat_logprobs(self.tokens, self.parsed.logprobs)
        return {
            "index": 0,
            "message": {"role": "assistant", "content": self.generated_text},
            "logprobs": logprobs,
            "finish_reason": self._finish_or_none(True),
        }
