"""djl_python.encode_decode: request bodies decoded by content type, predictions encoded by Accept."""

from __future__ import annotations

import csv
import importlib.util
import io

import numpy as np
import pytest

from djl_python import Input, Output
from djl_python.encode_decode import decode, decode_csv, encode, encode_csv
from djl_python.test_model import create_npz_request, create_numpy_request, extract_output_as_input


def body(data: bytes | str, content_type: str | None = None, key: str = "data") -> Input:
    item = Input()
    if content_type is not None:
        item.properties["Content-Type"] = content_type
    item.content.add(key, data.encode() if isinstance(data, str) else data)
    return item


def encoded(prediction: object, accept: str | None, key: str | None = None) -> tuple[bytes, str | None]:
    out = encode(Output(), prediction, accept, key=key)
    return out.content.get(key or "data"), out.get_property("Content-Type")


# ---- decode --------------------------------------------------------------------------------------


def test_decode_without_content_type_reads_json_or_empty_inputs():
    assert decode(body(b'{"inputs": "hi"}'), None) == {"inputs": "hi"}
    assert decode(body(b""), None) == {"inputs": ""}
    assert decode(Input(), None) == {"inputs": ""}


def test_decode_json_ignores_content_type_parameters():
    assert decode(body('{"inputs": ["a", "b"]}'), "application/json; charset=utf-8") == {"inputs": ["a", "b"]}
    assert decode(body("[1, 2]"), "application/vnd.api+json") == [1, 2]


def test_decode_text_plain_is_a_one_element_inputs_list():
    assert decode(body("Hello world"), "text/plain") == {"inputs": ["Hello world"]}


def test_decode_jsonlines_gives_one_value_per_line():
    text = '{"inputs": "a"}\n\n{"inputs": "b"}\n'
    assert decode(body(text), "application/jsonlines") == {"inputs": [{"inputs": "a"}, {"inputs": "b"}]}


def test_decode_csv_inputs_column_gives_strings():
    item = body("inputs,other\ntest input 1,value1\ntest input 2,value2")
    assert decode(item, "text/csv") == {"inputs": ["test input 1", "test input 2"]}


def test_decode_csv_question_context_gives_row_dicts():
    item = body("question,context\nWhat is AI?,Technology\nWhat is ML?,Learning")
    assert decode_csv(item) == {
        "inputs": [
            {"question": "What is AI?", "context": "Technology"},
            {"question": "What is ML?", "context": "Learning"},
        ]
    }


def test_decode_csv_without_a_known_header_says_which_columns():
    with pytest.raises(ValueError, match="correct CSV with Header columns.*question, context, inputs"):
        decode_csv(body("invalid,header\nvalue1,value2"))


def test_decode_csv_without_required_headers_is_numeric():
    values = decode(body("1,2,3\n4,5,6"), "text/csv", require_csv_headers=False)
    assert values.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    with pytest.raises(ValueError, match="non-numeric"):
        decode_csv(body("1,x\n2,3"), require_headers=False)


def test_decode_arrays_ndlist_npz_and_npy():
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7, 8], dtype=np.int64)]
    for item, content_type in (
        (create_numpy_request(arrays), "tensor/ndlist"),
        (create_npz_request(arrays), "tensor/npz"),
    ):
        decoded = decode(item, content_type)["inputs"]
        assert [a.tolist() for a in decoded] == [a.tolist() for a in arrays]
    npy = io.BytesIO()
    np.save(npy, arrays[0])
    assert decode(body(npy.getvalue()), "application/x-npy")["inputs"][0].tolist() == arrays[0].tolist()


def test_decode_binary_types_stay_bytes_and_forms_stay_text():
    assert decode(body(b"RIFF\x00"), "audio/wav") == {"inputs": b"RIFF\x00"}
    assert decode(body(b"\x00\x01"), "application/octet-stream") == {"inputs": b"\x00\x01"}
    assert decode(body("k1=v1&k2=v2"), "application/x-www-form-urlencoded") == {"inputs": "k1=v1&k2=v2"}


def test_decode_reads_the_named_key():
    item = body('{"x": 1}', "application/json", key="other")
    item.content.add("data", b'{"x": 2}')
    assert decode(item, "application/json", key="other") == {"x": 1}
    with pytest.raises(KeyError):
        decode(item, "application/json", key="missing")


def test_decode_image_gives_a_pil_image():
    image_module = pytest.importorskip("PIL.Image")
    png = io.BytesIO()
    image_module.new("RGB", (3, 2), "red").save(png, format="PNG")
    image = decode(body(png.getvalue()), "image/png")["inputs"]
    assert image.size == (3, 2)


def test_decode_image_without_pillow_names_the_package():
    if importlib.util.find_spec("PIL") is not None:
        pytest.skip("Pillow is installed")
    with pytest.raises(ImportError, match="pip install pillow"):
        decode(body(b"\x89PNG"), "image/png")


# ---- encode --------------------------------------------------------------------------------------


@pytest.mark.parametrize("accept", [None, "application/json", "application/json; charset=utf-8", "*/*"])
def test_encode_json_by_default(accept):
    data, content_type = encoded({"result": "success"}, accept)
    assert content_type == "application/json"
    assert extract_output_as_input(encode(Output(), {"result": "success"}, accept)).get_as_json() == {
        "result": "success"
    }
    assert data.startswith(b"{")


def test_encode_csv_dict_rows_round_trip_with_a_header():
    rows = [{"name": "Axl", "age": "30"}, {"name": "Fiona", "age": "25"}]
    data, content_type = encoded(rows, "text/csv")
    assert content_type == "text/csv"
    assert list(csv.DictReader(io.StringIO(data.decode()))) == rows


def test_encode_csv_plain_rows_have_no_header():
    assert encode_csv(np.array([[1, 2], [3, 4]])) == "1,2\r\n3,4\r\n"
    assert encode_csv([5, 6]) == "5\r\n6\r\n"


def test_encode_text_plain():
    assert encoded("a sentence", "text/plain") == (b"a sentence", "text/plain")


def test_encode_jsonlines_reads_back_with_decode():
    data, content_type = encoded([{"a": 1}, {"a": 2}], "application/jsonlines")
    assert (data, content_type) == (b'{"a":1}\n{"a":2}\n', "application/jsonlines")
    assert decode(body(data), content_type) == {"inputs": [{"a": 1}, {"a": 2}]}


def test_encode_arrays_npz_npy_and_ndlist_read_back():
    arrays = [np.arange(4, dtype=np.float32)]
    for accept, expected_type in (
        ("tensor/npz", "tensor/npz"),
        ("application/x-npy", "application/x-npy"),
        ("custom/type", "tensor/ndlist"),
    ):
        out = encode(Output(), arrays, accept)
        assert out.get_property("Content-Type") == expected_type
        decoded = decode(extract_output_as_input(out), expected_type)["inputs"]
        assert decoded[0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_encode_with_key():
    data, _ = encoded({"result": 1}, "application/json", key="test_key")
    assert b'"result":1' in data


def test_encode_image_rejects_what_is_not_an_image():
    with pytest.raises(TypeError, match="PIL image"):
        encode(Output(), [1, 2], "image/png")


def test_encode_image_writes_the_named_format():
    image_module = pytest.importorskip("PIL.Image")
    data, content_type = encoded(image_module.new("RGB", (2, 2)), "image/png")
    assert content_type == "image/png"
    assert data.startswith(b"\x89PNG")
