"""Behaviour of the DJL handler API: `PairList`, `Input`, `Output` and the `djl_python` re-exports."""

from __future__ import annotations

import datetime
import io
import json
import sys

import numpy as np
import pytest

from handlers.codecs import encode_ndlist
from handlers.djl_api import Input, Output, PairList, default_stream_output_formatter


def make_input(properties: dict[str, str] | None = None, **content: bytes | str) -> Input:
    item = Input()
    item.properties.update(properties or {})
    for key, value in content.items():
        item.content.add(key, value)
    return item


def npz_bytes(*arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    return buffer.getvalue()


# ---- PairList ------------------------------------------------------------------------------------


def test_pairlist_keeps_order_and_duplicates():
    pairs = PairList()
    pairs.add("a", 1)
    pairs.add("b", 2)
    pairs.add("a", 3)
    assert pairs.size() == len(pairs) == 3
    assert pairs.get("a") == 1
    assert pairs.get("missing") is None
    assert pairs.key_at(2) == "a"
    assert pairs.value_at(1) == 2
    assert pairs.get_keys() == ["a", "b", "a"]
    assert pairs.get_values() == [1, 2, 3]
    assert list(pairs) == [("a", 1), ("b", 2), ("a", 3)]
    assert "b" in pairs
    assert "c" not in pairs


def test_pairlist_constructors_and_empty():
    assert PairList().is_empty()
    assert not PairList(keys=["k"], values=[b"v"]).is_empty()
    assert PairList(keys=["k"], values=[1]) == PairList(pair_list=[("k", 1)])
    assert PairList(pair_list=[("k", 1)]) != PairList(pair_list=[("k", 2)])
    with pytest.raises(ValueError, match="as many keys as values"):
        PairList(keys=["a", "b"], values=[1])


# ---- Input: properties and content ---------------------------------------------------------------


def test_input_defaults_are_empty():
    item = Input()
    assert item.is_empty()
    assert item.get_properties() == {}
    assert item.get_content().is_empty()
    assert not item.is_batch()
    assert item.get_batch_size() == 1
    assert item.get_as_bytes() is None
    assert item.get_as_string() is None
    assert item.get_as_json() is None


def test_get_property_is_case_insensitive():
    item = make_input({"Content-Type": "application/json", "x-custom": "1"})
    assert item.get_property("content-type") == "application/json"
    assert item.get_property("CONTENT-TYPE") == "application/json"
    assert item.get_property("X-Custom") == "1"
    assert item.get_property("missing") is None


def test_get_property_prefers_exact_match():
    item = make_input({"KEY": "upper", "key": "lower"})
    assert item.get_property("key") == "lower"
    assert item.get_property("KEY") == "upper"


def test_get_function_name_comes_from_handler_property():
    item = Input()
    assert item.get_function_name() == "handle"
    item.properties["handler"] = "predict"
    assert item.get_function_name() == "predict"


def test_contains_key_and_is_empty():
    item = make_input(data=b"x", extra=b"y")
    assert item.contains_key("extra")
    assert not item.contains_key("nope")
    assert not item.is_empty()


def test_get_as_bytes_prefers_data_then_first_entry():
    assert make_input(first=b"1", data=b"2").get_as_bytes() == b"2"
    assert make_input(first=b"1", second=b"2").get_as_bytes() == b"1"
    assert make_input(first=b"1", second=b"2").get_as_bytes("second") == b"2"


def test_get_as_bytes_missing_key_raises_clear_key_error():
    with pytest.raises(KeyError, match="'nope' not found.*data"):
        make_input(data=b"1").get_as_bytes("nope")


def test_get_as_bytes_accepts_str_content():
    assert make_input(data="héllo").get_as_bytes() == "héllo".encode()


def test_get_as_string_and_json():
    item = make_input(data='{"inputs": "héllo", "n": [1, 2]}'.encode())
    assert item.get_as_string() == '{"inputs": "héllo", "n": [1, 2]}'
    assert item.get_as_json() == {"inputs": "héllo", "n": [1, 2]}


def test_get_as_csv_returns_dict_rows():
    rows = make_input(data=b"a,b\n1,2\n3,4\n").get_as_csv()
    assert rows == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]


def test_get_as_npz_returns_arrays_in_order():
    arrays = [np.arange(i + 1) for i in range(12)]
    decoded = make_input(data=npz_bytes(*arrays)).get_as_npz()
    assert len(decoded) == 12
    for got, want in zip(decoded, arrays, strict=True):
        np.testing.assert_array_equal(got, want)


def test_get_as_numpy_accepts_npz_and_npy():
    array = np.array([[1.5, 2.5]], dtype=np.float32)
    np.testing.assert_array_equal(make_input(data=npz_bytes(array)).get_as_numpy()[0], array)
    buffer = io.BytesIO()
    np.save(buffer, array)
    np.testing.assert_array_equal(make_input(data=buffer.getvalue()).get_as_numpy()[0], array)


def test_get_as_numpy_rejects_other_data():
    with pytest.raises(ValueError, match="neither DJL NDList nor npz"):
        make_input(data=b"not arrays").get_as_numpy()


def test_get_as_image_without_pillow_explains_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        make_input(data=b"\x89PNG").get_as_image()


def test_get_data_routes_images_to_pil(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="get_as_image needs Pillow"):
        make_input({"content-type": "image/jpeg"}, data=b"\xff\xd8").get_data()


def test_get_as_image_with_pillow():
    image_module = pytest.importorskip("PIL.Image")
    buffer = io.BytesIO()
    image_module.new("RGB", (3, 2), color=(255, 0, 0)).save(buffer, format="PNG")
    item = make_input({"Content-Type": "image/png"}, data=buffer.getvalue())
    assert item.get_as_image().size == (3, 2)
    assert item.get_data().size == (3, 2)


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", {"a": 1}),
        ("application/json; charset=utf-8", {"a": 1}),
        ("text/plain", '{"a": 1}'),
        ("application/octet-stream", b'{"a": 1}'),
        (None, b'{"a": 1}'),
    ],
)
def test_get_data_dispatches_on_content_type(content_type, expected):
    properties = {} if content_type is None else {"Content-Type": content_type}
    assert make_input(properties, data=b'{"a": 1}').get_data() == expected


def test_get_data_decodes_tensor_types():
    array = np.arange(4, dtype=np.int32)
    ndlist = make_input({"content-type": "tensor/ndlist"}, data=encode_ndlist([array]))
    npz = make_input({"content-type": "tensor/npz"}, data=npz_bytes(array))
    np.testing.assert_array_equal(ndlist.get_data()[0], array)
    np.testing.assert_array_equal(npz.get_data()[0], array)


# ---- Output --------------------------------------------------------------------------------------


def test_output_defaults():
    out = Output()
    assert (out.code, out.message) == (200, "OK")
    assert out.properties == {}
    assert out.content.is_empty()
    assert out.stream_content is None
    assert out.finalize_function is None
    assert Output(code=204, message="No content").code == 204


def test_output_mutators_chain():
    out = (
        Output()
        .set_code(201)
        .set_message("Created")
        .add_property("X-A", "1")
        .add("text")
        .add_as_string("more", key="s")
        .add_as_json({"a": 1}, key="j")
        .add_as_numpy([np.arange(2)], key="n")
        .add_as_npz([np.arange(2)], key="z")
        .add_stream_content(iter(()))
        .finalize(print)
    )
    assert isinstance(out, Output)
    assert (out.code, out.message) == (201, "Created")
    assert out.content.get_keys() == ["data", "s", "j", "n", "z"]


def test_add_encodes_by_type():
    out = Output().add("héllo").add(b"\x00\x01", key="raw").add(bytearray(b"ba"), key="ba")
    out.add({"n": 1}, key="obj").add([1, 2], key="list")
    assert out.content.get("data") == "héllo".encode()
    assert out.content.get("raw") == b"\x00\x01"
    assert out.content.get("ba") == b"ba"
    assert json.loads(out.content.get("obj")) == {"n": 1}
    assert json.loads(out.content.get("list")) == [1, 2]


def test_add_with_batch_index_has_no_zero_padding():
    out = Output().add("a", batch_index=0).add("b", key="text", batch_index=12)
    assert out.content.get_keys() == ["batch_0.data", "batch_12.text"]
    out.add_as_json(1, batch_index=3).add_as_numpy([np.zeros(1)], batch_index=4)
    out.add_as_npz([np.zeros(1)], key="z", batch_index=5).add_as_string("s", batch_index=6)
    assert out.content.get_keys()[2:] == ["batch_3.data", "batch_4.data", "batch_5.z", "batch_6.data"]


def test_add_as_json_format_and_conversions():
    when = datetime.datetime(2024, 1, 2, 3, 4, 5)
    out = Output().add_as_json(
        {"text": "héllo", "i": np.int64(3), "f": np.float32(0.5), "arr": np.arange(2), "t": when}
    )
    body = out.content.get("data")
    assert "héllo".encode() in body  # ensure_ascii=False
    assert body.startswith(b'{\n  "text":"')  # indent=2 with compact separators, as DJL
    assert json.loads(body) == {"text": "héllo", "i": 3, "f": 0.5, "arr": [0, 1], "t": str(when)}


def test_add_as_json_rejects_nan_and_unknown_objects():
    with pytest.raises(ValueError, match="Out of range float"):
        Output().add_as_json({"x": float("nan")})
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        Output().add_as_json({"x": object()})


def test_add_as_string_exists_and_stringifies():
    out = Output().add_as_string("a,b\n1,2").add_as_string(42, key="n")
    assert out.content.get("data") == b"a,b\n1,2"
    assert out.content.get("n") == b"42"


def test_add_as_numpy_and_npz_decode_back_through_input():
    arrays = [np.arange(3, dtype=np.float64), np.ones((2, 2), dtype=np.uint8)]
    out = Output().add_as_numpy(arrays).add_as_npz(arrays, key="npz")
    ndlist = make_input(data=out.content.get("data")).get_as_numpy()
    npz = make_input(data=out.content.get("npz")).get_as_npz()
    for decoded in (ndlist, npz):
        for got, want in zip(decoded, arrays, strict=True):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


def test_error_builds_djl_json_body():
    out = Output().add("partial").error("model exploded")
    assert (out.code, out.message) == (424, "invoke handler failure")
    assert out.get_property("Content-Type") == "application/json"
    assert out.content.size() == 1  # the partial body is gone
    assert json.loads(out.content.get("data")) == {
        "code": 424,
        "message": "invoke handler failure",
        "error": "model exploded",
    }


def test_error_with_custom_code_replaces_content_type_header():
    out = Output().add_property("Content-Type", "text/plain").error("oom", code=507, message="OOM")
    assert out.properties == {"content-type": "application/json"}
    assert json.loads(out.content.get("data"))["code"] == 507


def test_output_properties_are_case_insensitive_headers():
    out = Output().add_property("X-Trace", "1").add_property("x-trace", 2)
    assert out.get_properties() == {"x-trace": "2"}
    assert out.get_property("X-TRACE") == "2"
    assert out.get_property("missing") is None


def test_default_stream_formatter_wraps_items():
    assert default_stream_output_formatter("tok") == '{"outputs": "tok"}\n'
    assert json.loads(default_stream_output_formatter({"a": np.int32(1)})) == {"outputs": {"a": 1}}


def test_iter_stream_with_default_formatter():
    out = Output().add_stream_content(iter(["Hel", "lo", ["x"]]))
    assert out.stream_output_formatter is default_stream_output_formatter
    assert list(out.iter_stream()) == [
        b'{"outputs": "Hel"}\n',
        b'{"outputs": "lo"}\n',
        b'{"outputs": ["x"]}\n',
    ]


def test_iter_stream_raw_when_formatter_is_none():
    out = Output().add_stream_content(iter(["é", b"\x00", {"k": 1}]), output_formatter=None)
    assert list(out.iter_stream()) == ["é".encode(), b"\x00", b'{"k": 1}']


def test_iter_stream_custom_formatter_may_skip_items():
    out = Output().add_stream_content(range(4), output_formatter=lambda n: None if n % 2 else f"<{n}>")
    assert list(out.iter_stream()) == [b"<0>", b"<2>"]


def test_iter_stream_without_stream_is_empty():
    assert list(Output().iter_stream()) == []


def test_finalize_runs_callback_with_args_only_when_executed():
    calls = []
    out = Output().finalize(lambda *args: calls.append(args), "a", 1)
    assert calls == []
    out.execute_finalize()
    assert calls == [("a", 1)]
    Output().execute_finalize()  # nothing registered: no error


def test_binary_codec_is_exposed_on_output_as_in_djl():
    payload = {"data": "hi", "last": True}
    assert Output.binary_decode(Output.binary_encode(payload)) == {"data": "hi", "last": "true"}


# ---- djl_python compatibility imports ------------------------------------------------------------


def test_djl_python_imports():
    from djl_python import Input as DjlInput
    from djl_python import Output as DjlOutput
    from djl_python import PairList as DjlPairList
    from djl_python.inputs import Input as ShimInput
    from djl_python.outputs import Output as ShimOutput

    assert DjlInput is ShimInput is Input
    assert DjlOutput is ShimOutput is Output
    assert DjlPairList is PairList


def test_pair_list_takes_djl_constructor_and_add_forms():
    from djl_python import PairList

    pairs = PairList(pair_map={"a": 1, "b": 2})
    pairs.add(pair=("c", 3))
    pairs.add("z", 0, index=0)
    pairs.add_all([("d", 4), ("a", 5)])
    assert pairs.keys == ["z", "a", "b", "c", "d", "a"]
    assert pairs.values == [0, 1, 2, 3, 4, 5]
    assert pairs.get("a") == 1  # the first of a repeated key
    with pytest.raises(ValueError, match="needs a key"):
        pairs.add(value=9)
