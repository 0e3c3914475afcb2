"""A custom DJL-style handler: word statistics for each input text.

It shows the whole handler contract: the warm-up call with an empty Input carrying the init
properties, dynamic batches (is_batch/get_batches and batch_index on the way out), JSON in and out,
request properties (HTTP headers) and response properties (HTTP headers).
"""

from djl_python import Input, Output

_state = {}


def _initialize(properties: dict) -> None:
    _state["greeting"] = properties.get("greeting", "hello")
    _state["model_dir"] = properties.get("model_dir")


def _one(item: Input) -> dict:
    body = item.get_as_json()
    text = body["inputs"] if isinstance(body, dict) else str(body)
    words = text.split()
    return {
        "words": len(words),
        "longest": max(words, key=len) if words else "",
        "greeting": _state["greeting"],
    }


def handle(inputs: Input) -> Output | None:
    if not _state:
        _initialize(inputs.get_properties())
    if inputs.is_empty():
        return None  # the warm-up call at start-up
    batches = inputs.get_batches()
    output = Output()
    for index, item in enumerate(batches):
        result = _one(item)
        result["batch_size"] = len(batches)
        output.add_as_json(result, batch_index=index if inputs.is_batch() else None)
    return output.add_property("X-Handler", "custom-example")
