"""Byte-level codecs behind `Input`/`Output`: JSON bodies, DJL's NDList and npz arrays, Java UTF strings.

These are the wire formats DJL's Java front end and `djl_python` agree on, kept apart from the
user-facing classes so the byte layouts can be read, tested and changed in one place. Nothing here
knows about requests or batches: every function maps Python values to bytes or back. numpy is
imported only inside the array codecs, so text-only models never pay for it.
"""

from __future__ import annotations

import datetime
import io
import json
import struct
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

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


def json_body(value: Any) -> bytes:
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


def json_line(value: Any) -> str:
    """One-line JSON for stream chunks, where an indent would break newline-delimited JSON."""
    return json.dumps(value, ensure_ascii=False, default=_json_default)


def json_compact(value: Any) -> bytes:
    """Compact UTF-8 JSON, as the built-in handlers send bodies (numpy values and datetimes allowed)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default).encode("utf-8")


def to_bytes(value: Any) -> bytes:
    """Normalise a content value; users building Inputs by hand often store str."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"content value must be bytes or str, got {type(value).__name__}")


# ---- Java strings --------------------------------------------------------------------------------


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


# ---- DJL NDList / npz ----------------------------------------------------------------------------

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


def is_numpy_file(data: bytes) -> bool:
    """True for an npz archive or a single .npy file, which `decode_npz` reads."""
    return data.startswith((_ZIP_MAGIC, _NPY_MAGIC))


def encode_npz(arrays: Iterable[np.ndarray]) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    return buffer.getvalue()


def decode_npz(data: bytes) -> list[np.ndarray]:
    """`numpy.load` without pickle: request bodies are untrusted."""
    import numpy as np

    loaded = np.load(io.BytesIO(data), allow_pickle=False)
    if isinstance(loaded, np.ndarray):  # a single .npy file
        return [loaded]
    with loaded:
        return [loaded[name] for name in loaded.files]


# ---- DJL rolling-batch string maps ---------------------------------------------------------------


def binary_encode(data: dict[str, Any]) -> bytes:
    """Encode a flat dict as DJL's rolling-batch payload: int16 count, then utf8 key/value pairs.

    Values are sent as strings (None stays null); booleans become `true`/`false`.
    """
    parts = [struct.pack(">h", len(data))]
    for key, value in data.items():
        parts.append(_utf8(str(key)))
        parts.append(_utf8(_wire_str(value)))
    return b"".join(parts)


def binary_decode(data: bytes) -> dict[str, str | None]:
    """Inverse of `binary_encode`; every value comes back as a string (or None)."""
    reader = _Reader(data)
    result: dict[str, str | None] = {}
    for _ in range(reader.unpack(">h")):
        key = reader.utf8()
        result[key or ""] = reader.utf8()
    return result


def _wire_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
