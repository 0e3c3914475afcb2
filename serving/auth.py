"""The API key check: one before_request hook in front of every route, so no route can forget it.

Clients send ``Authorization: Bearer <key>`` (what the openai SDK sends for ``api_key=``) or
``X-Api-Key: <key>``. /ping stays open (SageMaker's health check carries no key), and so do
/openapi.json and, unless ``metrics_require_key``, /metrics. A refusal is a 401 in the route's dialect
with ``WWW-Authenticate: Bearer``; it is answered before the body is read.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping

from flask import Response, request

from serving.config import ServingConfig

log = logging.getLogger("serving.auth")

OPEN_PATHS = frozenset({"/ping", "/openapi.json"})
METRICS_PATH = "/metrics"
ErrorResponder = Callable[..., Response]
"""serving.app.error_response: (code, message, error_type, headers) → the error in the route's dialect."""


def open_paths(config: ServingConfig) -> frozenset[str]:
    """The routes answered without a key."""
    return OPEN_PATHS if config.metrics_require_key else OPEN_PATHS | {METRICS_PATH}


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: ``Authorization: Bearer <key>`` first, else ``X-Api-Key``."""
    scheme, _, value = headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("X-Api-Key", "").strip() or None


def key_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison, so response timing does not reveal how much of a guess was right."""
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


def api_key_hook(config: ServingConfig, respond: ErrorResponder) -> Callable[[], Response | None]:
    """A before_request hook: None lets the request through, a 401 response stops it."""
    expected, unguarded = config.api_key, open_paths(config)

    def require_api_key() -> Response | None:
        if expected is None or request.path in unguarded:
            return None
        presented = presented_key(request.headers)
        if key_matches(presented, expected):
            return None
        reason = "No API key" if presented is None else "Wrong API key"
        log.warning("%s %s -> 401 %s (client %s)", request.method, request.path, reason, request.remote_addr)
        message = (
            f"{reason}. Fix: send the header `Authorization: Bearer <key>` (or `X-Api-Key: <key>`) with the "
            "key the server was started with (SERVING_API_KEY or SERVING_API_KEY_FILE)."
        )
        return respond(401, message, "UnauthorizedException", {"WWW-Authenticate": "Bearer"})

    return require_api_key
