"""One small class per endpoint API: the request body, and parsing its stream into token timestamps.

Pure (no networking) so the parsers can be tested on canned bytes; ``transport`` does the HTTP. Every
way a request can go wrong ends as ``Outcome.error`` (a short kind such as ``"in_band"``), never as an
exception, so one bad request cannot stop a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class Outcome:
    """What happened to one request; times are ``time.perf_counter()`` seconds."""

    start: float
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)
    """Arrival time of every stream event that carried generated text (one per token for these APIs)."""
    usage_tokens: int | None = None
    """The server's own count (OpenAI usage chunk), preferred over counting events when present."""
    prompt_tokens: int = 0
    done: bool = False
    """The stream's terminal marker was seen ([DONE], or the line/event with generated_text)."""
    error: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    def fail(self, kind: str, detail: Any = "") -> None:
        if self.error is None:  # the first failure is the cause; later ones are consequences
            self.error, self.detail = kind, str(detail)[:300]


class LineSplitter:
    """Reassembles lines from arbitrary network chunks (a JSON line may arrive in pieces)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        return lines

    def flush(self) -> list[bytes]:
        rest, self._buf = self._buf, b""
        return [rest] if rest.strip() else []


class Api:
    """Framing shared by all: JSON lines, optionally SSE-framed (``data: {...}``), ``[DONE]`` terminal."""

    name: ClassVar[str] = ""
    path: ClassVar[str] = ""

    def body(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        raise NotImplementedError

    def on_message(self, msg: dict[str, Any], out: Outcome, now: float) -> None:
        raise NotImplementedError

    def feed_line(self, raw: bytes, out: Outcome, now: float) -> None:
        line = raw.strip()
        if not line or line.startswith((b":", b"event:", b"id:", b"retry:")):
            return
        if line.startswith(b"data:"):
            line = line[5:].strip()
        if line == b"[DONE]":
            out.done = True
            return
        try:
            msg = json.loads(line)
        except ValueError:
            out.fail("bad_stream", line[:200].decode("utf-8", "replace"))
            return
        if not isinstance(msg, dict):
            out.fail("bad_stream", msg)
        elif msg.get("error"):  # LMI, OpenAI and TGI all put in-band errors under "error"
            out.fail("in_band", msg["error"])
        else:
            self.on_message(msg, out, now)

    def finish(self, out: Outcome, max_new_tokens: int) -> None:
        """After the stream ended: a missing terminal marker or a short generation is a failure."""
        if out.ok and not out.done:
            out.fail("incomplete", "the stream ended without its final message")
        elif out.ok and out.tokens < max_new_tokens:
            out.fail("short", f"{out.tokens} tokens, asked for {max_new_tokens}")


def _real_token(token: Any) -> bool:
    """Servers put a placeholder token (id -1) on a final line that carries no new token."""
    if not isinstance(token, dict):
        return False
    token_id = token.get("id")
    return not isinstance(token_id, int) or token_id >= 0


class LmiApi(Api):
    """POST /invocations, ``application/jsonlines``: a ``{"token": ...}`` line per token; the last adds
    generated_text; an error line has ``details.finish_reason == "error"``."""

    name, path = "lmi", "/invocations"

    def body(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        params = {"max_new_tokens": max_new_tokens, "ignore_eos": True}
        return {"inputs": prompt, "parameters": params, "stream": True}

    def on_message(self, msg: dict[str, Any], out: Outcome, now: float) -> None:
        if (msg.get("details") or {}).get("finish_reason") == "error":
            out.fail("in_band", msg.get("details"))
            return
        if _real_token(msg.get("token")):
            out.token_times.append(now)
        if msg.get("generated_text") is not None:
            out.done = True


class TgiApi(Api):
    """POST /generate_stream (SSE). TGI has no ignore_eos: it is sent only if the server accepted it."""

    name, path = "tgi", "/generate_stream"

    def __init__(self, ignore_eos: bool = False) -> None:
        self.ignore_eos = ignore_eos

    def body(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        params: dict[str, Any] = {"max_new_tokens": max_new_tokens, "details": True}
        if self.ignore_eos:
            params["ignore_eos"] = True
        return {"inputs": prompt, "parameters": params}

    def on_message(self, msg: dict[str, Any], out: Outcome, now: float) -> None:
        if _real_token(msg.get("token")):
            out.token_times.append(now)
        if msg.get("generated_text") is not None:
            out.done = True


class OpenAICompletionsApi(Api):
    """POST /v1/completions (SSE, ``data: [DONE]``); the usage chunk gives the server's token count."""

    name, path = "openai-completions", "/v1/completions"

    def __init__(self, model: str) -> None:
        self.model = model

    def body(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        return {"model": self.model, "prompt": prompt, **self._common(max_new_tokens)}

    @staticmethod
    def _common(max_new_tokens: int) -> dict[str, Any]:
        """temperature 0: greedy, like LMI's and TGI's defaults, so the APIs compare like for like."""
        return {
            "max_tokens": max_new_tokens,
            "temperature": 0.0,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }

    @staticmethod
    def text_of(choice: dict[str, Any]) -> str:
        return choice.get("text") or ""

    def on_message(self, msg: dict[str, Any], out: Outcome, now: float) -> None:
        usage = msg.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            out.usage_tokens = usage["completion_tokens"]
        if any(isinstance(c, dict) and self.text_of(c) for c in msg.get("choices") or []):
            out.token_times.append(now)


class OpenAIChatApi(OpenAICompletionsApi):
    """POST /v1/chat/completions: the prompt as one user message; text arrives in ``delta.content``."""

    name, path = "openai-chat", "/v1/chat/completions"

    def body(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        messages = [{"role": "user", "content": prompt}]
        return {"model": self.model, "messages": messages, **self._common(max_new_tokens)}

    @staticmethod
    def text_of(choice: dict[str, Any]) -> str:
        delta = choice.get("delta") or {}
        return delta.get("content") or delta.get("reasoning_content") or ""


API_NAMES = ("lmi", "openai-completions", "openai-chat", "tgi")


def make_api(name: str, model: str = "", tgi_ignore_eos: bool = False) -> Api:
    if name == "lmi":
        return LmiApi()
    if name == "tgi":
        return TgiApi(tgi_ignore_eos)
    if name == "openai-completions":
        return OpenAICompletionsApi(model)
    if name == "openai-chat":
        return OpenAIChatApi(model)
    raise ValueError(f"unknown --api {name!r}; choose from {', '.join(API_NAMES)}")
