"""load_config: typed, validated, frozen ServingConfig with messages that say what to fix."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from serving.config import DEFAULT_MAX_REQUEST_SIZE, ServingConfig, load_config
from serving.errors import ConfigError


def model_dir(tmp_path: Path, properties: str | None = None, name: str = "mymodel") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    if properties is not None:
        (folder / "serving.properties").write_text(properties, encoding="utf-8")
    return folder


def config_error(folder: Path | None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(str(folder) if folder else None, environ or {})
    return str(info.value)


# ---- defaults and typed values -------------------------------------------------------------------


def test_defaults(tmp_path: Path):
    folder = model_dir(tmp_path)
    config = load_config(str(folder), {})
    assert config.model_dir == str(folder.resolve())
    assert config.model_name == "mymodel"
    assert config.host == "127.0.0.1"
    assert config.port == 8080
    assert config.job_queue_size == 1000
    assert config.batch_size == 1
    assert config.max_batch_delay_ms == 100
    assert config.min_workers == 1
    assert config.max_workers == 1
    assert config.num_workers == 1
    assert config.retry_threshold == 10
    assert config.predict_timeout_s == 120.0
    assert config.model_loading_timeout_s == 240.0
    assert config.max_request_size == DEFAULT_MAX_REQUEST_SIZE == 6 * 1024 * 1024
    assert config.http_workers == 1
    assert config.rolling_batch == "auto"
    assert config.fail_fast is False
    assert config.safe_port_range is None
    assert config.options == {}
    assert config.model_properties == {}


def test_no_model_dir_serves_the_default_model():
    config = load_config(None, {})
    assert config.model_dir is None
    assert config.model_name == "model"
    assert config.handler_properties() == {"model_name": "model"}


def test_host_and_port_are_passed_through(tmp_path: Path):
    config = load_config(str(model_dir(tmp_path)), {}, host="0.0.0.0", port=9001)
    assert (config.host, config.port) == ("0.0.0.0", 9001)


def test_typed_values_from_the_file(tmp_path: Path):
    folder = model_dir(
        tmp_path,
        "job_queue_size=50\n"
        "batch_size=4\n"
        "max_batch_delay=0\n"
        "minWorkers=2\n"
        "maxWorkers=3\n"
        "retry_threshold=0\n"
        "option.predict_timeout=2.5\n"
        "option.model_loading_timeout=600\n"
        "max_request_size=2048\n"
        "http_workers=2\n"
        "option.rolling_batch=Auto\n"
        "fail_fast=TRUE\n"
        "sagemaker_safe_port_range= 20000 - 20999 \n",
    )
    config = load_config(str(folder), {})
    assert config.job_queue_size == 50
    assert config.batch_size == 4
    assert config.max_batch_delay_ms == 0
    assert (config.min_workers, config.max_workers, config.num_workers) == (2, 3, 2)
    assert config.retry_threshold == 0
    assert config.predict_timeout_s == 2.5
    assert config.model_loading_timeout_s == 600.0
    assert config.max_request_size == 2048
    assert config.http_workers == 2
    assert config.rolling_batch == "auto"
    assert config.fail_fast is True
    assert config.safe_port_range == (20000, 20999)


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("1", True), ("yes", True), ("No", False)])
def test_fail_fast_booleans(tmp_path: Path, text: str, expected: bool):
    config = load_config(str(model_dir(tmp_path)), {"SERVING_FAIL_FAST": text})
    assert config.fail_fast is expected


def test_alias_keys(tmp_path: Path):
    folder = model_dir(tmp_path, "max_dynamic_batch_size=8\ncpu.minWorkers=2\ncpu.maxWorkers=2\n")
    config = load_config(str(folder), {})
    assert config.batch_size == 8
    assert (config.min_workers, config.max_workers) == (2, 2)


def test_batch_size_beats_max_dynamic_batch_size(tmp_path: Path):
    folder = model_dir(tmp_path, "max_dynamic_batch_size=8\nbatch_size=2\n")
    assert load_config(str(folder), {}).batch_size == 2


def test_values_from_the_environment(tmp_path: Path):
    env = {
        "SERVING_BATCH_SIZE": "3",
        "SERVING_MIN_WORKERS": "2",
        "SERVING_MAX_WORKERS": "2",
        "SAGEMAKER_MODEL_SERVER_TIMEOUT": "30",
        "SAGEMAKER_MAX_PAYLOAD_IN_MB": "1",
        "SAGEMAKER_SAFE_PORT_RANGE": "1000-2000",
        "MAX_CONCURRENT_REQUESTS": "12",
    }
    config = load_config(str(model_dir(tmp_path)), env)
    assert config.batch_size == 3
    assert (config.min_workers, config.max_workers) == (2, 2)
    assert config.predict_timeout_s == 30.0
    assert config.max_request_size == 1024 * 1024
    assert config.safe_port_range == (1000, 2000)
    assert config.job_queue_size == 12


def test_environ_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SERVING_BATCH_SIZE", "5")
    assert load_config(str(model_dir(tmp_path))).batch_size == 5


def test_min_workers_alone_sets_max_workers_too(tmp_path: Path):
    config = load_config(str(model_dir(tmp_path, "minWorkers=4\n")), {})
    assert (config.min_workers, config.max_workers, config.num_workers) == (4, 4, 4)


def test_max_workers_alone_keeps_min_workers_at_one(tmp_path: Path):
    config = load_config(str(model_dir(tmp_path, "maxWorkers=4\n")), {})
    assert (config.min_workers, config.max_workers) == (1, 4)


def test_sagemaker_num_model_workers_overrides_the_file(tmp_path: Path):
    folder = model_dir(tmp_path, "minWorkers=1\nmaxWorkers=1\n")
    config = load_config(str(folder), {"SAGEMAKER_NUM_MODEL_WORKERS": "3"})
    assert (config.min_workers, config.max_workers, config.num_workers) == (3, 3, 3)


def test_model_name_is_the_folder_name_with_non_word_characters_replaced(tmp_path: Path):
    folder = model_dir(tmp_path, name="my-model.v1")
    assert load_config(str(folder), {}).model_name == "my_model_v1"


def test_model_name_property_is_used_and_not_reported_unknown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    folder = model_dir(tmp_path, "model_name=chat-bot\n")
    with caplog.at_level(logging.WARNING, logger="serving.config"):
        config = load_config(str(folder), {})
    assert config.model_name == "chat_bot"
    # load_config reads model_name, so it must not also tell the user the key is unknown.
    assert "model_name" not in caplog.text


def test_relative_model_dir_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    model_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    config = load_config("mymodel", {})
    assert config.model_dir == str((tmp_path / "mymodel").resolve())


# ---- validation messages -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("job_queue_size", "0", "a positive integer"),
        ("option.max_rolling_batch_prefill_tokens", "0", "a positive integer"),
        ("batch_size", "abc", "a positive integer"),
        ("max_dynamic_batch_size", "-1", "a positive integer"),
        ("max_batch_delay", "-5", "milliseconds, an integer >= 0"),
        ("max_batch_delay", "1.5", "milliseconds, an integer >= 0"),
        ("minWorkers", "0", "a positive integer"),
        ("maxWorkers", "many", "a positive integer"),
        ("retry_threshold", "-1", "an integer >= 0"),
        ("option.predict_timeout", "0", "seconds, a number > 0"),
        ("option.predict_timeout", "soon", "seconds, a number > 0"),
        ("option.model_loading_timeout", "-3", "seconds, a number > 0"),
        ("max_request_size", "1MB", "bytes, a positive integer"),
        ("http_workers", "two", "a positive integer"),
        ("fail_fast", "maybe", "true or false"),
        ("sagemaker_safe_port_range", "20999-20000", "a range like 20000-20999"),
        ("sagemaker_safe_port_range", "20000", "a range like 20000-20999"),
    ],
)
def test_invalid_file_value_message_names_key_value_source_and_fix(
    tmp_path: Path, key: str, value: str, expected: str
):
    folder = model_dir(tmp_path, f"{key}={value}\n")
    message = config_error(folder)
    source = str(folder / "serving.properties")
    assert message == (
        f"Invalid value {value!r} for {key} (from {source}): expected {expected}. "
        f"Fix: set {key}=<{expected}> or remove it to use the default."
    )


def test_invalid_env_value_message_names_the_variable(tmp_path: Path):
    message = config_error(model_dir(tmp_path), {"OPTION_PREDICT_TIMEOUT": "abc"})
    assert "'abc'" in message
    assert "option.predict_timeout" in message
    assert "(from environment variable OPTION_PREDICT_TIMEOUT)" in message
    assert "Fix: set option.predict_timeout=" in message


def test_invalid_max_payload_in_mb_names_the_variable(tmp_path: Path):
    message = config_error(model_dir(tmp_path), {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "lots"})
    assert "'lots'" in message
    assert "max_request_size" in message
    assert "environment variable SAGEMAKER_MAX_PAYLOAD_IN_MB" in message


def test_invalid_safe_port_range_env_names_the_variable(tmp_path: Path):
    message = config_error(model_dir(tmp_path), {"SAGEMAKER_SAFE_PORT_RANGE": "x-y"})
    assert "'x-y'" in message
    assert "environment variable SAGEMAKER_SAFE_PORT_RANGE" in message


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_predict_timeout_is_rejected(tmp_path: Path, value: str):
    # Accepted today, then serving/http_main.py crashes at start-up computing
    # int((2 * predict_timeout_s + 30) * 1000) in BrokerClient (ValueError / OverflowError).
    message = config_error(model_dir(tmp_path, f"option.predict_timeout={value}\n"))
    assert f"Invalid value {value!r} for option.predict_timeout" in message


def test_min_workers_greater_than_max_workers(tmp_path: Path):
    message = config_error(model_dir(tmp_path, "minWorkers=3\nmaxWorkers=2\n"))
    assert message.startswith("minWorkers=3 is greater than maxWorkers=2.")
    assert "Fix: set minWorkers <= maxWorkers" in message


def test_nonexistent_model_dir(tmp_path: Path):
    missing = tmp_path / "nope"
    message = config_error(missing)
    assert message == f"Model directory {str(missing)!r} does not exist. Fix: pass an existing folder."


def test_model_dir_that_is_a_file_is_rejected(tmp_path: Path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    assert "does not exist" in config_error(path)


@pytest.mark.parametrize("value", ["auto", "lmi-dist", "scheduler", "disable", "DISABLE"])
def test_valid_rolling_batch_values(tmp_path: Path, value: str):
    config = load_config(str(model_dir(tmp_path, f"option.rolling_batch={value}\n")), {})
    assert config.rolling_batch == value.lower()


def test_invalid_rolling_batch_names_key_value_and_allowed_values(tmp_path: Path):
    message = config_error(model_dir(tmp_path, "option.rolling_batch=turbo\n"))
    assert "'turbo'" in message
    assert "option.rolling_batch" in message
    for allowed in ("auto", "lmi-dist", "scheduler", "disable"):
        assert allowed in message


def test_invalid_rolling_batch_names_source_and_fix(tmp_path: Path):
    folder = model_dir(tmp_path, "option.rolling_batch=turbo\n")
    message = config_error(folder)
    assert str(folder / "serving.properties") in message
    assert "Fix:" in message


def test_invalid_rolling_batch_from_env_names_the_variable(tmp_path: Path):
    message = config_error(model_dir(tmp_path), {"OPTION_ROLLING_BATCH": "turbo"})
    assert "environment variable OPTION_ROLLING_BATCH" in message


# ---- unknown keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "key", "suggestion"),
    [
        ("option.entrypoint=model.py", "option.entrypoint", "option.entryPoint"),
        ("option.modelid=gpt2", "option.modelid", "option.model_id"),
        ("minWorker=2", "minWorker", "minWorkers"),
        ("job_queue_sizes=2", "job_queue_sizes", "job_queue_size"),
    ],
)
def test_unknown_key_warning_suggests_closest_known_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, line: str, key: str, suggestion: str
):
    folder = model_dir(tmp_path, line + "\n")
    with caplog.at_level(logging.WARNING, logger="serving.config"):
        load_config(str(folder), {})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"Unknown property {key!r} (from {folder / 'serving.properties'}). Did you mean {suggestion!r}?"
    ]


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="serving.config"):
        load_config(str(model_dir(tmp_path)), {"SERVING_XYZZY_FROBNICATE": "1"})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "Unknown property 'xyzzy_frobnicate' (from environment variable SERVING_XYZZY_FROBNICATE)."
    ]


def test_known_keys_do_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    folder = model_dir(
        tmp_path,
        "engine=Python\noption.model_id=gpt2\noption.entryPoint=model.py\nbatch_size=2\n"
        "gpu.maxWorkers=1\noption.tensor_parallel_degree=1\nmax_idle_time=60\n",
    )
    with caplog.at_level(logging.WARNING, logger="serving.config"):
        load_config(str(folder), {})
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_unknown_keys_are_still_passed_to_the_handler(tmp_path: Path):
    config = load_config(str(model_dir(tmp_path, "option.my_custom_flag=yes\ncustom_key=1\n")), {})
    assert config.options["my_custom_flag"] == "yes"
    assert config.model_properties["custom_key"] == "1"


# ---- handler properties and immutability ---------------------------------------------------------


def test_handler_properties_strip_option_prefix_and_add_model_dir(tmp_path: Path):
    folder = model_dir(tmp_path, "engine=Python\noption.model_id=gpt2\nbatch_size=2\n")
    config = load_config(str(folder), {"OPTION_DTYPE": "fp16"})
    assert config.options == {"model_id": "gpt2", "dtype": "fp16"}
    assert config.model_properties == {"engine": "Python", "batch_size": "2"}
    assert config.handler_properties() == {
        "engine": "Python",
        "batch_size": "2",
        "model_id": "gpt2",
        "dtype": "fp16",
        "model_dir": str(folder.resolve()),
        "model_name": "mymodel",
    }


def test_handler_properties_are_strings(tmp_path: Path):
    config = load_config(str(model_dir(tmp_path, "minWorkers=2\noption.predict_timeout=3\n")), {})
    props = config.handler_properties()
    assert props["minWorkers"] == "2"
    assert props["predict_timeout"] == "3"
    assert all(isinstance(v, str) for v in props.values())


def test_handler_properties_exclude_option_env(tmp_path: Path):
    # Spec §1.1: init properties are the option.* keys without prefix plus model keys;
    # "The `env` key is excluded" (it configures the Python process, not the handler).
    config = load_config(str(model_dir(tmp_path, "option.env=A=1,B=2\noption.model_id=gpt2\n")), {})
    assert "env" not in config.handler_properties()
    assert config.handler_properties()["model_id"] == "gpt2"


def test_handler_properties_returns_a_copy(tmp_path: Path):
    config = load_config(str(model_dir(tmp_path, "option.model_id=gpt2\n")), {})
    config.handler_properties()["model_id"] = "changed"
    assert config.handler_properties()["model_id"] == "gpt2"


def test_config_is_frozen(tmp_path: Path):
    config = load_config(str(model_dir(tmp_path)), {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 8  # type: ignore[misc]


def test_direct_construction_uses_the_same_defaults():
    config = ServingConfig(model_dir=None, max_request_size=10)
    assert config.max_request_size == 10
    assert config.batch_size == 1
    assert config.num_workers == 1
