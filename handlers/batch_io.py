"""Dynamic-batch plumbing: merge requests into DJL's one batched `Input`, split the `Output` back.

DJL hands a batched handler a single `Input` whose keys carry a `batch_NNN.` prefix, and expects one
`Output` whose content keys are `batch_{i}.<key>`. The server (`handlers.service`) needs both
directions, plus DJL's checks and error messages when a handler answers with the wrong shape. That
key grammar and those checks live here, so the handler API in `handlers.djl_api` stays free of it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from handlers.djl_api import Input, Output, PairList

if TYPE_CHECKING:
    from serving.messages import InferRequest

_BATCH_INPUT_KEY = re.compile(r"batch_(\d+)[._](.*)", re.DOTALL)
_BATCH_OUTPUT_KEY = re.compile(r"batch_(\d+)\.(.*)", re.DOTALL)
_BATCH_HEADER_KEY = re.compile(r"batch_(\d+)_(.*)", re.DOTALL)


class BatchSizeMismatch(ValueError):
    """The handler's batched Output does not map one-to-one onto the requests; DJL answers 400."""


# ---- Input: merge and split ----------------------------------------------------------------------


def make_batch(inputs: list[Input]) -> Input:
    """Merge requests into the single Input DJL sends for a dynamic batch.

    A one-element list is returned unwrapped, as DJL does, so handlers see no `batch_size`.
    """
    if not inputs:
        raise ValueError("make_batch needs at least one Input")
    if len(inputs) == 1:
        return inputs[0]
    batch = Input()
    batch.properties["batch_size"] = str(len(inputs))
    for i, request in enumerate(inputs):
        prefix = f"batch_{i:03d}."
        for key, value in request.properties.items():
            batch.properties[prefix + key] = value
        for key, value in request.content:
            batch.content.add(prefix + (key or "data"), value)
    return batch


def split_batch_input(batch: Input) -> list[Input]:
    """The body of `Input.get_batches`, kept here beside `make_batch`, whose key layout it reverses."""
    if not batch.is_batch():
        return [batch]
    requests = [Input() for _ in range(batch.get_batch_size())]
    for request in requests:
        request.function_name = batch.get_function_name()
    for key, value in batch.properties.items():
        if key == "batch_size":
            continue
        index, sub_key = _split_batch_key(key, len(requests))
        targets = requests if index is None else [requests[index]]
        for request in targets:
            request.properties[sub_key] = value
    for key, value in batch.content:
        index, sub_key = _split_batch_key(key, len(requests))
        targets = requests if index is None else [requests[index]]
        for request in targets:
            request.content.add(sub_key, value)
    return requests


def _split_batch_key(key: str, batch_size: int) -> tuple[int | None, str]:
    """`batch_007.foo` -> (7, "foo"); a key without the prefix -> (None, key), i.e. shared."""
    match = _BATCH_INPUT_KEY.fullmatch(key)
    if match is None:
        return None, key
    index = int(match.group(1))
    if index >= batch_size:
        raise ValueError(f"batch key {key!r} has index {index}, but batch_size is {batch_size}")
    return index, match.group(2)


# ---- Output: split -------------------------------------------------------------------------------


def split_batch_output(output: Output, batch_size: int) -> list[Output]:
    """Turn the handler's Output for a dynamic batch into one Output per request, as DJL does.

    Content `batch_{i}.<key>` goes to request i as `<key>`; code, message and shared properties
    are copied to every request; property `batch_{i}_<Header>` goes to request i only. A failed
    Output (code >= 300) is given whole to every request.
    """
    if batch_size == 1:
        return [output]
    if output.code >= 300:
        return [_copy_output(output) for _ in range(batch_size)]
    if output.content.size() != batch_size:
        raise BatchSizeMismatch(
            f"Batch output size mismatch, expected: {batch_size}, actual: {output.content.size()}"
        )
    results = [Output(output.code, output.message) for _ in range(batch_size)]
    _distribute_properties(output.properties, results)
    for key, value in output.content:
        index, sub_key = _split_output_key(key, batch_size)
        results[index].content.add(sub_key, value)
    return results


def _distribute_properties(properties: dict[str, str], results: list[Output]) -> None:
    """Shared properties first, so a per-request `batch_{i}_<Header>` wins over a shared one."""
    per_request = []
    for key, value in properties.items():
        match = _BATCH_HEADER_KEY.fullmatch(key)
        if match is None:
            for result in results:
                result.properties[key] = value
        elif int(match.group(1)) < len(results):  # a header for no request is dropped
            per_request.append((int(match.group(1)), match.group(2), value))
    for index, header, value in per_request:
        results[index].add_property(header, value)


def _split_output_key(key: str, batch_size: int) -> tuple[int, str]:
    match = _BATCH_OUTPUT_KEY.fullmatch(key)
    if match is None:
        raise BatchSizeMismatch(f"Unexpected batch output key: {key} (expected batch_<i>.<key>)")
    index = int(match.group(1))
    if index >= batch_size:
        raise BatchSizeMismatch(f"Batch output index {index} out of range for batch size {batch_size}")
    return index, match.group(2)


def _copy_output(output: Output) -> Output:
    """A copy whose properties and content can be changed without touching the original."""
    copy = Output(output.code, output.message)
    copy.properties = dict(output.properties)
    copy.content = PairList(pair_list=output.content)
    copy.stream_content = output.stream_content
    copy.stream_output_formatter = output.stream_output_formatter
    return copy


def request_input(request: InferRequest) -> Input:
    """One request as DJL's Input: what a handler (or a custom input formatter) reads."""
    item = Input()
    item.properties.update(request.properties)
    for key, value in request.content:
        item.content.add(key, value)
    return item
