"""A model.py's `@input_formatter` / `@output_formatter`, applied around the built-in handlers.

DJL lets a model folder change how the built-in engines read requests and write responses without
writing a `handle()`: the server looks for functions marked by `djl_python.input_parser.input_formatter`
and `djl_python.output_formatter.output_formatter` in `<model_dir>/model.py`. This module finds them
once at load time and applies them, so the handlers only call `format_input` / `format_output` /
`format_chunk` and stay unaware of user code. Without a model.py (or without the decorators) every
method is a no-op and nothing is re-encoded.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from handlers import loader
from handlers.builtin.formats.errors import RequestError
from handlers.codecs import json_compact
from handlers.djl_api import Input

log = logging.getLogger("handlers.builtin.custom_formatters")

SSE = "text/event-stream"
JSONLINES = "application/jsonlines"


class CustomFormatterError(Exception):
    """A custom formatter raised or returned something unusable; DJL answers 424 for it."""

    status_code = 424


@dataclass(frozen=True)
class CustomFormatters:
    """The model's custom formatters (either may be None)."""

    input_formatter: Callable[..., Any] | None = None
    output_formatter: Callable[..., Any] | None = None

    @classmethod
    def load(cls, model_dir: str | None) -> CustomFormatters:
        """Find the decorated functions in `<model_dir>/model.py`; none when there is no model.py."""
        try:
            module = loader.load_model_py(model_dir)
        except Exception as exc:  # user code failed to import: say which file and why, at load time
            raise loader.HandlerLoadError(
                f"{model_dir}/model.py could not be imported while looking for @input_formatter / "
                f"@output_formatter: {type(exc).__name__}: {exc}. Fix the file, or remove it if it is not "
                "meant for this model."
            ) from exc
        if module is None:
            return cls()
        found = cls(
            loader.find_decorated_function(module, "is_input_formatter"),
            loader.find_decorated_function(module, "is_output_formatter"),
        )
        if found.output_formatter is not None:
            _reject_per_token_formatter(found.output_formatter)
        if found.input_formatter or found.output_formatter:
            log.info(
                "Custom formatters from %s/model.py: input=%s output=%s",
                model_dir,
                getattr(found.input_formatter, "__name__", None),
                getattr(found.output_formatter, "__name__", None),
            )
        return found

    def format_input(self, item: Input, tokenizer: Any = None) -> dict[str, Any] | None:
        """The request body the input formatter makes of `item`; None when there is no input formatter.

        The body is decoded by content type first (`djl_python.encode_decode.decode`); an undecodable
        body is the client's error (RequestError, 400), a failing formatter the model's (424).
        """
        formatter = self.input_formatter
        if formatter is None:
            return None
        if _takes_raw_input(formatter):
            result = _call("input", formatter, item, tokenizer=tokenizer)
        else:
            from djl_python.encode_decode import decode

            try:
                payload = decode(item, item.get_property("Content-Type"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise RequestError(f"Cannot decode the request body: {exc}") from None
            result = _call("input", formatter, payload, tokenizer=tokenizer)
        return _request_body(result, formatter)

    def format_output(self, value: Any) -> bytes:
        """A whole response value → the bytes to send (JSON unless the formatter returned text/bytes)."""
        return _serialize(self._apply(value)) or b""

    def format_chunk(self, data: bytes, content_type: str) -> bytes:
        """Pass a generation response (whole JSON body, jsonlines or SSE bytes) through the output
        formatter one JSON object at a time, keeping the framing; non-JSON frames (`[DONE]`) pass as is."""
        if self.output_formatter is None or not data:
            return data
        if content_type == SSE:
            events = (self._event(e) for e in data.split(b"\n\n") if e)
            return b"".join(e + b"\n\n" for e in events if e is not None)
        if content_type == JSONLINES:
            lines = (self._json(line) for line in data.split(b"\n") if line)
            return b"".join(line + b"\n" for line in lines if line is not None)
        return self._json(data) or b""

    def _event(self, event: bytes) -> bytes | None:
        if not event.startswith(b"data: "):
            return event
        payload = self._json(event[len(b"data: ") :])
        return None if payload is None else b"data: " + payload

    def _json(self, raw: bytes) -> bytes | None:
        try:
            value = json.loads(raw)
        except ValueError:
            return raw
        return _serialize(self._apply(value))

    def _apply(self, value: Any) -> Any:
        if self.output_formatter is None:
            return value
        return _call("output", self.output_formatter, value)


def _call(kind: str, formatter: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run user code; any failure becomes a CustomFormatterError that names the function."""
    try:
        return formatter(*args, **kwargs)
    except Exception as exc:  # user code: report it, keep serving
        log.exception("Custom %s formatter %s failed", kind, formatter.__name__)
        raise CustomFormatterError(
            f"Custom {kind} formatter {formatter.__name__} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _serialize(value: Any) -> bytes | None:
    """None → nothing; bytes and str as they are; anything else compact JSON (numpy values allowed)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return json_compact(value)


def _request_body(result: Any, formatter: Callable[..., Any]) -> dict[str, Any]:
    """A dict as it is; DJL's TextInput (`input_text` + `parameters`) as the LMI body it stands for."""
    if isinstance(result, dict):
        return result
    if hasattr(result, "input_text"):
        parameters = dict(getattr(result, "parameters", None) or {})
        body: dict[str, Any] = {"inputs": result.input_text, "parameters": parameters}
        if "stream" in parameters:
            body["stream"] = parameters.pop("stream")
        return body
    raise CustomFormatterError(
        f"Custom input formatter {formatter.__name__} returned {type(result).__name__}; it must return the "
        'request body as a dict, e.g. {"inputs": "...", "parameters": {...}}.'
    )


def _first_parameter(function: Callable[..., Any]) -> inspect.Parameter | None:
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return None
    return parameters[0] if parameters else None


def _annotation_name(parameter: inspect.Parameter) -> str:
    annotation = parameter.annotation
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return text.rsplit(".", 1)[-1]


def _takes_raw_input(function: Callable[..., Any]) -> bool:
    """DJL's older input formatters take the `Input` itself (`input_item: Input`), not the decoded body."""
    first = _first_parameter(function)
    return first is not None and (first.name == "input_item" or _annotation_name(first) == "Input")


def _reject_per_token_formatter(function: Callable[..., Any]) -> None:
    """DJL's older output formatters are called per token with a RequestOutput; say so at load time."""
    first = _first_parameter(function)
    if first is None:
        return
    if first.name == "request_output" or _annotation_name(first) in ("RequestOutput", "TextGenerationOutput"):
        raise loader.HandlerLoadError(
            f"model.py's @output_formatter {function.__name__}({first.name}) takes DJL's per-token "
            "RequestOutput, which this server does not produce. Fix: take the response instead, "
            f"`def {function.__name__}(response_data: dict) -> dict`, which is called with each JSON "
            "body or stream line (see djl_python/output_formatter.py)."
        )
