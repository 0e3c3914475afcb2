"""Dynamic-batch plumbing: `make_batch`, `Input.get_batches` and `split_batch_output`, in DJL's layout."""

from __future__ import annotations

import pytest

from handlers.batch_io import BatchSizeMismatch, make_batch, split_batch_output
from handlers.djl_api import Input, Output


def make_input(properties: dict[str, str] | None = None, **content: bytes | str) -> Input:
    item = Input()
    item.properties.update(properties or {})
    for key, value in content.items():
        item.content.add(key, value)
    return item


# ---- Input: batches ------------------------------------------------------------------------------


def test_get_batches_on_single_input_returns_itself():
    item = make_input(data=b"x")
    assert item.get_batches() == [item]


def test_get_batches_splits_dot_and_underscore_keys():
    batch = make_input(
        {
            "batch_size": "2",
            "handler": "handle",
            "batch_000.Content-Type": "text/plain",
            "batch_001_Content-Type": "application/json",
        },
        **{"batch_000.data": b"zero", "batch_001.data": b'{"one": 1}', "batch_001.extra": b"e"},
    )
    assert batch.is_batch()
    assert batch.get_batch_size() == 2
    first, second = batch.get_batches()
    assert first.properties == {"handler": "handle", "Content-Type": "text/plain"}
    assert second.properties == {"handler": "handle", "Content-Type": "application/json"}
    assert first.get_data() == "zero"
    assert second.get_data() == {"one": 1}
    assert second.get_as_bytes("extra") == b"e"
    assert not first.contains_key("extra")


def test_get_batches_rejects_index_beyond_batch_size():
    batch = make_input({"batch_size": "1"}, **{"batch_003.data": b"x"})
    with pytest.raises(ValueError, match="index 3"):
        batch.get_batches()


def test_make_batch_matches_djl_wire_layout():
    first = make_input({"Content-Type": "text/plain"}, data=b"a")
    second = make_input({"X-Id": "7"}, data=b"b", param=b"q")
    batch = make_batch([first, second])
    assert batch.properties == {
        "batch_size": "2",
        "batch_000.Content-Type": "text/plain",
        "batch_001.X-Id": "7",
    }
    assert list(batch.content) == [
        ("batch_000.data", b"a"),
        ("batch_001.data", b"b"),
        ("batch_001.param", b"q"),
    ]


def test_make_batch_of_one_is_unwrapped_and_empty_is_rejected():
    only = make_input(data=b"a")
    assert make_batch([only]) is only
    with pytest.raises(ValueError, match="at least one"):
        make_batch([])


def test_make_batch_then_get_batches_round_trips():
    originals = [make_input({"k": str(i), "Content-Type": "text/plain"}, data=f"req{i}") for i in range(12)]
    for original in originals:
        original.content.add("data", b"second value")
    restored = make_batch(originals).get_batches()
    assert len(restored) == 12
    for got, want in zip(restored, originals, strict=True):
        assert got.properties == want.properties
        assert list(got.content) == list(want.content)


# ---- split_batch_output --------------------------------------------------------------------------


def test_split_batch_output_of_handler_style_output():
    batch = make_batch([make_input(data=b"0"), make_input(data=b"1"), make_input(data=b"2")])
    out = Output().add_property("X-Shared", "s")
    for i, request in enumerate(batch.get_batches()):
        out.add(f"echo {request.get_as_string()}", key="data", batch_index=i)
    out.add_property("batch_1_Content-Type", "text/plain")
    outs = split_batch_output(out, 3)
    assert [o.content.get("data") for o in outs] == [b"echo 0", b"echo 1", b"echo 2"]
    assert all(o.code == 200 and o.message == "OK" for o in outs)
    assert outs[0].properties == {"X-Shared": "s"}
    assert outs[1].properties == {"X-Shared": "s", "Content-Type": "text/plain"}
    assert outs[2].properties == {"X-Shared": "s"}


def test_split_batch_output_routes_by_index_not_order():
    out = Output().add(b"B", key="k", batch_index=1).add(b"A", batch_index=0)
    first, second = split_batch_output(out, 2)
    assert list(first.content) == [("data", b"A")]
    assert list(second.content) == [("k", b"B")]


def test_split_batch_output_per_request_header_beats_shared():
    out = Output().add("a", batch_index=0).add("b", batch_index=1)
    out.properties.update({"batch_0_content-type": "text/plain", "Content-Type": "application/json"})
    first, second = split_batch_output(out, 2)
    assert first.properties == {"content-type": "text/plain"}
    assert second.properties == {"Content-Type": "application/json"}


def test_split_batch_output_size_mismatch_message():
    out = Output().add("only one", batch_index=0)
    with pytest.raises(BatchSizeMismatch, match=r"^Batch output size mismatch, expected: 2, actual: 1$"):
        split_batch_output(out, 2)
    assert issubclass(BatchSizeMismatch, ValueError)


def test_split_batch_output_rejects_unbatched_and_out_of_range_keys():
    with pytest.raises(BatchSizeMismatch, match="Unexpected batch output key: data"):
        split_batch_output(Output().add("a").add("b", batch_index=1), 2)
    with pytest.raises(BatchSizeMismatch, match="index 5"):
        split_batch_output(Output().add("a", batch_index=0).add("b", batch_index=5), 2)


@pytest.mark.parametrize("code", [300, 424])
def test_split_batch_output_error_goes_to_every_request(code):
    out = Output().error("boom", code=code)
    outs = split_batch_output(out, 3)
    assert len(outs) == 3
    assert all(o.code == code and o.content.get("data") == out.content.get("data") for o in outs)
    outs[0].add_property("X-Changed", "1")
    assert "X-Changed" not in outs[1].properties
    assert "X-Changed" not in out.properties


def test_split_batch_output_of_one_is_unchanged():
    out = Output().add("unbatched")
    assert split_batch_output(out, 1)[0] is out
