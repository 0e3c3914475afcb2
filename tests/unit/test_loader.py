"""Entry point resolution: option.entryPoint (file, absolute path, module) → model.py → built-in."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from handlers import loader
from handlers.loader import (
    BUILTIN_ENTRY_POINT,
    HandlerLoadError,
    has_builtin_model,
    load_entry_point,
    load_module_from_file,
    resolve_entry_point,
)
from serving.config import load_config

pytestmark = pytest.mark.usefixtures("isolated_imports")


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


# ---- resolve_entry_point -------------------------------------------------------------------------


def test_entry_point_relative_file_is_resolved_in_the_model_dir(tmp_path: Path):
    write(tmp_path / "handler.py", "NAME = 'handler'\n")
    entry = resolve_entry_point(str(tmp_path), {"entryPoint": "handler.py"})
    assert entry == str(tmp_path / "handler.py")
    assert load_entry_point(entry).NAME == "handler"


def test_entry_point_relative_file_in_a_subfolder(tmp_path: Path):
    write(tmp_path / "code" / "inference.py", "NAME = 'sub'\n")
    entry = resolve_entry_point(str(tmp_path), {"entryPoint": "code/inference.py"})
    assert entry == str(tmp_path / "code" / "inference.py")
    assert load_entry_point(entry).NAME == "sub"


def test_entry_point_absolute_path(tmp_path: Path):
    elsewhere = write(tmp_path / "elsewhere" / "custom.py", "NAME = 'absolute'\n")
    folder = tmp_path / "model"
    folder.mkdir()
    entry = resolve_entry_point(str(folder), {"entryPoint": str(elsewhere)})
    assert entry == str(elsewhere)
    assert load_entry_point(entry).NAME == "absolute"


def test_entry_point_module_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    libs = tmp_path / "libs"
    write(libs / "lmi_test_entry_module.py", "NAME = 'module'\n")
    monkeypatch.syspath_prepend(str(libs))
    folder = tmp_path / "model"
    folder.mkdir()
    entry = resolve_entry_point(str(folder), {"entryPoint": "lmi_test_entry_module"})
    assert entry == "lmi_test_entry_module"
    assert load_entry_point(entry).NAME == "module"


def test_entry_point_dotted_module_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    write(tmp_path / "libs" / "lmi_test_pkg" / "__init__.py", "")
    write(tmp_path / "libs" / "lmi_test_pkg" / "service.py", "NAME = 'dotted'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "libs"))
    entry = resolve_entry_point(None, {"entryPoint": "lmi_test_pkg.service"})
    assert load_entry_point(entry).NAME == "dotted"


def test_entry_point_beats_model_py(tmp_path: Path):
    write(tmp_path / "model.py", "NAME = 'model'\n")
    write(tmp_path / "other.py", "NAME = 'other'\n")
    assert resolve_entry_point(str(tmp_path), {"entryPoint": "other.py"}) == str(tmp_path / "other.py")


def test_entry_point_beats_builtin(tmp_path: Path):
    write(tmp_path / "config.json", "{}")
    write(tmp_path / "other.py", "")
    props = {"entryPoint": "other.py", "model_id": "gpt2"}
    assert resolve_entry_point(str(tmp_path), props) == str(tmp_path / "other.py")


def test_model_py_fallback(tmp_path: Path):
    write(tmp_path / "model.py", "NAME = 'model'\n")
    write(tmp_path / "config.json", "{}")
    entry = resolve_entry_point(str(tmp_path), {"model_id": "gpt2"})
    assert entry == str(tmp_path / "model.py")
    assert load_entry_point(entry).NAME == "model"


@pytest.mark.parametrize(
    ("files", "properties"),
    [
        (["config.json"], {}),
        (["weights.Q4_K_M.gguf"], {}),
        ([], {"model_id": "gpt2"}),
        ([], {"s3url": "s3://bucket/model"}),
    ],
)
def test_builtin_when_weights_or_model_id(tmp_path: Path, files: list[str], properties: dict[str, str]):
    for name in files:
        write(tmp_path / name, "{}")
    assert has_builtin_model(str(tmp_path), properties)
    assert resolve_entry_point(str(tmp_path), properties) == BUILTIN_ENTRY_POINT


def test_builtin_when_no_model_dir():
    assert resolve_entry_point(None, {}) == BUILTIN_ENTRY_POINT


def test_empty_model_id_does_not_select_the_builtin(tmp_path: Path):
    assert not has_builtin_model(str(tmp_path), {"model_id": ""})


def test_nothing_applies_gives_a_clear_error(tmp_path: Path):
    write(tmp_path / "README.md", "hello")
    with pytest.raises(HandlerLoadError) as info:
        resolve_entry_point(str(tmp_path), {})
    message = str(info.value)
    assert repr(str(tmp_path)) in message
    assert "no model.py" in message
    assert "Fix: add a model.py defining handle(inputs)" in message
    assert "option.model_id" in message


@pytest.mark.parametrize(
    "alias",
    [
        "djl_python.huggingface",
        "djl_python.transformers_neuronx",
        "djl_python.deepspeed",
        "djl_python.lmi_vllm.vllm_async_service",
    ],
)
def test_djl_module_aliases_map_to_the_builtin(tmp_path: Path, alias: str):
    assert resolve_entry_point(str(tmp_path), {"entryPoint": alias}) == "handlers.builtin.huggingface"


def test_entry_point_from_environment_through_config(tmp_path: Path):
    write(tmp_path / "handler.py", "NAME = 'env'\n")
    config = load_config(str(tmp_path), {"OPTION_ENTRYPOINT": "handler.py"})
    entry = resolve_entry_point(config.model_dir, config.handler_properties())
    assert entry == str(tmp_path / "handler.py")


def test_djl_entry_point_env_through_config(tmp_path: Path):
    write(tmp_path / "handler.py", "NAME = 'env'\n")
    config = load_config(str(tmp_path), {"DJL_ENTRY_POINT": "handler.py"})
    assert resolve_entry_point(config.model_dir, config.handler_properties()) == str(tmp_path / "handler.py")


# ---- loading -------------------------------------------------------------------------------------


def test_model_py_can_import_a_sibling_module(tmp_path: Path):
    write(tmp_path / "lmi_test_sibling_helper.py", "def greet():\n    return 'hi from sibling'\n")
    write(
        tmp_path / "model.py",
        """
        import lmi_test_sibling_helper

        def handle(inputs):
            return lmi_test_sibling_helper.greet()
        """,
    )
    module = load_entry_point(resolve_entry_point(str(tmp_path), {}))
    assert module.handle(None) == "hi from sibling"


def test_two_model_py_files_load_as_distinct_modules(tmp_path: Path):
    first = write(tmp_path / "a" / "model.py", "NAME = 'a'\n")
    second = write(tmp_path / "b" / "model.py", "NAME = 'b'\n")
    module_a = load_module_from_file(str(first))
    module_b = load_module_from_file(str(second))
    assert (module_a.NAME, module_b.NAME) == ("a", "b")
    assert module_a.__name__ != module_b.__name__
    assert module_a.__name__.startswith("model_")


def test_missing_entry_point_file(tmp_path: Path):
    entry = resolve_entry_point(str(tmp_path), {"entryPoint": "missing.py"})
    with pytest.raises(HandlerLoadError, match="does not exist"):
        load_entry_point(entry)


def test_missing_entry_point_module():
    with pytest.raises(HandlerLoadError, match="Cannot import entry point module 'lmi_no_such_module_xyz'"):
        load_entry_point("lmi_no_such_module_xyz")


def test_syntax_error_in_model_py_propagates(tmp_path: Path):
    write(tmp_path / "model.py", "def handle(:\n")
    with pytest.raises(SyntaxError):
        load_entry_point(str(tmp_path / "model.py"))


def test_module_level_import_error_in_a_file_propagates(tmp_path: Path):
    write(tmp_path / "model.py", "import lmi_definitely_missing_dependency\n")
    with pytest.raises(ImportError, match="lmi_definitely_missing_dependency"):
        load_entry_point(str(tmp_path / "model.py"))


def test_handler_load_error_is_a_runtime_error():
    assert issubclass(loader.HandlerLoadError, RuntimeError)
