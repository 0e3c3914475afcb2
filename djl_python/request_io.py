"""`RequestInput` / `TextInput`: what DJL's older-style custom input formatters return.

Only the fields the built-in handler reads are modelled: `input_text` (a prompt or a list of
prompts) and `parameters`. Subclasses may add their own fields, as DJL's examples do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestInput:
    """One request as a custom input formatter describes it."""

    request_id: int | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    output_formatter: Any = None


@dataclass
class TextInput(RequestInput):
    """A text-generation request: the prompt(s) in `input_text`."""

    input_text: str | list[str] = ""
    adapters: Any = None
