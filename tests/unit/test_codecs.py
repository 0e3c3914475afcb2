"""Byte layouts of the codecs behind Input/Output: DJL NDList arrays and the rolling-batch string map."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from handlers.codecs import binary_decode, binary_encode, decode_ndlist, encode_ndlist


def java_utf(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


# ---- NDList codec --------------------------------------------------------------------------------


def test_ndlist_round_trip_keeps_dtype_and_shape():
    arrays = [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.array(7, dtype=np.int64),
        np.array([True, False]),
        np.array([1, 2], dtype=">u2"),
        np.zeros((0, 3), dtype=np.float16),
    ]
    decoded = decode_ndlist(encode_ndlist(arrays))
    assert len(decoded) == len(arrays)
    for got, want in zip(decoded, arrays, strict=True):
        assert got.dtype == want.dtype.newbyteorder("=")
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_ndlist_encoding_matches_djl_layout():
    encoded = encode_ndlist([np.array([1.0], dtype=np.float32)])
    expected = (
        struct.pack(">i", 1)
        + java_utf("NDAR")
        + struct.pack(">ib", 3, 0)
        + java_utf("DENSE")
        + java_utf("FLOAT32")
        + struct.pack(">iq", 1, 1)
        + struct.pack(">iH", 1, ord("?"))
        + b"<"
        + struct.pack(">i", 4)
        + struct.pack("<f", 1.0)
    )
    assert encoded == expected


def test_ndlist_decodes_java_version_2_with_name():
    """Version 2 (older DJL) has a name but no byte-order byte; data is native (little-endian)."""
    data = (
        struct.pack(">i", 1)
        + java_utf("NDAR")
        + struct.pack(">ib", 2, 1)
        + java_utf("scores")
        + java_utf("DENSE")
        + java_utf("INT32")
        + struct.pack(">iqq", 2, 1, 2)
        + struct.pack(">i", 0)
        + struct.pack(">i", 8)
        + struct.pack("<ii", 5, -6)
    )
    (array,) = decode_ndlist(data)
    np.testing.assert_array_equal(array, np.array([[5, -6]], dtype=np.int32))


def test_ndlist_rejects_truncated_and_unknown_types():
    encoded = encode_ndlist([np.arange(3)])
    with pytest.raises(ValueError, match="truncated"):
        decode_ndlist(encoded[:-1])
    with pytest.raises(ValueError, match="no DJL NDArray equivalent"):
        encode_ndlist([np.array(["text"])])


# ---- Rolling-batch string map --------------------------------------------------------------------


def test_binary_encode_layout():
    encoded = binary_encode({"data": "hi", "last": True})
    expected = (
        struct.pack(">h", 2)
        + struct.pack(">i", 4)
        + b"data"
        + struct.pack(">i", 2)
        + b"hi"
        + struct.pack(">i", 4)
        + b"last"
        + struct.pack(">i", 4)
        + b"true"
    )
    assert encoded == expected


def test_binary_encode_decode_round_trip():
    payload = {"data": "héllo ✓", "last": False, "code": 424, "error": None, "": ""}
    assert binary_decode(binary_encode(payload)) == {
        "data": "héllo ✓",
        "last": "false",
        "code": "424",
        "error": None,
        "": "",
    }


def test_binary_decode_rejects_truncated_data():
    with pytest.raises(ValueError, match="truncated"):
        binary_decode(binary_encode({"data": "abc"})[:-1])
