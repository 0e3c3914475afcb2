"""Content-type driven request decoding and response encoding (DJL's `djl_python.encode_decode`).

`decode` turns a request body into the dict LMI parsers and custom input formatters work on
(`{"inputs": ...}` for anything that is not already a JSON object); `encode` writes a prediction
into an `Output` in the format the client's `Accept` names. Handlers call these instead of
branching on content types themselves.

Beyond DJL: jsonlines both ways, `text/plain` and `.npy` responses, images out (with Pillow), and
CSV rows that are lists rather than dicts. Content-type parameters (`; charset=utf-8`) are ignored.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from handlers.codecs import json_compact
from handlers.djl_api import Input, Output

JSONLINES_TYPES = ("application/jsonlines", "application/jsonl", "application/x-jsonlines")
CSV_HEADERS = ("question", "context", "inputs")
"""A CSV request must name one of these columns in its header row (unless headers are not required)."""


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def _is_jsonlines(content_type: str) -> bool:
    return any(t in content_type for t in JSONLINES_TYPES)


def decode_csv(inputs: Input, require_headers: bool = True) -> Any:
    """CSV request → `{"inputs": [...]}`; without required headers, a numeric array (tabular models).

    With headers, an `inputs` column gives a list of strings and other columns (question/context)
    a list of row dicts, as DJL's default handler reads them.
    """
    text = inputs.get_as_string() or ""
    if not require_headers:
        import numpy as np

        values = np.genfromtxt(io.StringIO(text), delimiter=",")
        if np.isnan(values).any():
            raise ValueError("CSV contains non-numeric data. Please provide numeric data only.")
        return values
    header = text.splitlines()[0].lower() if text.strip() else ""
    if not any(name in header for name in CSV_HEADERS):
        raise ValueError(
            "You need to provide the correct CSV with Header columns to use it with the inference toolkit "
            f"default handler: the header row must contain one of {', '.join(CSV_HEADERS)}."
        )
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and "inputs" in rows[0]:
        return {"inputs": [row["inputs"] for row in rows]}
    return {"inputs": rows}


def encode_csv(content: Any) -> str:
    """Rows → CSV text: dict rows get a header row from the first row's keys, other rows none."""
    rows = list(content)
    stream = io.StringIO()
    if rows and isinstance(rows[0], dict):
        writer = csv.DictWriter(stream, list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    else:
        plain = csv.writer(stream)
        for row in rows:
            plain.writerow(_as_list(row))
    return stream.getvalue()


def _as_list(row: Any) -> list[Any]:
    if hasattr(row, "tolist"):
        row = row.tolist()
    return list(row) if isinstance(row, (list, tuple)) else [row]


def decode_jsonlines(inputs: Input, key: str | None = None) -> dict[str, Any]:
    """One JSON value per non-empty line → `{"inputs": [value, ...]}`."""
    text = inputs.get_as_string(key=key) or ""
    return {"inputs": [json.loads(line) for line in text.splitlines() if line.strip()]}


def decode(
    inputs: Input, content_type: str | None, key: str | None = None, require_csv_headers: bool = True
) -> Any:
    """The request body as Python data, chosen by `content_type`.

    JSON bodies come back as they are (usually a dict); every other type is wrapped as
    `{"inputs": value}`: text/plain as a one-element list, jsonlines as a list of values, images as a
    PIL image, arrays (`tensor/ndlist`, `application/x-npy`, `tensor/npz`) as a list of numpy arrays,
    audio and unknown types as bytes. No content type means JSON, or `{"inputs": ""}` when empty.
    """
    media = _media_type(content_type)
    if not media:
        return inputs.get_as_json(key=key) if inputs.get_as_bytes(key=key) else {"inputs": ""}
    if _is_jsonlines(media):
        return decode_jsonlines(inputs, key=key)
    if "application/json" in media or media.endswith("+json"):
        return inputs.get_as_json(key=key)
    if "text/csv" in media:
        return decode_csv(inputs, require_headers=require_csv_headers)
    if "text/plain" in media:
        return {"inputs": [inputs.get_as_string(key=key)]}
    if media.startswith("image/"):
        return {"inputs": inputs.get_as_image(key=key)}
    if media.startswith("audio/"):
        return {"inputs": inputs.get_as_bytes(key=key)}
    if "tensor/npz" in media:
        return {"inputs": inputs.get_as_npz(key=key)}
    if media in ("tensor/ndlist", "application/x-npy"):
        return {"inputs": inputs.get_as_numpy(key=key)}
    if media == "application/x-www-form-urlencoded":
        return {"inputs": inputs.get_as_string(key=key)}
    return {"inputs": inputs.get_as_bytes(key=key)}


def encode(outputs: Output, prediction: Any, content_type: str | None, key: str | None = None) -> Output:
    """Add `prediction` to `outputs` in the format `content_type` (the client's Accept) names.

    JSON is the default; jsonlines writes one line per list item; text/csv, text/plain,
    `tensor/npz`, `application/x-npy` and `image/<format>` (a PIL image) write those formats; any
    other type gets DJL's NDList (`tensor/ndlist`). The response Content-Type is set to match.
    """
    media = _media_type(content_type)
    if _is_jsonlines(media):
        return _add(outputs, encode_jsonlines(prediction), key, "application/jsonlines")
    if not media or "application/json" in media or media == "*/*":
        outputs.add_as_json(prediction, key=key)
        return outputs.add_property("Content-Type", "application/json")
    if "text/csv" in media:
        return _add(outputs, encode_csv(prediction), key, "text/csv")
    if media.startswith("text/"):
        return _add(outputs, str(prediction), key, "text/plain")
    if "tensor/npz" in media:
        outputs.add_as_npz(prediction, key=key)
        return outputs.add_property("Content-Type", "tensor/npz")
    if media == "application/x-npy":
        return _add(outputs, encode_npy(prediction), key, "application/x-npy")
    if media.startswith("image/"):
        return _add(outputs, encode_image(prediction, media), key, media)
    outputs.add_as_numpy(prediction, key=key)
    return outputs.add_property("Content-Type", "tensor/ndlist")


def _add(outputs: Output, value: str | bytes, key: str | None, content_type: str) -> Output:
    outputs.add(value, key=key)
    return outputs.add_property("Content-Type", content_type)


def encode_jsonlines(prediction: Any) -> bytes:
    """A list (or array) as one compact JSON line per item; anything else as a single line."""
    if hasattr(prediction, "tolist"):
        prediction = prediction.tolist()
    items = prediction if isinstance(prediction, (list, tuple)) else [prediction]
    return b"".join(json_compact(item) + b"\n" for item in items)


def encode_npy(prediction: Any) -> bytes:
    """One array as a `.npy` file; a one-element list is unwrapped, a longer one stacked."""
    import numpy as np

    if isinstance(prediction, (list, tuple)) and len(prediction) == 1:
        prediction = prediction[0]
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(prediction), allow_pickle=False)
    return buffer.getvalue()


def encode_image(image: Any, media: str) -> bytes:
    """A PIL image in the format the media type names (`image/png`, `image/jpeg`, ...)."""
    if not hasattr(image, "save"):
        raise TypeError(f"{media} output needs a PIL image, got {type(image).__name__}")
    fmt = media.split("/", 1)[1].upper()
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if fmt == "JPG" else fmt)
    return buffer.getvalue()
