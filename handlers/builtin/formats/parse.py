"""One entry point from (API, body) to a ParsedRequest, so the worker needs no per-API branching."""

from __future__ import annotations

import json
from typing import Any

from handlers.builtin.formats.errors import RequestError
from handlers.builtin.formats.lmi_request import parse_lmi
from handlers.builtin.formats.openai_request import parse_chat, parse_completion
from handlers.builtin.formats.request import ParsedRequest
from handlers.builtin.formats.tgi_request import parse_tgi
from serving.dialects import Api


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


def parse_request(api: Api, body: bytes | str | dict[str, Any]) -> ParsedRequest:
    """Parse a body for the route's ``api`` (serving.dialects.Api, set once by the route).

    /v1/chat/completions without ``messages`` is read as an LMI body, as DJL-Serving routes it like
    /invocations; TGI's root route (``Api.TGI_COMPAT``) takes LMI bodies too.
    """
    data = decode_body(body)
    if api in (Api.LMI, Api.TGI_COMPAT) or (api is Api.OPENAI_CHAT and "messages" not in data):
        return parse_lmi(data)
    if api is Api.OPENAI_CHAT:
        return parse_chat(data)
    if api is Api.OPENAI_COMPLETIONS:
        return parse_completion(data)
    return parse_tgi(data, stream=api is Api.TGI_STREAM)
