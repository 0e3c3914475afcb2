"""Run a handler without a server: request builders, output readers and DJL's `djl-test-model` CLI.

DJL's own tests and many users' notebooks build `Input`s with these helpers and call `handle()`
directly, so the names, arguments and key layouts follow `djl_python.test_model`:

    python -m djl_python.test_model --model-dir ./my-model --input request.json

loads the model folder's handler (model.py, option.entryPoint or the built-in one), sends the file as
one request with `serving.properties` and `OPTION_*` variables as its properties, and prints the answer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from handlers import loader
from handlers.codecs import binary_decode, encode_ndlist, encode_npz, json_body
from handlers.djl_api import Input, Output, PairList
from handlers.sagemaker import SageMakerHandler, is_sagemaker_module

_KEY = re.compile(r"[\w.\-]+")
_CONTENT_TYPES = {
    ".json": "application/json",
    ".txt": "text/plain",
    ".csv": "text/csv",
    ".jsonl": "application/jsonlines",
    ".gif": "image/gif",
    ".png": "image/png",
    ".jpeg": "image/jpeg",
    ".jpg": "image/jpeg",
    ".ndlist": "tensor/ndlist",
    ".npy": "application/x-npy",
    ".npz": "tensor/npz",
}


# ---- request builders ----------------------------------------------------------------------------


def _request(content_type: str, value: bytes, key: str | None) -> Input:
    request = Input()
    request.properties["device_id"] = "-1"
    request.properties["content-type"] = content_type
    request.content.add("data" if key is None else key, value)
    return request


def create_text_request(text: str, key: str | None = None) -> Input:
    """A `text/plain` request whose content `key` (default `data`) is `text`."""
    return _request("text/plain", text.encode("utf-8"), key)


def create_json_request(data: Any, key: str | None = None) -> Input:
    """An `application/json` request carrying `data` encoded as JSON."""
    return _request("application/json", json.dumps(data).encode("utf-8"), key)


def create_numpy_request(np_list: Iterable[Any], key: str | None = None) -> Input:
    """A `tensor/ndlist` request (DJL's NDList encoding) of the given arrays."""
    return _request("tensor/ndlist", encode_ndlist(np_list), key)


def create_npz_request(np_list: Iterable[Any], key: str | None = None) -> Input:
    """A `tensor/npz` request of the given arrays."""
    return _request("tensor/npz", encode_npz(np_list), key)


def create_request(input_files: list[str], parameters: list[str] | None = None) -> Input:
    """The CLI's request: each `[key=]FILE` becomes content (a value that is no file is sent as text).

    `parameters` (`k=v`) become properties. The content type follows the data file's extension.
    """
    request = Input()
    request.properties["device_id"] = "-1"
    for parameter in parameters or []:
        name, sep, value = parameter.partition("=")
        if not sep:
            raise ValueError(f"Invalid model parameter: {parameter!r}; expected key=value")
        request.properties[name] = value
    data_file = None
    for item in input_files:
        key, value = _split_input(item)
        if data_file is None or key == "data":
            data_file = value
        if os.path.isfile(value):
            with open(value, "rb") as f:
                request.content.add(key or "data", f.read())
        else:
            request.content.add(key or "data", value.encode("utf-8"))
            is_json = value.startswith("{") and value.endswith("}")
            request.properties["content-type"] = "application/json" if is_json else "text/plain"
    extension = os.path.splitext(data_file or "")[1].lower()
    if extension in _CONTENT_TYPES:
        request.properties["content-type"] = _CONTENT_TYPES[extension]
    return request


def _split_input(item: str) -> tuple[str | None, str]:
    """`key=value` names a content entry; a bare file or literal text (even with `=` inside) does not."""
    key, sep, value = item.partition("=")
    if sep and _KEY.fullmatch(key) and not os.path.exists(item):
        return key, value
    return None, item


def create_concurrent_batch_request(
    inputs: list[Any], properties: list[dict[str, str]] | None = None, serving_properties: dict | None = None
) -> Input:
    """One batched Input as DJL sends a dynamic batch: `batch_NNN_<key>` properties and data.

    `serving_properties` stay unprefixed (shared by every request); each input is JSON-encoded.
    """
    flat = dict(serving_properties or {})
    for index, item_properties in enumerate(properties or []):
        for key, value in item_properties.items():
            flat[f"batch_{index:03d}_{key}"] = value
    batch = Input()
    batch.properties = flat
    batch.function_name = flat.get("handler", "handle")
    batch.content = PairList(pair_list=[(f"batch_{i:03d}_data", json_body(d)) for i, d in enumerate(inputs)])
    flat["batch_size"] = str(len(inputs))
    return batch


# ---- output readers ------------------------------------------------------------------------------


def extract_output_as_input(outputs: Output) -> Input:
    """View an Output as an Input, so the `get_as_*` decoders can read what a handler answered."""
    inputs = Input()
    inputs.properties = outputs.properties
    inputs.content = outputs.content
    return inputs


def extract_output_as_bytes(outputs: Output, key: str | None = None) -> bytes | None:
    return extract_output_as_input(outputs).get_as_bytes(key)


def extract_output_as_string(outputs: Output, key: str | None = None) -> str | None:
    return extract_output_as_input(outputs).get_as_string(key)


def extract_output_as_numpy(outputs: Output, key: str | None = None) -> list[Any]:
    return extract_output_as_input(outputs).get_as_numpy(key)


def extract_output_as_npz(outputs: Output, key: str | None = None) -> list[Any]:
    return extract_output_as_input(outputs).get_as_npz(key)


def decode_encoded_output_binary(binary: bytes) -> dict[str, str | None]:
    """Read a rolling-batch payload written by `Output.binary_encode`."""
    return binary_decode(bytes(binary))


# ---- properties ----------------------------------------------------------------------------------


def load_properties(properties_dir: str | None) -> dict[str, str]:
    """`serving.properties` of a model folder, `option.` stripped; {} without one."""
    path = os.path.join(properties_dir or "", "serving.properties")
    if not properties_dir or not os.path.isfile(path):
        return {}
    properties = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: line {line!r} is not key=value")
            properties[key.strip().removeprefix("option.")] = value.strip()
    return properties


def update_properties_with_env_vars(kwargs: dict[str, str]) -> dict[str, str]:
    """Add `OPTION_<KEY>` variables as lower-case keys (`entryPoint` keeps its case); existing keys win."""
    for name, value in os.environ.items():
        if name.startswith("OPTION_"):
            key = name[len("OPTION_") :].lower()
            kwargs.setdefault("entryPoint" if key == "entrypoint" else key, value)
    if os.environ.get("HF_MODEL_ID"):
        kwargs.setdefault("model_id", os.environ["HF_MODEL_ID"])
    return kwargs


# ---- the handler ---------------------------------------------------------------------------------


class TestHandler:
    """Calls a handler module the way the model server would, minus the server.

    `entry_point` is a module, a module name or a file (relative to `model_dir`). The request's
    properties get `model_dir` and, as defaults, the folder's serving properties (so a handler that
    initialises from its first Input sees its options). A module without the handler function but
    with SageMaker `model_fn`-style functions runs through the SageMaker adapter, as on the server.
    """

    __test__ = False  # a helper named like a test class; keep pytest from collecting it

    def __init__(self, entry_point: str | ModuleType | None, model_dir: str | None = None) -> None:
        self.model_dir = os.path.abspath(model_dir) if model_dir else None
        self.serving_properties = update_properties_with_env_vars({})
        self.serving_properties.update(load_properties(self.model_dir))
        if isinstance(entry_point, ModuleType):
            self.module = entry_point
        else:
            properties = dict(self.serving_properties)
            if entry_point:
                properties["entryPoint"] = entry_point
            self.module = loader.load_entry_point(loader.resolve_entry_point(self.model_dir, properties))
        self._sagemaker: SageMakerHandler | None = None

    def inference(self, inputs: Input) -> Output | None:
        """Run the handler function the Input names (`handle` by default) on it."""
        for key, value in self.serving_properties.items():
            inputs.properties.setdefault(key, value)
        if self.model_dir:
            inputs.properties["model_dir"] = self.model_dir
        return self._function(inputs.get_function_name() or "handle")(inputs)

    def inference_batch(
        self,
        inputs: list[Any],
        properties: list[dict[str, str]] | None = None,
        serving_properties: dict | None = None,
    ) -> Output | None:
        """Send `inputs` as one dynamic batch (see `create_concurrent_batch_request`)."""
        shared = self.serving_properties if serving_properties is None else serving_properties
        return self.inference(create_concurrent_batch_request(inputs, properties, shared))

    def _function(self, name: str) -> Callable[[Input], Output | None]:
        function = getattr(self.module, name, None)
        if callable(function):
            return function
        if is_sagemaker_module(self.module):
            if self._sagemaker is None:
                self._sagemaker = SageMakerHandler(self.module, self.model_dir)
            return self._sagemaker.handle
        if loader.has_builtin_model(self.model_dir, self.serving_properties):
            # as on the server: a model.py with only formatters runs the built-in handler, which uses them
            return loader.load_entry_point(loader.BUILTIN_ENTRY_POINT).handle
        raise AttributeError(
            f"{self.module.__name__} defines no handler function {name}(inputs), no SageMaker model_fn, "
            "and the model folder has no weights or option.model_id for the built-in handler."
        )


# ---- the CLI -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="djl-test-model", description="Run a DJL handler on one request")
    parser.add_argument("--model-dir", dest="model_dir", help="model folder (default: the current one)")
    parser.add_argument(
        "--entry-point",
        dest="entry_point",
        help="handler file or module (default: option.entryPoint, model.py, or the built-in handler)",
    )
    parser.add_argument("--handler", default="handle", help="function to call (default: handle)")
    parser.add_argument(
        "--input", nargs="+", default=["input.txt"], help="[key=]file or literal text, one per content entry"
    )
    parser.add_argument("--parameters", nargs="*", default=[], help="key=value request properties")
    return parser.parse_args(argv)


def output_text(outputs: Output | None) -> str:
    """What the CLI prints: status, headers, and the body (each stream chunk on its own)."""
    if outputs is None:
        return "204 No content"
    lines = [f"{outputs.code} {outputs.message}"]
    lines += [f"{key}: {value}" for key, value in outputs.properties.items()]
    lines.append("")
    for key, value in outputs.content:
        prefix = "" if key == "data" else f"[{key}] "
        lines.append(prefix + bytes(value).decode("utf-8", errors="replace"))
    lines += [chunk.decode("utf-8", errors="replace") for chunk in outputs.iter_stream()]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    """`djl-test-model`: exit status 0 when the handler answered below 300."""
    logging.basicConfig(stream=sys.stderr, format="%(message)s", level=logging.INFO)
    args = parse_args(argv)
    model_dir = os.path.abspath(args.model_dir or ".")
    inputs = create_request(args.input, args.parameters)
    inputs.properties["handler"] = args.handler
    os.chdir(model_dir)  # the server runs handlers in their model folder; relative paths must agree
    outputs = TestHandler(args.entry_point, model_dir).inference(inputs)
    print(output_text(outputs))
    return 0 if outputs is None or outputs.code < 300 else 1


if __name__ == "__main__":
    sys.exit(run())
