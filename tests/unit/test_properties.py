"""serving.properties parsing (java.util.Properties syntax) and DJL's environment-override precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.properties import Properties, env_option_key, load_properties, parse_properties


def write_props(model_dir: Path, text: str) -> Path:
    path = model_dir / "serving.properties"
    path.write_text(text, encoding="utf-8")
    return path


# ---- parse_properties: Java syntax ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "key", "value"),
    [
        ("engine=Python", "engine", "Python"),
        ("engine: Python", "engine", "Python"),
        ("engine Python", "engine", "Python"),
        ("engine\tPython", "engine", "Python"),
        ("engine  =   Python", "engine", "Python"),
        ("engine : Python", "engine", "Python"),
        ("   engine=Python", "engine", "Python"),
        ("option.model_id=a=b", "option.model_id", "a=b"),
        ("option.model_id x=y", "option.model_id", "x=y"),
        ("url=http://host:8080/x", "url", "http://host:8080/x"),
    ],
)
def test_separators(line: str, key: str, value: str):
    assert parse_properties(line) == {key: value}


def test_trailing_whitespace_of_value_is_kept_as_java_does():
    assert parse_properties("a = b  ") == {"a": "b  "}


def test_hash_and_bang_comments_and_blank_lines_are_skipped():
    text = "# a comment\n! another comment\n\n   # indented comment\na=1\n   \n!b=2\n"
    assert parse_properties(text) == {"a": "1"}


def test_hash_inside_a_value_is_not_a_comment():
    assert parse_properties("a=x # not a comment") == {"a": "x # not a comment"}


def test_empty_values():
    assert parse_properties("a=\nb:\nc\nd =  \n") == {"a": "", "b": "", "c": "", "d": ""}


def test_continuation_strips_leading_whitespace_of_continued_lines():
    text = "option.chat_template=Hello \\\n      world \\\n\t  again\nnext=1\n"
    assert parse_properties(text) == {"option.chat_template": "Hello world again", "next": "1"}


def test_continuation_without_space_before_backslash_joins_directly():
    assert parse_properties("a=foo\\\n   bar") == {"a": "foobar"}


def test_continued_line_starting_with_hash_is_data_not_a_comment():
    assert parse_properties("a=x\\\n  #y\nb=2") == {"a": "x#y", "b": "2"}


def test_comment_line_ending_in_backslash_does_not_continue():
    assert parse_properties("# comment \\\na=1") == {"a": "1"}


def test_even_run_of_backslashes_is_an_escaped_backslash_not_a_continuation():
    assert parse_properties("path=C:\\\\dir\\\\\nnext=1") == {"path": "C:\\dir\\", "next": "1"}


def test_blank_line_after_continuation_ends_the_value():
    assert parse_properties("a=1 \\\n\nb=2") == {"a": "1 ", "b": "2"}


def test_continuation_at_end_of_file():
    assert parse_properties("a=1\\") == {"a": "1"}


def test_escapes_in_values():
    assert parse_properties(r"a=tab\there\nnew\rret\fff") == {"a": "tab\there\nnew\rret\fff"}
    assert parse_properties(r"u=\u0041\u00e9") == {"u": "Aé"}
    assert parse_properties(r"o=\q\=\:") == {"o": "q=:"}


def test_escaped_separators_inside_keys():
    assert parse_properties(r"my\ key=v") == {"my key": "v"}
    assert parse_properties(r"a\=b=c") == {"a=b": "c"}
    assert parse_properties(r"a\:b:c") == {"a:b": "c"}


def test_windows_line_endings():
    assert parse_properties("a=1\r\nb=2\r\n") == {"a": "1", "b": "2"}


def test_later_duplicate_key_wins():
    assert parse_properties("a=1\na=2") == {"a": "2"}


# ---- env_option_key ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ("OPTION_FOO_BAR", "option.foo_bar"),
        ("OPTION_MODEL_ID", "option.model_id"),
        ("OPTION_TENSOR_PARALLEL_DEGREE2", "option.tensor_parallel_degree2"),
        ("OPTION_ENTRYPOINT", "option.entryPoint"),
        ("OPTION_ENGINE", "engine"),
        ("OPTION_entryPoint", "option.entryPoint"),
        ("OPTION_maxRollingBatch", "option.maxRollingBatch"),
        ("OPTION_Mixed_CASE", "option.Mixed_CASE"),
    ],
)
def test_env_option_key(env: str, key: str):
    assert env_option_key(env) == key


# ---- load_properties: precedence -----------------------------------------------------------------


def test_no_file_and_no_env_gives_nothing(tmp_path: Path):
    props = load_properties(str(tmp_path), {})
    assert props.values == {}
    assert props.source("anything") == "default"


def test_no_model_dir_reads_only_the_environment():
    props = load_properties(None, {"OPTION_MODEL_ID": "gpt2"})
    assert props.values == {"option.model_id": "gpt2"}


def test_file_values_are_loaded_with_their_source(tmp_path: Path):
    path = write_props(tmp_path, "engine=Python\noption.model_id=gpt2\n")
    props = load_properties(str(tmp_path), {})
    assert props.values == {"engine": "Python", "option.model_id": "gpt2"}
    assert props.source("option.model_id") == str(path)


def test_file_value_beats_option_env(tmp_path: Path):
    path = write_props(tmp_path, "option.model_id=from-file\n")
    props = load_properties(str(tmp_path), {"OPTION_MODEL_ID": "from-env", "OPTION_DTYPE": "fp16"})
    assert props.values["option.model_id"] == "from-file"
    assert props.source("option.model_id") == str(path)
    assert props.values["option.dtype"] == "fp16"
    assert props.source("option.dtype") == "environment variable OPTION_DTYPE"


def test_option_env_mapping_special_cases(tmp_path: Path):
    env = {
        "OPTION_FOO_BAR": "1",
        "OPTION_ENTRYPOINT": "handler.py",
        "OPTION_ENGINE": "Python",
        "OPTION_camelCase": "x",
    }
    props = load_properties(str(tmp_path), env)
    assert props.values == {
        "option.foo_bar": "1",
        "option.entryPoint": "handler.py",
        "engine": "Python",
        "option.camelCase": "x",
    }
    assert props.source("engine") == "environment variable OPTION_ENGINE"


def test_bare_prefix_env_names_are_ignored(tmp_path: Path):
    props = load_properties(str(tmp_path), {"OPTION_": "x", "SERVING_": "y"})
    assert props.values == {}


def test_empty_env_values_are_ignored(tmp_path: Path):
    env = {
        "OPTION_MODEL_ID": "",
        "HF_MODEL_ID": "",
        "SERVING_BATCH_SIZE": "",
        "SAGEMAKER_MAX_PAYLOAD_IN_MB": "",
        "SAGEMAKER_NUM_MODEL_WORKERS": "",
    }
    assert load_properties(str(tmp_path), env).values == {}


def test_empty_option_env_does_not_block_an_alias(tmp_path: Path):
    props = load_properties(str(tmp_path), {"OPTION_MODEL_ID": "", "HF_MODEL_ID": "gpt2"})
    assert props.values == {"option.model_id": "gpt2"}
    assert props.source("option.model_id") == "environment variable HF_MODEL_ID"


def test_serving_env_fills_server_wide_defaults(tmp_path: Path):
    props = load_properties(str(tmp_path), {"SERVING_BATCH_SIZE": "4", "SERVING_JOB_QUEUE_SIZE": "10"})
    assert props.values == {"batch_size": "4", "job_queue_size": "10"}
    assert props.source("batch_size") == "environment variable SERVING_BATCH_SIZE"


def test_serving_env_does_not_override_the_file(tmp_path: Path):
    write_props(tmp_path, "batch_size=2\n")
    props = load_properties(str(tmp_path), {"SERVING_BATCH_SIZE": "8"})
    assert props.values["batch_size"] == "2"


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ("HF_MODEL_ID", "option.model_id"),
        ("HF_REVISION", "option.revision"),
        ("HF_TASK", "option.task"),
        ("HF_MODEL_TRUST_REMOTE_CODE", "option.trust_remote_code"),
        ("HF_MODEL_QUANTIZE", "option.quantize"),
        ("TENSOR_PARALLEL_DEGREE", "option.tensor_parallel_degree"),
        ("SM_NUM_GPUS", "option.tensor_parallel_degree"),
        ("MAX_BATCH_SIZE", "option.max_rolling_batch_size"),
        ("MAX_BATCH_PREFILL_TOKENS", "option.max_rolling_batch_prefill_tokens"),
        ("MAX_CONCURRENT_REQUESTS", "job_queue_size"),
        ("SAGEMAKER_STARTUP_TIMEOUT", "option.model_loading_timeout"),
        ("SAGEMAKER_MODEL_SERVER_TIMEOUT", "option.predict_timeout"),
        ("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS", "option.predict_timeout"),
        ("SAGEMAKER_MAX_REQUEST_SIZE", "max_request_size"),
        ("DJL_ENTRY_POINT", "option.entryPoint"),
    ],
)
def test_aliases(tmp_path: Path, env: str, key: str):
    props = load_properties(str(tmp_path), {env: "7"})
    assert props.values == {key: "7"}
    assert props.source(key) == f"environment variable {env}"


def test_alias_does_not_override_the_file(tmp_path: Path):
    write_props(tmp_path, "option.model_id=file-model\noption.predict_timeout=30\n")
    props = load_properties(
        str(tmp_path), {"HF_MODEL_ID": "env-model", "SAGEMAKER_MODEL_SERVER_TIMEOUT": "5"}
    )
    assert props.values["option.model_id"] == "file-model"
    assert props.values["option.predict_timeout"] == "30"


def test_option_env_beats_alias(tmp_path: Path):
    props = load_properties(str(tmp_path), {"OPTION_MODEL_ID": "explicit", "HF_MODEL_ID": "alias"})
    assert props.values["option.model_id"] == "explicit"


def test_tensor_parallel_degree_beats_sm_num_gpus(tmp_path: Path):
    props = load_properties(str(tmp_path), {"SM_NUM_GPUS": "8", "TENSOR_PARALLEL_DEGREE": "2"})
    assert props.values["option.tensor_parallel_degree"] == "2"


def test_serving_job_queue_size_beats_tgi_alias_max_concurrent_requests(tmp_path: Path):
    # The spec (§1.1, translateTGIToLMI): MAX_CONCURRENT_REQUESTS -> SERVING_JOB_QUEUE_SIZE applies
    # only if the LMI variable is unset, so an explicit SERVING_JOB_QUEUE_SIZE must win.
    props = load_properties(str(tmp_path), {"MAX_CONCURRENT_REQUESTS": "5", "SERVING_JOB_QUEUE_SIZE": "7"})
    assert props.values["job_queue_size"] == "7"
    assert props.source("job_queue_size") == "environment variable SERVING_JOB_QUEUE_SIZE"


def test_sagemaker_num_model_workers_overrides_even_the_file(tmp_path: Path):
    write_props(tmp_path, "minWorkers=1\nmaxWorkers=1\n")
    props = load_properties(str(tmp_path), {"SAGEMAKER_NUM_MODEL_WORKERS": "3"})
    assert props.values["minWorkers"] == "3"
    assert props.values["maxWorkers"] == "3"
    assert props.source("minWorkers") == "environment variable SAGEMAKER_NUM_MODEL_WORKERS"
    assert props.source("maxWorkers") == "environment variable SAGEMAKER_NUM_MODEL_WORKERS"


def test_sagemaker_max_payload_in_mb_becomes_bytes(tmp_path: Path):
    props = load_properties(str(tmp_path), {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "6"})
    assert props.values["max_request_size"] == str(6 * 1024 * 1024)
    assert props.source("max_request_size") == "environment variable SAGEMAKER_MAX_PAYLOAD_IN_MB"


def test_fractional_max_payload_in_mb(tmp_path: Path):
    props = load_properties(str(tmp_path), {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "0.5"})
    assert props.values["max_request_size"] == str(512 * 1024)


def test_non_numeric_max_payload_is_kept_verbatim_for_validation(tmp_path: Path):
    props = load_properties(str(tmp_path), {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "lots"})
    assert props.values["max_request_size"] == "lots"


def test_sagemaker_max_request_size_beats_max_payload_in_mb(tmp_path: Path):
    env = {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "6", "SAGEMAKER_MAX_REQUEST_SIZE": "1000"}
    props = load_properties(str(tmp_path), env)
    assert props.values["max_request_size"] == "1000"
    assert props.source("max_request_size") == "environment variable SAGEMAKER_MAX_REQUEST_SIZE"


def test_file_max_request_size_beats_max_payload_in_mb(tmp_path: Path):
    write_props(tmp_path, "max_request_size=123\n")
    props = load_properties(str(tmp_path), {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "6"})
    assert props.values["max_request_size"] == "123"


def test_unrelated_environment_is_ignored(tmp_path: Path):
    props = load_properties(str(tmp_path), {"PATH": "/usr/bin", "HOME": "/root", "MY_OPTION_X": "1"})
    assert props.values == {}


def test_serving_properties_that_is_a_directory_is_ignored(tmp_path: Path):
    (tmp_path / "serving.properties").mkdir()
    assert load_properties(str(tmp_path), {}).values == {}


# ---- Properties ----------------------------------------------------------------------------------


def test_set_default_keeps_first_and_ignores_empty():
    props = Properties()
    props.set_default("a", "", "s0")
    assert "a" not in props.values
    props.set_default("a", "1", "s1")
    props.set_default("a", "2", "s2")
    assert props.values == {"a": "1"}
    assert props.source("a") == "s1"


def test_force_replaces_value_and_source():
    props = Properties()
    props.set_default("a", "1", "s1")
    props.force("a", "2", "s2")
    assert props.values == {"a": "2"}
    assert props.source("a") == "s2"
