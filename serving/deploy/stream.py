"""Turn a streamed response's bytes into the text of its tokens, as they arrive.

The bytes come in arbitrary pieces (HTTP chunks locally, ``PayloadPart`` events from SageMaker, which
may split a line anywhere), so lines are reassembled before parsing. Framing: LMI's jsonlines
(``{"token": {"text": ...}}``), server-sent events (``data: ...``, TGI and ``option.output_formatter=sse``)
and OpenAI chunks (``choices[0].delta.content`` or ``.text``). An error line is kept in ``error``.
"""

from __future__ import annotations

import json
from typing import Any

_SSE_FIELDS = (":", "event:", "id:", "retry:")


class TokenStream:
    """Feed byte pieces, get printable text; ``error`` holds the stream's error message, if any."""

    def __init__(self) -> None:
        self._pending = b""
        self.error: str | None = None

    def feed(self, piece: bytes) -> str:
        """The text of every line ``piece`` completes."""
        self._pending += piece
        *lines, self._pending = self._pending.split(b"\n")
        return "".join(self._line(line) for line in lines)

    def close(self) -> str:
        """The text of a last line without a newline."""
        rest, self._pending = self._pending, b""
        return self._line(rest)

    def _line(self, raw: bytes) -> str:
        text = raw.decode("utf-8", errors="replace").strip()
        if not text or text.startswith(_SSE_FIELDS):
            return ""
        if text.startswith("data:"):
            text = text[len("data:") :].strip()
        if text == "[DONE]":
            return ""
        try:
            frame = json.loads(text)
        except ValueError:
            return text + "\n"  # not JSON: show it as it came
        return self._text(frame)

    def _text(self, frame: Any) -> str:
        if not isinstance(frame, dict):
            return json.dumps(frame) + "\n"
        if frame.get("error"):
            error = frame["error"]
            self.error = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            return ""
        token = frame.get("token")
        if isinstance(token, dict):
            special = token.get("special") or token.get("special_token")  # TGI's and LMI's names
            return "" if special else str(token.get("text") or "")
        choices = frame.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            return str((choice.get("delta") or {}).get("content") or choice.get("text") or "")
        return json.dumps(frame) + "\n"
