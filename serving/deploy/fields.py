"""Typed reads from a parsed YAML mapping that collect problems instead of raising at the first.

A deploy spec is edited by hand and a failed deploy costs minutes, so one run names every bad field
at once, each by its path (``components[1].memory_mb``), with what was expected and what was found.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any


class SpecError(ValueError):
    """A deploy spec that cannot be used; ``problems`` holds one line per bad field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"{source}: invalid deploy spec:\n" + "\n".join(f"  {p}" for p in self.problems))


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing"


class Reader:
    """One mapping of the spec; every read records the key as known, ``finish`` flags the rest."""

    def __init__(self, data: Mapping[str, Any], path: str, problems: list[str]) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        self._read: set[str] = set()

    def at(self, key: str) -> str:
        """The field's path as messages show it."""
        return f"{self.path}.{key}" if self.path else key

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.at(key)}: {message}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def refuse(self, key: str, message: str) -> None:
        """A key that belongs elsewhere: say where, and do not also call it unknown."""
        self._read.add(key)
        self.problem(key, message)

    def _get(self, key: str, required: bool) -> Any:
        self._read.add(key)
        value = self.data.get(key)
        if value is None and required:
            self.problem(key, "required")
        return value

    def string(self, key: str, required: bool = False, pattern: str = "", hint: str = "") -> str | None:
        """A non-empty string; ``pattern`` (full match) and ``hint`` (what it should look like)."""
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            self.problem(key, f"expected a non-empty string, got {_shown(value)}")
            return None
        if pattern and not re.fullmatch(pattern, value):
            self.problem(key, f"{value!r} is not valid: {hint or 'expected ' + pattern}")
            return None
        return value

    def integer(
        self, key: str, minimum: int, maximum: int | None = None, default: int | None = None, unit: str = ""
    ) -> int | None:
        """An integer in [minimum, maximum]; YAML booleans and floats are refused, not converted."""
        value = self._get(key, required=False)
        if value is None:
            return default
        bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        in_range = isinstance(value, int) and value >= minimum and (maximum is None or value <= maximum)
        if isinstance(value, bool) or not in_range:
            self.problem(key, f"expected an integer {bounds}{unit}, got {_shown(value)}")
            return default
        return value

    def number(self, key: str, minimum: float) -> float | None:
        """An int or float >= minimum (fractions of CPU cores are allowed)."""
        value = self._get(key, required=False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= minimum:
            self.problem(key, f"expected a number >= {minimum}, got {_shown(value)}")
            return None
        return float(value)

    def mapping(self, key: str) -> Reader | None:
        value = self._get(key, required=False)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.problem(key, f"expected a mapping of keys to values, got {_shown(value)}")
            return None
        return Reader(value, self.at(key), self.problems)

    def mappings(self, key: str) -> list[Reader]:
        """A list of mappings, each read by its own Reader (``key[i]``)."""
        value = self._get(key, required=False)
        if value is None:
            return []
        if not isinstance(value, list) or not value:
            self.problem(key, f"expected a non-empty list, got {_shown(value)}")
            return []
        readers = []
        for index, item in enumerate(value):
            if isinstance(item, Mapping):
                readers.append(Reader(item, f"{self.at(key)}[{index}]", self.problems))
            else:
                self.problems.append(f"{self.at(key)}[{index}]: expected a mapping, got {_shown(item)}")
        return readers

    def finish(self) -> None:
        """Flag every key nothing read: a typo must not silently deploy a default."""
        known = sorted(self._read)
        for key in self.data:
            if key in self._read:
                continue
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            self.problem(str(key), f"unknown key ({hint})")
