"""The typed, frozen server configuration, built once at start-up from properties and environment."""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from serving.errors import ConfigError
from serving.properties import Properties, load_properties

log = logging.getLogger("serving.config")

SAGEMAKER_MODEL_DIR = "/opt/ml/model"
DEFAULT_MAX_REQUEST_SIZE = 6 * 1024 * 1024
DEFAULT_MODEL_LOADING_TIMEOUT_S = 240.0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError
    return value


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError


ROLLING_BATCH_CHOICES = ("auto", "lmi-dist", "scheduler", "vllm", "trtllm", "disable")


def _rolling_batch(text: str) -> str:
    value = text.strip().lower()
    if value not in ROLLING_BATCH_CHOICES:
        raise ValueError
    return value


def _port_range(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not match or int(match[1]) > int(match[2]):
        raise ValueError
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class Spec:
    """How one property key becomes one typed field."""

    keys: tuple[str, ...]
    parse: Callable[[str], Any]
    expected: str


# field name → the property keys that set it (first wins) and how to parse them.
SPECS: dict[str, Spec] = {
    "job_queue_size": Spec(("job_queue_size",), _positive_int, "a positive integer"),
    "batch_size": Spec(("batch_size", "max_dynamic_batch_size"), _positive_int, "a positive integer"),
    "max_batch_delay_ms": Spec(("max_batch_delay",), _non_negative_int, "milliseconds, an integer >= 0"),
    "min_workers": Spec(("minWorkers", "cpu.minWorkers", "min_workers"), _positive_int, "a positive integer"),
    "max_workers": Spec(("maxWorkers", "cpu.maxWorkers", "max_workers"), _positive_int, "a positive integer"),
    "retry_threshold": Spec(("retry_threshold",), _non_negative_int, "an integer >= 0"),
    "max_rolling_batch_prefill_tokens": Spec(
        ("option.max_rolling_batch_prefill_tokens",), _positive_int, "a positive integer"
    ),
    "predict_timeout_s": Spec(("option.predict_timeout",), _positive_float, "seconds, a number > 0"),
    "model_loading_timeout_s": Spec(("option.model_loading_timeout",), _positive_float, "seconds > 0"),
    "max_request_size": Spec(("max_request_size",), _positive_int, "bytes, a positive integer"),
    "http_workers": Spec(("http_workers",), _positive_int, "a positive integer"),
    "rolling_batch": Spec(
        ("option.rolling_batch",), _rolling_batch, "one of " + ", ".join(ROLLING_BATCH_CHOICES)
    ),
    "fail_fast": Spec(("fail_fast",), _boolean, "true or false"),
    "safe_port_range": Spec(("sagemaker_safe_port_range",), _port_range, "a range like 20000-20999"),
}

KNOWN_SERVER_KEYS = {k for spec in SPECS.values() for k in spec.keys} | {
    "engine",
    "model_name",
    "load_on_devices",
    "max_idle_time",
    "gpu.minWorkers",
    "gpu.maxWorkers",
    "required_memory_mb",
    "reserved_memory_mb",
    "gpu.required_memory_mb",
    "gpu.reserved_memory_mb",
    "log_request_metric",
    "metrics_aggregation",
    "metric_dimension",
    "translatorFactory",
    "download_dir",
    "log_level",
    "health_check_override",
    "prometheus",
    "features",
}

KNOWN_OPTIONS = {
    "model_id",
    "s3url",
    "revision",
    "trust_remote_code",
    "dtype",
    "task",
    "entryPoint",
    "handler",
    "predict_timeout",
    "model_loading_timeout",
    "rolling_batch",
    "max_rolling_batch_size",
    "max_rolling_batch_prefill_tokens",
    "max_model_len",
    "tensor_parallel_degree",
    "pipeline_parallel_degree",
    "allow_unsafe_weights",
    "output_formatter",
    "tgi_compat",
    "device_map",
    "quantize",
    "enable_streaming",
    "pythonExecutable",
    "env",
    "parallel_loading",
    "mpi_mode",
    "async_mode",
    "low_cpu_mem_usage",
    "normalize",
    "gpu_memory_utilization",
    "enforce_eager",
    "max_num_seqs",
    "kv_cache_memory_bytes",
    "kernels",
    "download_timeout",
    "download_workers",
    "download_retries",
    "allow_patterns",
    "ignore_patterns",
    "chat_template",
    "pooling",
    "max_length",
    "truncation",
}


@dataclass(frozen=True)
class ServingConfig:
    """Everything the server needs, validated once; nothing reads the environment after this."""

    model_dir: str | None
    """Folder holding serving.properties / model.py / weights; None serves the default model."""
    model_name: str = "model"
    host: str = "127.0.0.1"
    port: int = 8080
    job_queue_size: int = 1000
    """Requests waiting for a worker beyond this are refused at once with 503."""
    batch_size: int = 1
    max_batch_delay_ms: int = 100
    min_workers: int = 1
    max_workers: int = 1
    retry_threshold: int = 10
    """Worker crashes tolerated before the model is marked FAILED (ping → 500)."""
    predict_timeout_s: float = 120.0
    model_loading_timeout_s: float = DEFAULT_MODEL_LOADING_TIMEOUT_S
    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE
    http_workers: int = 1
    rolling_batch: str = "auto"
    max_rolling_batch_prefill_tokens: int = 4096
    """Prompt tokens the rolling batch admits per step (a lone longer prompt still goes alone)."""
    fail_fast: bool = False
    safe_port_range: tuple[int, int] | None = None
    options: dict[str, str] = field(default_factory=dict)
    """option.* keys without the prefix, handed to the handler on initialisation."""
    model_properties: dict[str, str] = field(default_factory=dict)
    """Non-option model keys (engine, batch_size, minWorkers, ...), also handed to the handler."""

    @property
    def num_workers(self) -> int:
        return max(self.min_workers, 1)

    def worker_env(self) -> dict[str, str]:
        """option.env=K=V,K2=V2: extra environment for the model worker processes."""
        pairs = (item.partition("=") for item in self.options.get("env", "").split(","))
        return {k.strip(): v.strip() for k, sep, v in pairs if sep and k.strip()}

    def handler_properties(self) -> dict[str, str]:
        """The init properties DJL gives handle(): options without prefix, model keys, model_dir."""
        props = dict(self.model_properties)
        props.update(self.options)
        props.pop("env", None)  # applied to the worker's environment instead (worker_env)
        props.setdefault("model_name", self.model_name)
        if self.model_dir:
            props["model_dir"] = self.model_dir
        return props


def _closest(key: str, known: set[str]) -> str:
    match = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f" Did you mean {match[0]!r}?" if match else ""


def _warn_unknown(props: Properties) -> None:
    option_keys = {"option." + k for k in KNOWN_OPTIONS}
    for key in props.values:
        if key.startswith("option."):
            if key not in option_keys:
                log.warning(
                    "Unknown property %r (from %s).%s", key, props.source(key), _closest(key, option_keys)
                )
        elif not key.startswith("batch_") and key not in KNOWN_SERVER_KEYS:
            hint = _closest(key, KNOWN_SERVER_KEYS | option_keys)
            log.warning("Unknown property %r (from %s).%s", key, props.source(key), hint)


def _typed_values(props: Properties) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, spec in SPECS.items():
        key = next((k for k in spec.keys if k in props.values), None)
        if key is None:
            continue
        raw = props.values[key]
        try:
            out[name] = spec.parse(raw)
        except ValueError:
            raise ConfigError(
                f"Invalid value {raw!r} for {key} (from {props.source(key)}): expected {spec.expected}. "
                f"Fix: set {key}=<{spec.expected}> or remove it to use the default."
            ) from None
    return out


def _validate(values: dict[str, Any]) -> None:
    lo, hi = values.get("min_workers", 1), values.get("max_workers", values.get("min_workers", 1))
    if lo > hi:
        raise ConfigError(
            f"minWorkers={lo} is greater than maxWorkers={hi}. Fix: set minWorkers <= maxWorkers "
            "(model workers are heavy: set both to the same value)."
        )


def _check_download_keys(props: dict[str, str]) -> None:
    """Bad download settings stop start-up here, not minutes later inside a model worker."""
    from serving.artifacts import FetchOptions

    try:
        FetchOptions.from_properties(props)
    except ValueError as exc:
        raise ConfigError(f"Invalid download setting: {exc}. Fix or remove it.") from None


def load_config(
    model_dir: str | None,
    environ: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
) -> ServingConfig:
    """Merge serving.properties and environment into one validated ServingConfig."""
    environ = dict(os.environ if environ is None else environ)
    if model_dir is not None and not os.path.isdir(model_dir):
        raise ConfigError(f"Model directory {model_dir!r} does not exist. Fix: pass an existing folder.")
    props = load_properties(model_dir, environ)
    if "SAGEMAKER_SAFE_PORT_RANGE" in environ:
        props.set_default(
            "sagemaker_safe_port_range",
            environ["SAGEMAKER_SAFE_PORT_RANGE"],
            "environment variable SAGEMAKER_SAFE_PORT_RANGE",
        )
    _warn_unknown(props)
    values = _typed_values(props)
    values.setdefault("max_workers", max(values.get("min_workers", 1), 1))
    values.setdefault("min_workers", 1)
    _validate(values)
    options = {k[len("option.") :]: v for k, v in props.values.items() if k.startswith("option.")}
    model_props = {k: v for k, v in props.values.items() if not k.startswith("option.")}
    name = model_props.get("model_name") or (
        os.path.basename(os.path.abspath(model_dir)) if model_dir else "model"
    )
    known = {f.name for f in fields(ServingConfig)}
    _check_download_keys({**model_props, **options})
    return ServingConfig(
        model_dir=os.path.abspath(model_dir) if model_dir else None,
        model_name=re.sub(r"\W", "_", name),
        host=host,
        port=port if port is not None else 8080,
        options=options,
        model_properties=model_props,
        **{k: v for k, v in values.items() if k in known},
    )
