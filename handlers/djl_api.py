"""The DJL handler API: `Input`, `Output` and `PairList`, the objects `handle(inputs) -> Output` works with.

This is the one module user code depends on (through `djl_python`), so its method names, defaults
and error messages follow `djl_python` and must not drift: existing `model.py` files run unchanged.
The byte formats behind `get_as_*`/`add_as_*` live in `handlers.codecs` and the server-side batch
merge/split in `handlers.batch_io`, so this file is only the surface a handler author reads.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from handlers.codecs import (
    binary_decode,
    binary_encode,
    decode_ndlist,
    decode_npz,
    encode_ndlist,
    encode_npz,
    is_numpy_file,
    json_body,
    json_line,
    to_bytes,
)

if TYPE_CHECKING:
    import numpy as np

V = TypeVar("V")


class PairList(Generic[V]):
    """Ordered (key, value) pairs; unlike a dict, keys may repeat (form fields, query params)."""

    def __init__(
        self,
        keys: list[str] | None = None,
        values: list[V] | None = None,
        pair_list: Iterable[tuple[str, V]] | None = None,
        pair_map: Mapping[str, V] | None = None,
    ) -> None:
        keys, values = keys or [], values or []
        if len(keys) != len(values):
            raise ValueError(f"PairList needs as many keys as values, got {len(keys)} and {len(values)}")
        self._pairs: list[tuple[str, V]] = list(zip(keys, values, strict=True))
        if pair_list is not None:
            self._pairs.extend(pair_list)
        if pair_map is not None:
            self._pairs.extend(pair_map.items())

    def add(
        self,
        key: str | None = None,
        value: V | None = None,
        pair: tuple[str, V] | None = None,
        index: int | None = None,
    ) -> None:
        """Append a pair (or insert it at ``index``), given as key and value or as ``pair`` (DJL's
        signature); an existing pair with the same key is kept."""
        if pair is not None:
            key, value = pair
        if key is None:
            raise ValueError("PairList.add needs a key, or a (key, value) pair")
        if index is None:
            self._pairs.append((key, value))
        else:
            self._pairs.insert(index, (key, value))

    def add_all(self, pairs: Iterable[tuple[str, V]]) -> None:
        for pair in pairs:
            self.add(pair=pair)

    @property
    def keys(self) -> list[str]:
        """DJL exposes ``keys``/``values`` as lists; these are copies."""
        return self.get_keys()

    @property
    def values(self) -> list[V]:
        return self.get_values()

    def get(self, key: str) -> V | None:
        """Return the value of the first pair named `key`, or None."""
        return next((v for k, v in self._pairs if k == key), None)

    def key_at(self, index: int) -> str:
        return self._pairs[index][0]

    def value_at(self, index: int) -> V:
        return self._pairs[index][1]

    def get_keys(self) -> list[str]:
        return [k for k, _ in self._pairs]

    def get_values(self) -> list[V]:
        return [v for _, v in self._pairs]

    def size(self) -> int:
        return len(self._pairs)

    def is_empty(self) -> bool:
        return not self._pairs

    def __len__(self) -> int:
        return len(self._pairs)

    def __iter__(self) -> Iterator[tuple[str, V]]:
        return iter(list(self._pairs))

    def __contains__(self, key: object) -> bool:
        return any(k == key for k, _ in self._pairs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PairList) and self._pairs == other._pairs

    def __repr__(self) -> str:
        return f"PairList({self._pairs!r})"


# ---- Input ---------------------------------------------------------------------------------------


class Input:
    """One request (or one dynamic batch of requests) as the Python worker receives it.

    HTTP headers arrive as `properties`; the body is content `data`, query parameters and form
    fields are further content entries.
    """

    def __init__(self) -> None:
        self.function_name: str = "handle"
        self.properties: dict[str, str] = {}
        self.content: PairList[bytes] = PairList()

    def __repr__(self) -> str:
        return f"Input(properties={self.properties!r}, content keys={self.content.get_keys()!r})"

    def is_batch(self) -> bool:
        return "batch_size" in self.properties

    def get_batch_size(self) -> int:
        return int(self.properties.get("batch_size", "1"))

    def get_batches(self) -> list[Input]:
        """Split a batched Input into one Input per request; a non-batch Input gives `[self]`.

        `batch_NNN.<key>` (or `batch_NNN_<key>`) properties and content go to request NNN;
        other properties (except `batch_size`) are shared by every request.
        """
        # Imported here because batch_io builds Inputs and so imports this module.
        from handlers.batch_io import split_batch_input

        return split_batch_input(self)

    def get_function_name(self) -> str:
        """The handler function to call: the `handler` property, else `function_name`."""
        return self.properties.get("handler", self.function_name)

    def get_properties(self) -> dict[str, str]:
        return self.properties

    def get_property(self, key: str) -> str | None:
        """Case-insensitive, because properties carry HTTP header names as the client spelled them."""
        return _get_ci(self.properties, key)

    def get_content(self) -> PairList[bytes]:
        return self.content

    def contains_key(self, key: str) -> bool:
        return key in self.content

    def is_empty(self) -> bool:
        """True for the warm-up call the server makes before any request."""
        return self.content.is_empty()

    def get_data(self, key: str | None = None) -> Any:
        """Decode the content according to the `content-type` property."""
        content_type = (self.get_property("content-type") or "").split(";")[0].strip().lower()
        if content_type == "tensor/ndlist":
            return self.get_as_numpy(key)
        if content_type == "tensor/npz":
            return self.get_as_npz(key)
        if content_type == "application/json" or content_type.endswith("+json"):
            return self.get_as_json(key)
        if content_type.startswith("text/"):
            return self.get_as_string(key)
        if content_type.startswith("image/"):
            return self.get_as_image(key)
        return self.get_as_bytes(key)

    def get_as_bytes(self, key: str | None = None) -> bytes | None:
        """Raw content: `key` if given (KeyError if absent), else `data`, else the first entry."""
        if key is not None:
            if key not in self.content:
                raise KeyError(f"content key {key!r} not found; available keys: {self.content.get_keys()}")
            return to_bytes(self.content.get(key))
        if self.content.is_empty():
            return None
        value = self.content.get("data") if "data" in self.content else self.content.value_at(0)
        return to_bytes(value)

    def get_as_string(self, key: str | None = None) -> str | None:
        data = self.get_as_bytes(key)
        return None if data is None else data.decode("utf-8")

    def get_as_json(self, key: str | None = None) -> Any:
        data = self.get_as_bytes(key)
        return None if data is None else json.loads(data)

    def get_as_numpy(self, key: str | None = None) -> list[np.ndarray]:
        """Arrays from a DJL NDList body; npz and single .npy bodies are accepted too."""
        data = self.get_as_bytes(key) or b""
        if is_numpy_file(data):
            return decode_npz(data)
        try:
            return decode_ndlist(data)
        except ValueError as e:
            raise ValueError(f"content is neither DJL NDList nor npz data: {e}") from e

    def get_as_npz(self, key: str | None = None) -> list[np.ndarray]:
        """Arrays from an npz body, in the order they were saved."""
        return decode_npz(self.get_as_bytes(key) or b"")

    def get_as_csv(self, key: str | None = None) -> list[dict[str, str]]:
        """CSV rows as dicts keyed by the header row."""
        return list(csv.DictReader(io.StringIO(self.get_as_string(key) or "")))

    def get_as_image(self, key: str | None = None) -> Any:
        """A PIL image; Pillow is imported only here because most models never need it."""
        try:
            from PIL import Image
        except ImportError as e:
            raise ImportError("Input.get_as_image needs Pillow: pip install pillow") from e
        return Image.open(io.BytesIO(self.get_as_bytes(key) or b""))


def _get_ci(properties: dict[str, str], key: str) -> str | None:
    """Exact match first, then the first key equal ignoring case."""
    if key in properties:
        return properties[key]
    lowered = key.lower()
    return next((v for k, v in properties.items() if k.lower() == lowered), None)


# ---- Output --------------------------------------------------------------------------------------


def default_stream_output_formatter(item: Any) -> str:
    """DJL's default stream chunk: one `{"outputs": item}` JSON object per line."""
    return json_line({"outputs": item}) + "\n"


StreamFormatter = Callable[[Any], Any]


class Output:
    """What a handler returns: status, response headers (`properties`) and a body.

    Every mutator returns `self`, so handlers can write `return Output().add(result)`.
    """

    def __init__(self, code: int = 200, message: str = "OK") -> None:
        self.code = code
        self.message = message
        self.properties: dict[str, str] = {}
        self.content: PairList[bytes] = PairList()
        self.stream_content: Iterable[Any] | None = None
        self.stream_output_formatter: StreamFormatter | None = None
        self.finalize_function: Callable[..., Any] | None = None
        self.finalize_args: tuple[Any, ...] = ()

    def __repr__(self) -> str:
        return (
            f"Output(code={self.code}, message={self.message!r}, properties={self.properties!r}, "
            f"content keys={self.content.get_keys()!r}, streaming={self.stream_content is not None})"
        )

    def set_code(self, code: int) -> Output:
        self.code = code
        return self

    def set_message(self, message: str) -> Output:
        self.message = message
        return self

    def error(self, error: str, code: int = 424, message: str = "invoke handler failure") -> Output:
        """Turn this Output into DJL's JSON error response; any body added earlier is dropped."""
        self.code = code
        self.message = message
        self.content = PairList()
        self.add_property("content-type", "application/json")
        return self.add_as_json({"code": code, "message": message, "error": error})

    def add_property(self, key: str, val: Any) -> Output:
        """Set a response header; replaces a header of the same name in any letter case."""
        for existing in [k for k in self.properties if k.lower() == key.lower()]:
            del self.properties[existing]
        self.properties[key] = str(val)
        return self

    def get_properties(self) -> dict[str, str]:
        return self.properties

    def get_property(self, key: str) -> str | None:
        """Case-insensitive, like HTTP header names."""
        return _get_ci(self.properties, key)

    def add(self, value: Any, key: str | None = None, batch_index: int | None = None) -> Output:
        """Add a body entry: str as UTF-8, bytes as-is, anything else as JSON."""
        if isinstance(value, str):
            data = value.encode("utf-8")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
        else:
            data = json_body(value)
        self.content.add(_content_key(key, batch_index), data)
        return self

    def add_as_string(self, value: Any, key: str | None = None, batch_index: int | None = None) -> Output:
        """UTF-8 text body. DJL's encoders call this but DJL never defined it; here it exists."""
        return self.add(str(value), key=key, batch_index=batch_index)

    def add_as_json(self, val: Any, key: str | None = None, batch_index: int | None = None) -> Output:
        """JSON body; numpy values and datetimes are converted, NaN/Infinity are rejected."""
        self.content.add(_content_key(key, batch_index), json_body(val))
        return self

    def add_as_numpy(
        self, np_list: Iterable[np.ndarray], key: str | None = None, batch_index: int | None = None
    ) -> Output:
        """Arrays in DJL's NDList format (`tensor/ndlist`), readable by `Input.get_as_numpy`."""
        self.content.add(_content_key(key, batch_index), encode_ndlist(np_list))
        return self

    def add_as_npz(
        self, np_list: Iterable[np.ndarray], key: str | None = None, batch_index: int | None = None
    ) -> Output:
        """Arrays as an npz archive (`tensor/npz`)."""
        self.content.add(_content_key(key, batch_index), encode_npz(np_list))
        return self

    def add_stream_content(
        self,
        stream_content: Iterable[Any],
        output_formatter: StreamFormatter | None = default_stream_output_formatter,
    ) -> Output:
        """Stream the items of an iterator as chunks; `output_formatter=None` sends items raw."""
        self.stream_content = stream_content
        self.stream_output_formatter = output_formatter
        return self

    def iter_stream(self) -> Iterator[bytes]:
        """Yield the stream as wire chunks: str as UTF-8, bytes raw, other values as JSON."""
        if self.stream_content is None:
            return
        for item in self.stream_content:
            chunk = item if self.stream_output_formatter is None else self.stream_output_formatter(item)
            if chunk is None:  # a formatter may hold output back
                continue
            if isinstance(chunk, (str, bytes, bytearray, memoryview)):
                yield to_bytes(chunk)
            else:
                yield json_line(chunk).encode("utf-8")

    def finalize(self, finalize_function: Callable[..., Any], *args: Any) -> Output:
        """Register a callback to run after the response has been sent (e.g. to free a cache)."""
        self.finalize_function = finalize_function
        self.finalize_args = args
        return self

    def execute_finalize(self) -> None:
        if self.finalize_function is not None:
            self.finalize_function(*self.finalize_args)

    # DJL's rolling-batch string-map codec (`handlers.codecs`), kept where DJL code calls it.
    binary_encode = staticmethod(binary_encode)
    binary_decode = staticmethod(binary_decode)


def _content_key(key: str | None, batch_index: int | None) -> str:
    """Default key `data`; batch replies are `batch_{i}.{key}` without zero padding, as DJL expects."""
    key = "data" if key is None else str(key)
    return key if batch_index is None else f"batch_{batch_index}.{key}"
