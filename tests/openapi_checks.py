"""Checking bodies against the server's OpenAPI document (serving/openapi.py) with jsonschema."""

from __future__ import annotations

import json
import re
from typing import Any

from jsonschema import Draft202012Validator

AUTOMATIC_METHODS = {"HEAD", "OPTIONS"}
"""Methods Flask adds to every rule by itself; the document describes the ones routes declare."""


def validator(document: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    """A validator for ``schema``, whose ``#/components/...`` references resolve in ``document``."""
    return Draft202012Validator({**schema, "components": document["components"]})


def check(document: dict[str, Any], schema: dict[str, Any], value: Any) -> None:
    """Raise with every violation listed when ``value`` does not match ``schema``."""
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator(document, schema).iter_errors(value)]
    assert not errors, f"{json.dumps(value)[:800]} does not match {schema}:\n" + "\n".join(errors[:10])


def media(document: dict[str, Any], path: str, method: str, status: int, content_type: str) -> dict[str, Any]:
    """The documented media object of one answer (KeyError when it is not documented)."""
    responses = document["paths"][path][method.lower()]["responses"]
    content = responses[str(status)]["content"]
    return content[content_type.split(";")[0].strip()]


def stream_items(body: str, content_type: str) -> list[Any]:
    """The JSON documents of a jsonlines or SSE body (SSE's ``[DONE]`` left out)."""
    if content_type.startswith("text/event-stream"):
        lines = [line[len("data:") :].strip() for line in body.splitlines() if line.startswith("data:")]
        return [json.loads(line) for line in lines if line != "[DONE]"]
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def check_answer(
    document: dict[str, Any], path: str, method: str, status: int, content_type: str, body: str
) -> int:
    """Validate a whole answer against its documented schema; returns how many documents were checked."""
    entry = media(document, path, method, status, content_type)
    if "x-itemSchema" in entry:
        items = stream_items(body, content_type)
        assert items, f"an empty stream: {body!r}"
        for item in items:
            check(document, entry["x-itemSchema"], item)
        return len(items)
    check(document, entry["schema"], json.loads(body) if "json" in content_type else body)
    return 1


def rule_path(rule: str) -> str:
    """A Flask rule (``/predictions/<model>``) as an OpenAPI path (``/predictions/{model}``)."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)
