"""Validation helpers for request parameters: bad values fail with the name, the value and what is allowed.

Booleans are rejected where numbers are expected (JSON `true` is not `1`), and unknown parameter names
are rejected so that typos do not silently fall back to defaults.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from engines.base import RequestError


def invalid(name: str, value: Any, allowed: str) -> RequestError:
    return RequestError(f"Invalid parameter {name}={value!r}: expected {allowed}.")


def reject_unknown(parameters: Mapping[str, Any], known: Collection[str], task: str) -> None:
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise RequestError(f"Unsupported parameter(s) {unknown} for {task}; supported: {sorted(known)}.")


def as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid(name, value, "true or false")
    return value


def as_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    in_range = isinstance(value, int) and value >= minimum and (maximum is None or value <= maximum)
    if isinstance(value, bool) or not in_range:
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise invalid(name, value, f"an integer >= {minimum}{upper}")
    return value
