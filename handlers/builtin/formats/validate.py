"""Typed, range-checked reads from a JSON object; every failure names the field, the value and the fix."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from handlers.builtin.formats.errors import RequestError

SEED_LIMIT = 2**64


def qualified(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _is_neutral(value: Any, allowed: tuple) -> bool:
    """True == 1 in Python; compare the bool-ness too so ``n: true`` is not taken for ``n: 1``."""
    if value is None:
        return True
    return any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


def check_fields(
    data: Mapping[str, Any],
    where: str,
    supported: Iterable[str],
    ignored: Iterable[str] = (),
    neutral: Mapping[str, tuple] | None = None,
) -> None:
    """Reject unknown names, so a typo (``max_new_token``) fails loudly instead of silently using a default.

    ``ignored`` names are accepted with any value and have no effect; ``neutral`` names are accepted only
    with a value that asks for nothing we would have to fake (e.g. ``n: 1``).
    """
    supported, ignored, neutral = set(supported), set(ignored), dict(neutral or {})
    for key, value in data.items():
        if key in supported or key in ignored:
            continue
        if key in neutral:
            if _is_neutral(value, neutral[key]):
                continue
            options = " or ".join(["null", *(repr(a) for a in neutral[key])])
            raise RequestError(
                f"`{qualified(where, key)}`={value!r} is not supported by this server; "
                f"remove it or set it to {options}."
            )
        names = ", ".join(sorted(supported | set(neutral)))
        raise RequestError(f"Unknown field `{qualified(where, key)}`. Supported fields: {names}.")


def get_bool(data: Mapping[str, Any], name: str, where: str, default: bool) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"`{qualified(where, name)}` must be true or false, got {value!r}.")
    return value


def get_str(data: Mapping[str, Any], name: str, where: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise RequestError(f"`{qualified(where, name)}` must be a string, got {value!r}.")
    return value


def get_int(
    data: Mapping[str, Any],
    name: str,
    where: str,
    default: int | None,
    minimum: int | None = None,
    maximum: int | None = None,
    hint: str = "",
) -> int | None:
    value = data.get(name)
    if value is None:
        return default
    field = qualified(where, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"`{field}` must be an integer, got {value!r}.")
    hint = " " + hint if hint else ""
    if minimum is not None and value < minimum:
        raise RequestError(f"`{field}` must be >= {minimum}, got {value!r}.{hint}")
    if maximum is not None and value > maximum:
        raise RequestError(f"`{field}` must be <= {maximum}, got {value!r}.{hint}")
    return value


def get_float(
    data: Mapping[str, Any],
    name: str,
    where: str,
    default: float | None,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    hint: str = "",
) -> float | None:
    value = data.get(name)
    if value is None:
        return default
    field = qualified(where, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"`{field}` must be a finite number, got {value!r}.")
    bounds = [(gt, ">", lambda v, b: v > b), (ge, ">=", lambda v, b: v >= b), (le, "<=", lambda v, b: v <= b)]
    if all(b is None or ok(value, b) for b, _, ok in bounds):
        return float(value)
    rule = " and ".join(f"{op} {b:g}" for b, op, _ in bounds if b is not None)
    raise RequestError(f"`{field}` must be {rule}, got {value!r}.{' ' + hint if hint else ''}")


def get_stop(data: Mapping[str, Any], name: str, where: str) -> tuple[str, ...]:
    """Stop strings: one string or a list of non-empty strings."""
    value = data.get(name)
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise RequestError(
            f"`{qualified(where, name)}` must be a non-empty string or a list of non-empty strings, "
            f"got {value!r}."
        )
    return tuple(items)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def get_token_ids(data: Mapping[str, Any], name: str, where: str) -> tuple[int, ...]:
    """A list of token ids (non-negative integers), duplicates dropped."""
    value = data.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(_is_token_id(v) for v in value):
        raise RequestError(
            f"`{qualified(where, name)}` must be a list of token ids (integers >= 0), got {value!r}."
        )
    return tuple(dict.fromkeys(value))


def get_logit_bias(
    data: Mapping[str, Any], name: str, where: str, limit: float
) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"<token id>": bias}`` map as sorted (id, bias) pairs; each bias within +-limit."""
    value = data.get(name)
    if value is None:
        return ()
    field = qualified(where, name)
    if not isinstance(value, dict):
        raise RequestError(f'`{field}` must map token ids to biases, e.g. {{"50256": -100}}, got {value!r}.')
    pairs: dict[int, float] = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise RequestError(
                f'`{field}` key {key!r} is not a token id; use token ids as strings, e.g. "50256".'
            )
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -limit <= bias <= limit:
            raise RequestError(
                f'`{field}["{key}"]` must be a number from {-limit:g} to {limit:g}, got {bias!r}.'
            )
        pairs[int(key)] = float(bias)
    return tuple(sorted(pairs.items()))


def get_object(data: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"`{qualified(where, name)}` must be a JSON object, got {value!r}.")
    return value


def get_prompt(body: dict[str, Any], name: str = "inputs") -> str:
    """One non-empty prompt string; a list gets a message saying how to send it instead."""
    value = body.get(name)
    if value is None:
        hint = ' Send {"inputs": "<prompt>", "parameters": {...}}' if name == "inputs" else ""
        raise RequestError(f"Missing `{name}`: the prompt text is required.{hint}")
    if isinstance(value, list):
        raise RequestError(
            f"`{name}` is a list of {len(value)} prompts; this endpoint takes one prompt per request. "
            "Send each prompt as its own request (concurrent requests are batched on the server)."
        )
    if not isinstance(value, str) or not value:
        raise RequestError(f"`{name}` must be a non-empty string, got {value!r}.")
    return value
