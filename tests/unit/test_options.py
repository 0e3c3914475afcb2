"""The option declaration (serving/options.py): complete, consistent with its readers, and with the README."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, free_port

from engines.base import EngineConfig
from serving.config import SERVER_FIELDS, ServingConfig, load_config
from serving.errors import ConfigError
from serving.options import (
    COMPAT_KEYS,
    DTYPE_CHOICES,
    KERNEL_CHOICES,
    OPTIONS,
    OUTPUT_FORMATTER_CHOICES,
    TASK_CHOICES,
    markdown_table,
    settings_from_properties,
)
from serving.security import SECRET_KEYS
from serving.server import write_runtime_files

TYPES = (int, float, bool, str, tuple)


# ---- the declaration itself ----------------------------------------------------------------------


@pytest.mark.parametrize("spec", OPTIONS.values(), ids=lambda spec: spec.key)
def test_every_key_has_a_type_a_one_line_doc_and_a_default_of_that_type(spec):
    assert spec.type in TYPES
    assert spec.doc.strip()
    assert "\n" not in spec.doc
    assert spec.default is None or isinstance(spec.default, spec.type)
    assert spec.default is not None or spec.type is not bool
    assert not spec.choices or spec.type is str


@pytest.mark.parametrize("spec", OPTIONS.values(), ids=lambda spec: spec.key)
def test_every_default_is_an_allowed_value(spec):
    if spec.default is not None and spec.type is not tuple:
        assert spec.convert(str(spec.default)) == spec.default


def test_keys_and_aliases_are_declared_once_and_never_also_compat():
    keys = [key for spec in OPTIONS.values() for key in spec.keys]
    assert len(keys) == len(set(keys))
    assert not set(keys) & COMPAT_KEYS


def test_choices_match_what_the_engines_and_handlers_accept():
    from engines.hf.loading import DTYPES
    from engines.hf.tasks import TASK_ALIASES, TASKS
    from engines.kernels.ops import CHOICES
    from handlers.builtin.formats.factory import OUTPUT_FORMATTERS

    assert set(TASK_CHOICES) == set(TASKS.names()) | set(TASK_ALIASES)
    assert set(DTYPE_CHOICES) == set(DTYPES) | {"auto"}
    assert KERNEL_CHOICES == CHOICES
    assert OUTPUT_FORMATTER_CHOICES == OUTPUT_FORMATTERS


def test_engine_config_defaults_are_the_declared_defaults():
    shared = [f for f in dataclasses.fields(EngineConfig) if f"option.{f.name}" in OPTIONS]
    assert {f.name for f in shared} >= {"dtype", "device", "max_rolling_batch_size", "kernels", "num_threads"}
    for f in shared:
        assert f.default == OPTIONS[f"option.{f.name}"].default, f.name


def test_serving_config_defaults_are_the_declared_defaults():
    defaults = ServingConfig(model_dir=None)
    for field_name, key in SERVER_FIELDS.items():
        expected = OPTIONS[key].default
        if key == "maxWorkers":  # computed: minWorkers
            expected = OPTIONS["minWorkers"].default
        assert getattr(defaults, field_name) == expected, field_name


# ---- the README is generated from the declaration -----------------------------------------------


def _readme_table(heading: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(heading + "\n") :]
    lines = section.splitlines()[2:]
    return "\n".join(line for line in lines[: lines.index("")] if line.startswith("|"))


@pytest.mark.parametrize(
    ("heading", "table"),
    [
        ("### Server and model keys", markdown_table(option_keys=False)),
        ("### `option.*` keys", markdown_table(option_keys=True)),
    ],
)
def test_readme_tables_are_generated_from_the_declaration(heading, table):
    assert _readme_table(heading) == table, (
        "README.md's configuration tables are out of date: paste the output of `python -m serving.options`."
    )


def test_readme_tables_list_every_declared_key_once():
    listed = re.findall(r"^\| `([^`]+)`", _readme_table("### Server and model keys"), re.M)
    listed += re.findall(r"^\| `([^`]+)`", _readme_table("### `option.*` keys"), re.M)
    assert sorted(listed) == sorted(OPTIONS)


# ---- validation at start-up ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "key", "expected"),
    [
        ("OPTION_MAX_ROLLING_BATCH_SIZE", "abc", "option.max_rolling_batch_size", "a positive integer"),
        ("OPTION_MAX_MODEL_LEN", "0", "option.max_model_len", "a positive integer"),
        ("OPTION_KV_CACHE_MEMORY_BYTES", "1GB", "option.kv_cache_memory_bytes", "bytes, a positive integer"),
        ("OPTION_KERNELS", "flash", "option.kernels", "one of auto, native, triton, torch"),
        ("OPTION_DTYPE", "fp8", "option.dtype", "one of auto, fp32, fp16, bf16"),
        ("OPTION_DEVICE", "gpu", "option.device", "auto, cpu, cuda or cuda:N"),
        ("OPTION_DEVICE", "cuda:x", "option.device", "auto, cpu, cuda or cuda:N"),
        ("OPTION_OUTPUT_FORMATTER", "xml", "option.output_formatter", "one of json, jsonlines, sse"),
        ("OPTION_TGI_COMPAT", "maybe", "option.tgi_compat", "true or false"),
        ("OPTION_TRUST_REMOTE_CODE", "sure", "option.trust_remote_code", "true or false"),
        ("HF_MODEL_TRUST_REMOTE_CODE", "2", "option.trust_remote_code", "true or false"),
        ("OPTION_ALLOW_UNSAFE_WEIGHTS", "y", "option.allow_unsafe_weights", "true or false"),
        ("OPTION_TASK", "text-to-pizza", "option.task", "one of text-generation"),
        ("OPTION_NUM_THREADS", "0", "option.num_threads", "a positive integer"),
        ("OPTION_DOWNLOAD_WORKERS", "-2", "option.download_workers", "a positive integer"),
        ("OPTION_ALLOW_PATTERNS", "[1, 2]", "option.allow_patterns", "a JSON list of strings"),
        ("SERVING_LOG_LEVEL", "loud", "log_level", "one of debug, info, warning, error, critical"),
    ],
)
def test_bad_values_fail_naming_key_value_source_and_fix(variable, value, key, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, {variable: value})
    message = str(info.value)
    assert message.startswith(f"Invalid value {value!r} for {key} (from environment variable {variable})")
    assert expected in message
    assert f"Fix: set {key}=<" in message


def test_typed_values_reach_the_config_settings():
    env = {"OPTION_MAX_ROLLING_BATCH_SIZE": "8", "OPTION_TGI_COMPAT": "TRUE", "OPTION_DTYPE": "BF16"}
    settings = load_config(None, env).settings
    assert settings["max_rolling_batch_size"] == 8
    assert settings["tgi_compat"] is True
    assert settings["dtype"] == "bf16"
    assert settings["max_model_len"] is None
    assert settings["device"] == "auto"
    assert set(settings) == {spec.name for spec in OPTIONS.values()} - SECRET_KEYS  # the key: config.api_key


def test_empty_value_means_the_default():
    assert load_config(None, {"OPTION_MAX_MODEL_LEN": " "}).settings["max_model_len"] is None


def test_alias_key_sets_the_value():
    settings = load_config(None, {"OPTION_S3URL": "s3://bucket/model/"}).settings
    assert settings["model_id"] == "s3://bucket/model/"


def test_worker_spec_carries_typed_options_and_string_properties(tmp_path: Path):
    config = load_config(None, {"OPTION_MAX_MODEL_LEN": "64", "OPTION_MY_FLAG": "yes"})
    with open(write_runtime_files(config, str(tmp_path)), encoding="utf-8") as fh:
        spec = json.load(fh)
    assert spec["options"]["max_model_len"] == 64
    assert spec["options"]["trust_remote_code"] is False
    assert spec["properties"]["max_model_len"] == "64"
    assert spec["properties"]["my_flag"] == "yes"  # undeclared keys still reach the handler as strings
    assert all(isinstance(value, str) for value in spec["properties"].values())


def test_settings_from_handler_properties_match_the_start_up_values():
    env = {"OPTION_MAX_ROLLING_BATCH_SIZE": "4", "OPTION_KERNELS": "torch", "SERVING_JOB_QUEUE_SIZE": "7"}
    config = load_config(None, env)
    settings = settings_from_properties(config.handler_properties())
    for name in ("max_rolling_batch_size", "kernels", "job_queue_size", "predict_timeout", "device"):
        assert settings[name] == config.settings[name]


def test_settings_from_handler_properties_reject_bad_values():
    with pytest.raises(ConfigError, match="Invalid value 'x' for option.max_model_len"):
        settings_from_properties({"max_model_len": "x"})


# ---- unknown and compatibility keys -------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "key", "suggestion"),
    [
        ("OPTION_NUM_THREAD", "option.num_thread", "option.num_threads"),
        ("OPTION_DEVICES", "option.devices", "option.device"),
        ("OPTION_MAX_ROLLING_BATCHSIZE", "option.max_rolling_batchsize", "option.max_rolling_batch_size"),
    ],
)
def test_unknown_keys_warn_with_the_closest_known_key(caplog, variable, key, suggestion):
    with caplog.at_level(logging.WARNING, logger="serving.config"):
        config = load_config(None, {variable: "1"})
    assert f"Unknown property {key!r}" in caplog.text
    assert f"Did you mean {suggestion!r}?" in caplog.text
    assert config.handler_properties()[key.removeprefix("option.")] == "1"


def test_compat_keys_are_accepted_without_a_warning(caplog):
    with caplog.at_level(logging.INFO, logger="serving.config"):
        load_config(None, {"OPTION_MPI_MODE": "true"})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "'option.mpi_mode' is accepted for DJL compatibility" in caplog.text


# ---- lmi serve ----------------------------------------------------------------------------------


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "SERVING_", "HF_MODEL"))}
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--port", str(free_port())]
    return subprocess.run(cmd, cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60)


def test_lmi_serve_exits_2_on_a_bad_value_before_loading_anything():
    result = _serve({"OPTION_MAX_ROLLING_BATCH_SIZE": "abc"})
    assert result.returncode == 2
    assert "Invalid value 'abc' for option.max_rolling_batch_size" in result.stderr
    assert "environment variable OPTION_MAX_ROLLING_BATCH_SIZE" in result.stderr
    assert "Fix: set option.max_rolling_batch_size=<a positive integer>" in result.stderr
    assert "Started model worker" not in result.stderr


def test_lmi_serve_exits_2_on_a_bad_device():
    result = _serve({"OPTION_DEVICE": "gpu"})
    assert result.returncode == 2
    assert "Invalid value 'gpu' for option.device" in result.stderr


def test_lmi_serve_exits_2_on_a_bad_log_level():
    result = _serve({"SERVING_LOG_LEVEL": "loud"})
    assert result.returncode == 2
    assert "Invalid log level 'loud'" in result.stderr
