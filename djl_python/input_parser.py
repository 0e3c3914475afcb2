"""`@input_formatter`: mark a model.py function that reshapes requests for the built-in handler.

The server finds the function by the attribute the decorator sets (as DJL does), so model.py needs
no `handle()` and serving.properties needs no setting. The function gets the decoded request body
(`djl_python.encode_decode.decode`: a JSON body as a dict) and `tokenizer=`, and returns the dict the
built-in handler then parses as an LMI, OpenAI or TGI body:

    @input_formatter
    def custom_input_formatter(decoded_payload: dict, tokenizer=None, **kwargs) -> dict:
        return {"inputs": decoded_payload["prompt"], "parameters": {"max_new_tokens": 64}}

DJL's older form, `def f(input_item: Input, **kwargs) -> RequestInput` (a first parameter named
`input_item` or annotated `Input`), gets the raw `Input` and may return a dict or a
`djl_python.request_io.TextInput`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def input_formatter(function: F) -> F:
    """Mark `function` as the model's custom input formatter."""
    function.is_input_formatter = True  # type: ignore[attr-defined]
    return function
