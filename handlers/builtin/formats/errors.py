"""The one exception the format layer raises for bad client input."""

from __future__ import annotations


class RequestError(ValueError):
    """The request body is invalid; the message names the field, the value and the fix (HTTP 400)."""

    status = 400
