"""The API a request came by, set once by its route, and the one error policy of each dialect.

Every layer that can fail a request (the HTTP front's 400/404/413, the broker's 503/504, the model
worker's 400/424/500) answers through ``error_reply``, so a client of one dialect always gets that
dialect's body and status, whatever layer failed:

* LMI ``{"code", "type", "message", "error"}``: DJL's handler-failure keys plus the server error type.
* OpenAI ``{"error": {"message", "type", "param", "code"}}``, what the openai SDK raises from;
  a full queue is 429 (the SDK's RateLimitError, which it retries with back-off).
* TGI ``{"error", "error_type"}`` with TGI's statuses: 422 validation, 429 overloaded, 424 generation.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from serving.errors import QueueFull

QUEUE_FULL_TYPE = QueueFull.error_type
"""The error type of a request refused because the bounded queue is full."""


class Api(str, Enum):
    """The route family a request came by; the worker parses the body and shapes the answer by it."""

    LMI = "invocations"
    """/invocations, /predictions/{model}, /models/{model}/invoke: LMI bodies (or OpenAI chat bodies)."""
    OPENAI_COMPLETIONS = "v1/completions"
    OPENAI_CHAT = "v1/chat/completions"
    TGI_GENERATE = "generate"
    TGI_STREAM = "generate_stream"
    TGI_COMPAT = "tgi-compat"
    """POST /, the route TGI's Python client posts to: LMI-style bodies, TGI-shaped answers."""

    @property
    def dialect(self) -> str:
        """ "lmi", "openai" or "tgi": which error policy and which client library this route serves."""
        if self in (Api.OPENAI_COMPLETIONS, Api.OPENAI_CHAT):
            return "openai"
        if self in (Api.TGI_GENERATE, Api.TGI_STREAM, Api.TGI_COMPAT):
            return "tgi"
        return "lmi"


ROUTE_APIS = {
    "/v1/completions": Api.OPENAI_COMPLETIONS,
    "/v1/chat/completions": Api.OPENAI_CHAT,
    "/generate": Api.TGI_GENERATE,
    "/generate_stream": Api.TGI_STREAM,
    "/": Api.TGI_COMPAT,
}
"""The dialect routes besides the LMI ones (which all map to Api.LMI)."""

TGI_ERROR_TYPES = {400: "validation", 413: "validation", 422: "validation", 429: "overloaded"}


def openai_error(message: str, code: int) -> dict[str, Any]:
    """The error object the openai SDK raises from (also in-stream: ``data: {"error": ...}``)."""
    if code == 429:
        kind = "rate_limit_exceeded"
    elif 400 <= code < 500 and code != 424:
        kind = "invalid_request_error"
    else:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def tgi_error(message: str, code: int) -> dict[str, str]:
    """TGI's error body; the text_generation client maps error_type to its exception classes."""
    return {"error": message, "error_type": TGI_ERROR_TYPES.get(code, "generation")}


def lmi_error(message: str, code: int, error_type: str = "") -> dict[str, Any]:
    return {"code": code, "type": error_type or _lmi_type(code), "message": message, "error": message}


def _lmi_type(code: int) -> str:
    return {400: "BadRequestException", 424: "InvokeHandlerFailure"}.get(code, "ServingException")


def reply_status(api: Api, code: int, error_type: str = "") -> int:
    """The status a dialect's clients expect for an error our layers report as ``code``."""
    if api.dialect == "lmi":
        return code
    if error_type == QUEUE_FULL_TYPE or code == 429:
        return 429
    if api.dialect == "openai" and code == 424:
        return 500  # a failed generation is a server error to OpenAI clients
    if api.dialect == "tgi":
        if code == 400:
            return 422
        if code in (424, 500):
            return 424
    return code


def error_reply(api: Api, code: int, message: str, error_type: str = "") -> tuple[int, dict[str, Any]]:
    """(status, JSON body) for a request of ``api`` that failed with ``code`` before any output."""
    status = reply_status(api, code, error_type)
    if api.dialect == "openai":
        return status, openai_error(message, status)
    if api.dialect == "tgi":
        return status, tgi_error(message, status)
    return status, lmi_error(message, status, error_type)


def api_for_path(path: str) -> Api:
    """The API of a request path (unknown paths answer in the LMI dialect)."""
    return ROUTE_APIS.get(path, Api.LMI)
