"""Find the user's handler: option.entryPoint → <model_dir>/model.py → a built-in handler."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

log = logging.getLogger("handlers.loader")

BUILTIN_ENTRY_POINT = "handlers.builtin.huggingface"
# DJL module names that existing serving.properties files name; they map onto our built-ins.
DJL_ALIASES = {
    "djl_python.huggingface": BUILTIN_ENTRY_POINT,
    "djl_python.transformers_neuronx": BUILTIN_ENTRY_POINT,
    "djl_python.deepspeed": BUILTIN_ENTRY_POINT,
    "djl_python.lmi_vllm.vllm_async_service": BUILTIN_ENTRY_POINT,
}


class HandlerLoadError(RuntimeError):
    """The entry point cannot be found or imported; the message names what was tried."""


def load_module_from_file(path: str) -> ModuleType:
    """Import a .py file under a unique name, with its folder importable (for sibling modules)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise HandlerLoadError(f"Entry point file {path!r} does not exist.")
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = model_module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise HandlerLoadError(f"Cannot import {path!r} as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a half-run module must not be found again as if it had loaded
        raise
    return module


def model_module_name(path: str) -> str:
    """The unique module name a file is imported under; the same file always gets the same name."""
    return "model_" + hashlib.md5(os.path.abspath(path).encode()).hexdigest()[:8]  # noqa: S324 - a name


def load_model_py(model_dir: str | None) -> ModuleType | None:
    """`<model_dir>/model.py`, imported once per process (reusing the entry point's import), or None."""
    if not model_dir or not os.path.isfile(os.path.join(model_dir, "model.py")):
        return None
    path = os.path.join(model_dir, "model.py")
    return sys.modules.get(model_module_name(path)) or load_module_from_file(path)


def find_decorated_function(module: ModuleType, decorator_attribute: str) -> Callable[..., Any] | None:
    """The first callable in `module` carrying `decorator_attribute` (how DJL finds @input_formatter)."""
    for name in dir(module):
        obj = getattr(module, name)
        if callable(obj) and getattr(obj, decorator_attribute, False) is True:
            return obj
    return None


def get_annotated_function(model_dir: str | None, decorator_attribute: str) -> Callable[..., Any] | None:
    """The function of the model folder's model.py marked with `decorator_attribute`, if any."""
    module = load_model_py(model_dir)
    return None if module is None else find_decorated_function(module, decorator_attribute)


def has_builtin_model(model_dir: str | None, properties: dict[str, str]) -> bool:
    """Whether the built-in Hugging Face handler applies (weights, a model id, or the default model)."""
    if properties.get("model_id") or properties.get("s3url") or model_dir is None:
        return True
    files = os.listdir(model_dir)
    return "config.json" in files or any(f.endswith(".gguf") for f in files)


def resolve_entry_point(model_dir: str | None, properties: dict[str, str]) -> str:
    """Return a file path or module name, in DJL's order of precedence."""
    entry = properties.get("entryPoint")
    if entry:
        if entry.endswith(".py"):
            return entry if os.path.isabs(entry) or model_dir is None else os.path.join(model_dir, entry)
        return DJL_ALIASES.get(entry, entry)
    if model_dir and os.path.isfile(os.path.join(model_dir, "model.py")):
        return os.path.join(model_dir, "model.py")
    if has_builtin_model(model_dir, properties):
        return BUILTIN_ENTRY_POINT
    raise HandlerLoadError(
        f"No handler for model folder {model_dir!r}: it has no model.py, no config.json or .gguf "
        "weights, and no option.model_id / option.entryPoint. Fix: add a model.py defining "
        "handle(inputs) (see properties_examples/custom-handler/model.py) or point option.model_id "
        "at a Hugging Face model."
    )


def load_entry_point(entry: str) -> ModuleType:
    if entry.endswith(".py"):
        return load_module_from_file(entry)
    try:
        return importlib.import_module(entry)
    except ImportError as exc:
        raise HandlerLoadError(f"Cannot import entry point module {entry!r}: {exc}") from exc
