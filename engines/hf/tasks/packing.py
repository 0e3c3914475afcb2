"""All inputs of a dynamic batch go through the model as one list; results go back per request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from engines.base import TaskRequest

T = TypeVar("T")


def all_inputs(requests: list[TaskRequest]) -> list[str]:
    return [text for request in requests for text in request.inputs]


def split_per_request(requests: list[TaskRequest], rows: Sequence[T]) -> list[Sequence[T]]:
    """Cut per-input rows (a list or a tensor) back into one slice per request, in order."""
    slices, offset = [], 0
    for request in requests:
        slices.append(rows[offset : offset + len(request.inputs)])
        offset += len(request.inputs)
    return slices
