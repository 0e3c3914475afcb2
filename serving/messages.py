"""Plain data crossing the HTTP-front ↔ broker ↔ model-worker boundaries, and their zmq framing.

All three endpoints are processes of this server on the same host, talking over Unix sockets in a
private 0700 folder, so pickle is an acceptable codec here.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field

from serving.dialects import Api

# Frame kinds (first zmq frame after any routing identity).
REQ = b"req"  # front → broker → worker: an InferRequest (worker receives a list as BATCH)
BATCH = b"batch"
CANCEL = b"cancel"  # front → broker → worker: request id
STATUS = b"status"  # front ↔ broker: health snapshot as JSON
MANAGE = b"manage"  # front ↔ broker: key, a management command as JSON; the reply (serving.management)
RESP = b"resp"  # worker → broker → front: request id, a complete InferResponse
START = b"start"  # streaming head: request id, InferResponse with an empty body
CHUNK = b"chunk"  # streaming body part: request id, bytes
END = b"end"  # stream finished: request id, b"" or an error message
ERR = b"err"  # broker → front: request id, ServingError body as JSON
READY = b"ready"  # worker → broker: model loaded
LOAD_FAILED = b"loadfail"  # worker → broker: model failed to load, with the reason
DONE = b"done"  # worker → broker: the current batch is finished, worker is idle
USAGE = b"usage"  # worker → broker → front, just before a terminal frame: request id, JSON (access log)

TERMINAL = (RESP, END, ERR)

LOAD_FAILED_EXIT_CODE = 3
"""A worker exits with this code after sending LOAD_FAILED with its reason."""


@dataclass
class InferRequest:
    """One HTTP request as the handler will see it (DJL Input: properties + content pairs)."""

    request_id: str
    properties: dict[str, str]
    content: list[tuple[str, bytes]]
    api: Api = Api.LMI
    """The route family, set once by the route: how the worker parses the body and shapes answers."""
    deadline: float | None = None
    """time.monotonic() (one clock for every process of the host) after which the broker has already
    answered 504: set by the broker, so a worker that queues the request does not wait longer."""
    model: str | None = None
    """The model it names (path or ``model_name``); None: the default model (serving.registry)."""
    arrived: float | None = None
    """time.monotonic() when the broker queued it: the start of queue wait and time to first token."""


@dataclass
class InferResponse:
    """One handler result for one request (DJL Output flattened to what HTTP needs)."""

    code: int = 200
    message: str = "OK"
    properties: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def dumps(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> object:
    return pickle.loads(data)  # noqa: S301 - only our own processes write these sockets


def error_payload(status: int, error_type: str, message: str) -> bytes:
    return json.dumps({"code": status, "type": error_type, "message": message}).encode()
