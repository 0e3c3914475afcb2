"""What handlers hand the worker loop: plain replies, turned into wire frames in one place (worker.py).

A handler never builds zmq frames. A whole answer is a ``Reply``; a stream is a ``StreamStart``, any
number of ``StreamChunk``s and one ``StreamEnd`` (whose ``error`` is set when the stream failed after
its head was sent, so the HTTP status could no longer change).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Usage:
    """What a generation request cost, on its last reply: for metrics and the access log."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    arrived: float = 0.0
    """time.monotonic() when the broker queued it (one clock for every process of the host)."""
    first_token_at: float = 0.0
    """time.monotonic() of its first generated token; 0.0 when none was generated."""


@dataclass
class Reply:
    """A complete answer: status, headers and body."""

    request_id: str
    code: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    message: str = "OK"
    usage: Usage | None = None


@dataclass
class StreamStart:
    request_id: str
    code: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class StreamChunk:
    request_id: str
    data: bytes


@dataclass
class StreamEnd:
    request_id: str
    error: str = ""
    usage: Usage | None = None


AnyReply = Reply | StreamStart | StreamChunk | StreamEnd
