"""`Input`/`Output`: the objects a DJL-style `handle(inputs) -> Output` works with.

Method names, defaults and wire formats follow `djl_python` so that existing `model.py` files run
unchanged. Beyond DJL this module also owns the batch plumbing the server needs: `make_batch` builds
the single batched `Input` DJL sends for a dynamic batch, and `split_batch_output` turns the handler's
`Output` back into one `Output` per request, with DJL's checks and error messages.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import re
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import numpy as np

V = TypeVar("V")

_BATCH_INPUT_KEY = re.compile(r"batch_(\d+)[._](.*)", re.DOTALL)
_BATCH_OUTPUT_KEY = re.compile(r"batch_(\d+)\.(.*)", re.DOTALL)
_BATCH_HEADER_KEY = re.compile(r"batch_(\d+)_(.*)", re.DOTALL)


class PairList(Generic[V]):
    """Ordered (key, value) pairs; unlike a dict, keys may repeat (form fields, query params)."""

    def __init__(
        self,
        keys: list[str] | None = None,
        values: list[V] | None = None,
        pair_list: Iterable[tuple[str, V]] | None = None,
    ) -> None:
        keys, values = keys or [], values or []
        if len(keys) != len(values):
            raise ValueError(f"PairList needs as many keys as values, got {len(keys)} and {len(values)}")
        self._pairs: list[tuple[str, V]] = list(zip(keys, values, strict=True))
        if pair_list is not None:
            self._pairs.extend(pair_list)

    def add(self, key: str, value: V) -> None:
        """Append a pair; an existing pair with the same key is kept."""
        self._pairs.append((key, value))

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


# ---- JSON ---------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    """Let handlers return numpy scalars/arrays and datetimes without converting them first."""
    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return str(obj)
    np = sys.modules.get("numpy")  # a numpy object implies numpy is already imported
    if np is not None:
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, np.generic):
            return obj.item()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _json_body(value: Any) -> bytes:
    """Encode a response body exactly as DJL's `add_as_json` does (indented, strict, UTF-8)."""
    text = json.dumps(
        value,
        ensure_ascii=False,
        allow_nan=False,
        indent=2,
        separators=(",", ":"),
        default=_json_default,
    )
    return text.encode("utf-8")


def _json_line(value: Any) -> str:
    """One-line JSON for stream chunks, where an indent would break newline-delimited JSON."""
    return json.dumps(value, ensure_ascii=False, default=_json_default)


def _to_bytes(value: Any) -> bytes:
    """Normalise a content value; users building Inputs by hand often store str."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"content value must be bytes or str, got {type(value).__name__}")


# ---- DJL NDList / npz codecs ---------------------------------------------------------------------

_NDARRAY_MAGIC = "NDAR"
_NDARRAY_VERSION = 3
_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
# DJL DataType name -> numpy dtype name
_DJL_TO_NUMPY = {
    "FLOAT32": "float32",
    "FLOAT64": "float64",
    "FLOAT16": "float16",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT16": "int16",
    "UINT16": "uint16",
    "INT32": "int32",
    "UINT32": "uint32",
    "INT64": "int64",
    "UINT64": "uint64",
    "BOOLEAN": "bool",
    "COMPLEX64": "complex64",
}
_NUMPY_TO_DJL = {v: k for k, v in _DJL_TO_NUMPY.items()}


class _Reader:
    """Big-endian cursor over a buffer that reports truncation as ValueError, not struct.error."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise ValueError(f"truncated data: need {n} bytes at offset {self._pos}")
        self._pos += n
        return self._data[self._pos - n : self._pos].tobytes()

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def java_utf(self) -> str:
        """Java `DataOutput.writeUTF`: unsigned 16-bit length, then the bytes."""
        return self.take(self.unpack(">H")).decode("utf-8")

    def utf8(self) -> str | None:
        """DJL protocol string: signed 32-bit length (-1 = null), then UTF-8 bytes."""
        length = self.unpack(">i")
        return None if length < 0 else self.take(length).decode("utf-8")

    def at_end(self) -> bool:
        return self._pos == len(self._data)


def _java_utf(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack(">H", len(raw)) + raw


def _utf8(text: str | None) -> bytes:
    if text is None:
        return struct.pack(">i", -1)
    raw = text.encode("utf-8")
    return struct.pack(">i", len(raw)) + raw


def _encode_ndarray(array: np.ndarray) -> bytes:
    import numpy as np

    dtype_name = _NUMPY_TO_DJL.get(array.dtype.name)
    if dtype_name is None:
        raise ValueError(f"dtype {array.dtype} has no DJL NDArray equivalent; use add_as_npz instead")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    parts = [
        _java_utf(_NDARRAY_MAGIC),
        struct.pack(">ib", _NDARRAY_VERSION, 0),  # version, "no name" flag
        _java_utf("DENSE"),
        _java_utf(dtype_name),
        struct.pack(f">i{array.ndim}q", array.ndim, *array.shape),
        struct.pack(f">i{array.ndim}H", array.ndim, *([ord("?")] * array.ndim)),  # unknown layout
        b"<",
        struct.pack(">i", len(data)),
        data,
    ]
    return b"".join(parts)


def encode_ndlist(arrays: Iterable[np.ndarray]) -> bytes:
    """Encode arrays in DJL's NDList binary format (`tensor/ndlist`), as Java `NDList.encode` does."""
    import numpy as np

    encoded = [_encode_ndarray(np.asarray(a)) for a in arrays]
    return struct.pack(">i", len(encoded)) + b"".join(encoded)


def _decode_ndarray(reader: _Reader) -> np.ndarray:
    import numpy as np

    if reader.java_utf() != _NDARRAY_MAGIC:
        raise ValueError("malformed NDList data: missing NDAR magic")
    version = reader.unpack(">i")
    if not 1 <= version <= _NDARRAY_VERSION:
        raise ValueError(f"unsupported NDArray encode version {version}")
    if version > 1 and reader.unpack(">b") == 1:
        reader.java_utf()  # array name: numpy arrays cannot carry it
    reader.java_utf()  # sparse format; only DENSE is ever sent
    djl_type = reader.java_utf()
    ndim = reader.unpack(">i")
    shape = struct.unpack(f">{ndim}q", reader.take(8 * ndim))
    reader.take(2 * reader.unpack(">i"))  # layout chars
    order = reader.take(1).decode("latin-1") if version > 2 else "<"
    if order not in "<>":
        raise ValueError(f"malformed NDList data: byte order {order!r}")
    if djl_type not in _DJL_TO_NUMPY:
        raise ValueError(f"DJL data type {djl_type} is not supported by numpy decoding")
    dtype = np.dtype(_DJL_TO_NUMPY[djl_type]).newbyteorder(order)
    data = reader.take(reader.unpack(">i"))
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def decode_ndlist(data: bytes) -> list[np.ndarray]:
    """Decode DJL's NDList binary format into numpy arrays (names and layouts are dropped)."""
    reader = _Reader(data)
    arrays = [_decode_ndarray(reader) for _ in range(reader.unpack(">i"))]
    if not reader.at_end():
        raise ValueError("malformed NDList data: trailing bytes after the last array")
    return arrays


def _encode_npz(arrays: Iterable[np.ndarray]) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    return buffer.getvalue()


def _decode_npz(data: bytes) -> list[np.ndarray]:
    """`numpy.load` without pickle: request bodies are untrusted."""
    import numpy as np

    loaded = np.load(io.BytesIO(data), allow_pickle=False)
    if isinstance(loaded, np.ndarray):  # a single .npy file
        return [loaded]
    with loaded:
        return [loaded[name] for name in loaded.files]


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
        if not self.is_batch():
            return [self]
        batch = [Input() for _ in range(self.get_batch_size())]
        for sub in batch:
            sub.function_name = self.get_function_name()
        for key, value in self.properties.items():
            if key == "batch_size":
                continue
            index, sub_key = _split_batch_key(key, len(batch))
            targets = batch if index is None else [batch[index]]
            for sub in targets:
                sub.properties[sub_key] = value
        for key, value in self.content:
            index, sub_key = _split_batch_key(key, len(batch))
            targets = batch if index is None else [batch[index]]
            for sub in targets:
                sub.content.add(sub_key, value)
        return batch

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
            return _to_bytes(self.content.get(key))
        if self.content.is_empty():
            return None
        value = self.content.get("data") if "data" in self.content else self.content.value_at(0)
        return _to_bytes(value)

    def get_as_string(self, key: str | None = None) -> str | None:
        data = self.get_as_bytes(key)
        return None if data is None else data.decode("utf-8")

    def get_as_json(self, key: str | None = None) -> Any:
        data = self.get_as_bytes(key)
        return None if data is None else json.loads(data)

    def get_as_numpy(self, key: str | None = None) -> list[np.ndarray]:
        """Arrays from a DJL NDList body; npz and single .npy bodies are accepted too."""
        data = self.get_as_bytes(key) or b""
        if data.startswith((_ZIP_MAGIC, _NPY_MAGIC)):
            return _decode_npz(data)
        try:
            return decode_ndlist(data)
        except ValueError as e:
            raise ValueError(f"content is neither DJL NDList nor npz data: {e}") from e

    def get_as_npz(self, key: str | None = None) -> list[np.ndarray]:
        """Arrays from an npz body, in the order they were saved."""
        return _decode_npz(self.get_as_bytes(key) or b"")

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


def _split_batch_key(key: str, batch_size: int) -> tuple[int | None, str]:
    """`batch_007.foo` -> (7, "foo"); a key without the prefix -> (None, key), i.e. shared."""
    match = _BATCH_INPUT_KEY.fullmatch(key)
    if match is None:
        return None, key
    index = int(match.group(1))
    if index >= batch_size:
        raise ValueError(f"batch key {key!r} has index {index}, but batch_size is {batch_size}")
    return index, match.group(2)


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


# ---- Output --------------------------------------------------------------------------------------


def default_stream_output_formatter(item: Any) -> str:
    """DJL's default stream chunk: one `{"outputs": item}` JSON object per line."""
    return _json_line({"outputs": item}) + "\n"


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
            data = _json_body(value)
        self.content.add(_content_key(key, batch_index), data)
        return self

    def add_as_string(self, value: Any, key: str | None = None, batch_index: int | None = None) -> Output:
        """UTF-8 text body. DJL's encoders call this but DJL never defined it; here it exists."""
        return self.add(str(value), key=key, batch_index=batch_index)

    def add_as_json(self, val: Any, key: str | None = None, batch_index: int | None = None) -> Output:
        """JSON body; numpy values and datetimes are converted, NaN/Infinity are rejected."""
        self.content.add(_content_key(key, batch_index), _json_body(val))
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
        self.content.add(_content_key(key, batch_index), _encode_npz(np_list))
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
                yield _to_bytes(chunk)
            else:
                yield _json_line(chunk).encode("utf-8")

    def finalize(self, finalize_function: Callable[..., Any], *args: Any) -> Output:
        """Register a callback to run after the response has been sent (e.g. to free a cache)."""
        self.finalize_function = finalize_function
        self.finalize_args = args
        return self

    def execute_finalize(self) -> None:
        if self.finalize_function is not None:
            self.finalize_function(*self.finalize_args)

    @staticmethod
    def binary_encode(data: dict[str, Any]) -> bytes:
        """Encode a flat dict as DJL's rolling-batch payload: int16 count, then utf8 key/value pairs.

        Values are sent as strings (None stays null); booleans become `true`/`false`.
        """
        parts = [struct.pack(">h", len(data))]
        for key, value in data.items():
            parts.append(_utf8(str(key)))
            parts.append(_utf8(_wire_str(value)))
        return b"".join(parts)

    @staticmethod
    def binary_decode(data: bytes) -> dict[str, str | None]:
        """Inverse of `binary_encode`; every value comes back as a string (or None)."""
        reader = _Reader(data)
        result: dict[str, str | None] = {}
        for _ in range(reader.unpack(">h")):
            key = reader.utf8()
            result[key or ""] = reader.utf8()
        return result


def _content_key(key: str | None, batch_index: int | None) -> str:
    """Default key `data`; batch replies are `batch_{i}.{key}` without zero padding, as DJL expects."""
    key = "data" if key is None else str(key)
    return key if batch_index is None else f"batch_{batch_index}.{key}"


def _wire_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---- Batch output splitting ----------------------------------------------------------------------


class BatchSizeMismatch(ValueError):
    """The handler's batched Output does not map one-to-one onto the requests; DJL answers 400."""


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
