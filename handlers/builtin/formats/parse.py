"""One entry point from (route, body) to a ParsedRequest, so the worker needs no per-API branching."""

from __future__ import annotations

import json
from typing import Any

from handlers.builtin.formats.errors import RequestError
from handlers.builtin.formats.lmi_request import parse_lmi
from handlers.builtin.formats.openai_request import parse_chat, parse_completion
from handlers.builtin.formats.request import ParsedRequest
from handlers.builtin.formats.tgi_request import parse_tgi

ROUTES = ("invocations", "v1/completions", "v1/chat/completions", "generate", "generate_stream")


def decode_body(body: bytes | str | dict[str, Any]) -> dict[str, Any]:
    """A JSON object, or RequestError saying what was wrong with the bytes."""
    if isinstance(body, dict):
        return body
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"Request body is not valid JSON ({exc}); send a JSON object.") from None
    if not isinstance(value, dict):
        raise RequestError(f"Request body must be a JSON object, got {type(value).__name__}.")
    return value


def parse_request(route: str, body: bytes | str | dict[str, Any]) -> ParsedRequest:
    """Parse a body for ``route`` (see ROUTES; leading "/" optional).

    /v1/chat/completions without ``messages`` is read as an LMI body, as DJL-Serving routes it like
    /invocations.
    """
    route = route.strip("/")
    data = decode_body(body)
    if route == "invocations" or (route == "v1/chat/completions" and "messages" not in data):
        return parse_lmi(data)
    if route == "v1/chat/completions":
        return parse_chat(data)
    if route == "v1/completions":
        return parse_completion(data)
    if route in ("generate", "generate_stream"):
        return parse_tgi(data, stream=route == "generate_stream")
    raise ValueError(f"unknown route {route!r}; expected one of {', '.join(ROUTES)}")
