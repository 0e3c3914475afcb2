"""`@output_formatter`: mark a model.py function that reshapes the built-in handler's responses.

Found by the attribute the decorator sets, as DJL does. The function gets each response object
before it is sent — the whole JSON body (`{"generated_text": ..., "details": ...}`, an OpenAI or TGI
body, a list of embeddings), or each line/event of a stream as a dict — and returns what to send
instead: a dict or list (sent as JSON in the same framing), a str or bytes (sent as they are), or
None to drop that stream line. Error bodies are not passed through it, so clients can still
recognise failures:

    @output_formatter
    def custom_output_formatter(response_data: dict) -> dict:
        return {**response_data, "model_version": "2024-06"}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def output_formatter(function: F) -> F:
    """Mark `function` as the model's custom output formatter."""
    function.is_output_formatter = True  # type: ignore[attr-defined]
    return function
