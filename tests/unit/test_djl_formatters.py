"""Custom @input_formatter / @output_formatter: the decorators, their discovery in model.py, and how
`CustomFormatters` reshapes bodies and stream frames (handlers/builtin/custom_formatters.py)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

import djl_python
from djl_python import Input, PairList
from djl_python.input_parser import input_formatter
from djl_python.output_formatter import output_formatter
from djl_python.pair_list import PairList as ModulePairList
from djl_python.request_io import TextInput
from djl_python.test_model import create_json_request, create_text_request
from handlers import loader
from handlers.builtin.custom_formatters import CustomFormatterError, CustomFormatters
from handlers.builtin.formats import RequestError

pytestmark = pytest.mark.usefixtures("isolated_imports")


def model_dir(tmp_path: Path, source: str) -> str:
    (tmp_path / "model.py").write_text(textwrap.dedent(source), encoding="utf-8")
    return str(tmp_path)


# ---- the package surface -------------------------------------------------------------------------


def test_package_exports_what_djl_exports():
    assert set(djl_python.__all__) == {"Input", "Output", "PairList", "SessionManager", "Session"}
    assert ModulePairList is PairList
    assert isinstance(Input().content, PairList)


def test_decorators_mark_and_return_the_function():
    def f(payload):
        return payload

    assert input_formatter(f) is f
    assert f.is_input_formatter is True
    assert output_formatter(f) is f
    assert f.is_output_formatter is True


# ---- discovery -----------------------------------------------------------------------------------

FORMATTERS = """
    from djl_python.input_parser import input_formatter
    from djl_python.output_formatter import output_formatter

    @input_formatter
    def reshape(decoded_payload, tokenizer=None, **kwargs):
        return {"inputs": decoded_payload["prompt"]}

    @output_formatter
    def tag(response_data):
        return {**response_data, "tagged": True}
"""


def test_formatters_are_found_by_decorator_attribute(tmp_path):
    folder = model_dir(tmp_path, FORMATTERS)
    found = CustomFormatters.load(folder)
    assert found.input_formatter.__name__ == "reshape"
    assert found.output_formatter.__name__ == "tag"
    assert loader.get_annotated_function(folder, "is_input_formatter") is found.input_formatter


def test_no_model_py_means_no_formatters(tmp_path):
    assert CustomFormatters.load(str(tmp_path)) == CustomFormatters()
    assert CustomFormatters.load(None) == CustomFormatters()


def test_model_py_is_imported_once_for_entry_point_and_formatters(tmp_path):
    counter = tmp_path / "imports.txt"
    folder = model_dir(tmp_path, f"open({str(counter)!r}, 'a').write('x')\n" + textwrap.dedent(FORMATTERS))
    entry = loader.load_entry_point(loader.resolve_entry_point(folder, {}))
    assert loader.load_model_py(folder) is entry
    CustomFormatters.load(folder)
    assert counter.read_text() == "x"


def test_a_model_py_that_cannot_be_imported_is_named_in_the_load_error(tmp_path):
    folder = model_dir(tmp_path, "VALUE = 1 / 0\n")
    for _ in range(2):  # a failed import is not cached as if it had worked
        with pytest.raises(
            loader.HandlerLoadError, match="model.py could not be imported.*ZeroDivisionError"
        ):
            CustomFormatters.load(folder)


def test_per_token_output_formatters_are_refused_at_load_with_the_fix(tmp_path):
    source = """
        from djl_python.output_formatter import output_formatter

        @output_formatter
        def per_token(request_output):
            return ""
    """
    with pytest.raises(loader.HandlerLoadError, match=r"per_token\(response_data: dict\)"):
        CustomFormatters.load(model_dir(tmp_path, source))


# ---- input ---------------------------------------------------------------------------------------


def test_input_formatter_gets_the_decoded_body_and_the_tokenizer():
    calls = []

    def reshape(decoded_payload, tokenizer=None, **kwargs):
        calls.append((decoded_payload, tokenizer))
        return {"inputs": decoded_payload.get("prompt"), "parameters": {"max_new_tokens": 3}}

    formatters = CustomFormatters(input_formatter=reshape)
    body = formatters.format_input(create_json_request({"prompt": "hi"}), tokenizer="tok")
    assert body == {"inputs": "hi", "parameters": {"max_new_tokens": 3}}
    assert calls == [({"prompt": "hi"}, "tok")]
    formatters.format_input(create_text_request("plain text"))
    assert calls[-1][0] == {"inputs": ["plain text"]}  # decoded by content type first


def test_without_an_input_formatter_nothing_is_decoded():
    assert CustomFormatters().format_input(create_text_request("x")) is None


def test_djl_older_input_formatters_get_the_input_and_may_return_text_input():
    def legacy(input_item: Input, **kwargs):
        request = TextInput()
        request.input_text = input_item.get_as_json()["question"]
        request.parameters = {"max_new_tokens": 2, "stream": True}
        return request

    body = CustomFormatters(input_formatter=legacy).format_input(create_json_request({"question": "why?"}))
    assert body == {"inputs": "why?", "parameters": {"max_new_tokens": 2}, "stream": True}


def test_a_failing_input_formatter_is_a_424_naming_the_function():
    def broken(decoded_payload, **kwargs):
        return decoded_payload["missing"]

    with pytest.raises(CustomFormatterError, match="broken failed: KeyError") as info:
        CustomFormatters(input_formatter=broken).format_input(create_json_request({}))
    assert info.value.status_code == 424


def test_an_input_formatter_must_return_a_dict():
    formatters = CustomFormatters(input_formatter=lambda payload, **kwargs: ["not", "a", "dict"])
    with pytest.raises(
        CustomFormatterError, match="returned list; it must return the request body as a dict"
    ):
        formatters.format_input(create_json_request({}))


def test_an_undecodable_body_is_the_clients_error():
    item = create_text_request("{not json")
    item.properties["content-type"] = "application/json"
    with pytest.raises(RequestError, match="Cannot decode the request body"):
        CustomFormatters(input_formatter=lambda payload, **kwargs: payload).format_input(item)


# ---- output --------------------------------------------------------------------------------------


def tag(response_data):
    return {**response_data, "tagged": True}


def test_output_formatter_reshapes_a_whole_json_body():
    formatters = CustomFormatters(output_formatter=tag)
    data = formatters.format_chunk(b'{"generated_text":"Paris"}', "application/json")
    assert json.loads(data) == {"generated_text": "Paris", "tagged": True}


def test_output_formatter_sees_each_jsonlines_line_and_may_drop_one():
    def only_last(line):
        return line if "generated_text" in line else None

    chunk = b'{"token":{"id":1}}\n{"token":{"id":2},"generated_text":"ab"}\n'
    assert CustomFormatters(output_formatter=tag).format_chunk(chunk, "application/jsonlines") == (
        b'{"token":{"id":1},"tagged":true}\n{"token":{"id":2},"generated_text":"ab","tagged":true}\n'
    )
    kept = CustomFormatters(output_formatter=only_last).format_chunk(chunk, "application/jsonlines")
    assert kept == b'{"token":{"id":2},"generated_text":"ab"}\n'


def test_output_formatter_keeps_sse_framing_and_done_marker():
    chunk = b'data: {"choices":[]}\n\ndata: [DONE]\n\n'
    formatted = CustomFormatters(output_formatter=tag).format_chunk(chunk, "text/event-stream")
    assert formatted == b'data: {"choices":[],"tagged":true}\n\ndata: [DONE]\n\n'


def test_output_formatter_may_return_text_and_numpy_values():
    as_text = CustomFormatters(output_formatter=lambda r: r["generated_text"].upper())
    assert as_text.format_chunk(b'{"generated_text":"paris"}', "application/json") == b"PARIS"
    as_array = CustomFormatters(output_formatter=lambda r: np.array(r) * 2)
    assert as_array.format_output([1, 2]) == b"[2,4]"


def test_without_an_output_formatter_bytes_pass_untouched():
    chunk = b'{"a": 1}\n'
    assert CustomFormatters().format_chunk(chunk, "application/jsonlines") is chunk


def test_a_failing_output_formatter_is_reported_not_swallowed():
    def broken(response_data):
        raise RuntimeError("boom")

    with pytest.raises(CustomFormatterError, match="output formatter broken failed: RuntimeError: boom"):
        CustomFormatters(output_formatter=broken).format_chunk(b"{}", "application/json")
