"""The typed, frozen server configuration, built once at start-up from properties and environment."""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from serving.errors import ConfigError
from serving.options import COMPAT_KEYS, KNOWN_KEYS, OPTIONS, parse_settings
from serving.properties import Properties, load_properties
from serving.security import SECRET_KEYS, check_tls, read_api_key

log = logging.getLogger("serving.config")

SAGEMAKER_MODEL_DIR = "/opt/ml/model"
DEFAULT_MAX_REQUEST_SIZE: int = OPTIONS["max_request_size"].default
DEFAULT_MODEL_LOADING_TIMEOUT_S: float = OPTIONS["option.model_loading_timeout"].default

SERVER_FIELDS = {
    "job_queue_size": "job_queue_size",
    "batch_size": "batch_size",
    "max_batch_delay_ms": "max_batch_delay",
    "min_workers": "minWorkers",
    "max_workers": "maxWorkers",
    "retry_threshold": "retry_threshold",
    "predict_timeout_s": "option.predict_timeout",
    "model_loading_timeout_s": "option.model_loading_timeout",
    "max_request_size": "max_request_size",
    "http_workers": "http_workers",
    "rolling_batch": "option.rolling_batch",
    "fail_fast": "fail_fast",
    "safe_port_range": "sagemaker_safe_port_range",
    "multi_model": "sagemaker_multi_model",
    "enable_management_api": "enable_management_api",
    "management_address": "management_address",
    "memory_budget_mb": "memory_budget_mb",
    "log_format": "log_format",
    "access_log": "access_log",
    "log_requests": "log_requests",
    "metrics": "metrics",
    "metrics_require_key": "metrics_require_key",
    "tls_cert": "tls_cert",
    "tls_key": "tls_key",
    "keepalive_timeout_s": "keepalive_timeout",
    "request_body_timeout_s": "request_body_timeout",
    "limit_request_line": "limit_request_line",
    "limit_request_fields": "limit_request_fields",
    "limit_request_field_size": "limit_request_field_size",
}
"""ServingConfig field → the declared key (serving/options.py) it comes from."""


def _default(field_name: str) -> Any:
    return OPTIONS[SERVER_FIELDS[field_name]].default


@dataclass(frozen=True)
class ServingConfig:
    """Everything the server needs, validated once; nothing reads the environment after this.

    Field meanings are the docs of the keys in serving/options.py (see SERVER_FIELDS)."""

    model_dir: str | None
    """Folder holding serving.properties / model.py / weights; None serves the default model."""
    model_name: str = "model"
    host: str = "127.0.0.1"
    port: int = 8080
    job_queue_size: int = _default("job_queue_size")
    batch_size: int = _default("batch_size")
    max_batch_delay_ms: int = _default("max_batch_delay_ms")
    min_workers: int = _default("min_workers")
    max_workers: int = _default("min_workers")  # maxWorkers defaults to minWorkers
    retry_threshold: int = _default("retry_threshold")
    predict_timeout_s: float = _default("predict_timeout_s")
    model_loading_timeout_s: float = _default("model_loading_timeout_s")
    max_request_size: int = _default("max_request_size")
    http_workers: int = _default("http_workers")
    rolling_batch: str = _default("rolling_batch")
    fail_fast: bool = _default("fail_fast")
    safe_port_range: tuple[int, int] | None = None
    multi_model: bool = _default("multi_model")
    enable_management_api: bool = _default("enable_management_api")
    management_address: str = _default("management_address")
    memory_budget_mb: int | None = None
    log_format: str = _default("log_format")
    access_log: bool = _default("access_log")
    log_requests: bool = _default("log_requests")
    metrics: bool = _default("metrics")
    api_key: str | None = field(default=None, repr=False)
    """From api_key or api_key_file (serving/security.py); kept out of reprs, logs and worker specs."""
    metrics_require_key: bool = _default("metrics_require_key")
    tls_cert: str | None = None
    tls_key: str | None = None
    keepalive_timeout_s: int = _default("keepalive_timeout_s")
    request_body_timeout_s: float = _default("request_body_timeout_s")
    limit_request_line: int = _default("limit_request_line")
    limit_request_fields: int = _default("limit_request_fields")
    limit_request_field_size: int = _default("limit_request_field_size")
    options: dict[str, str] = field(default_factory=dict)
    """option.* keys without the prefix, handed to the handler on initialisation."""
    model_properties: dict[str, str] = field(default_factory=dict)
    """Non-option model keys (engine, batch_size, minWorkers, ...), also handed to the handler."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Every declared key's typed value (defaults filled), by name without ``option.``: what the
    model worker reads instead of re-parsing strings."""

    @property
    def num_workers(self) -> int:
        return max(self.min_workers, 1)

    @property
    def dynamic_models(self) -> bool:
        """Whether models can be loaded and unloaded at run time (routing then asks the broker)."""
        return self.multi_model or self.enable_management_api

    @property
    def inference_address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def management_port(self) -> int | None:
        """The port the management API listens on; None when it is disabled."""
        if not self.enable_management_api:
            return None
        return int(self.management_address.rsplit(":", 1)[1])

    @property
    def serves_startup_model(self) -> bool:
        """A multi-model endpoint starts empty unless it was given a model folder or option.model_id."""
        return not self.multi_model or bool(self.model_dir or self.settings.get("model_id"))

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
    option_keys = {k for k in KNOWN_KEYS if k.startswith("option.")}
    for key in props.values:
        if key in KNOWN_KEYS or key.startswith("batch_"):
            if key in COMPAT_KEYS:
                log.info("Property %r is accepted for DJL compatibility and has no effect here.", key)
            continue
        known = option_keys if key.startswith("option.") else set(KNOWN_KEYS)
        log.warning("Unknown property %r (from %s).%s", key, props.source(key), _closest(key, known))


def _validate(settings: dict[str, Any]) -> None:
    lo, hi = settings["minWorkers"], settings["maxWorkers"]
    if lo > hi:
        raise ConfigError(
            f"minWorkers={lo} is greater than maxWorkers={hi}. Fix: set minWorkers <= maxWorkers "
            "(model workers are heavy: set both to the same value)."
        )
    _validate_parallel(settings)


def _validate_parallel(settings: dict[str, Any]) -> None:
    """A multi-node group needs its rendezvous and a node rank inside it."""
    nnodes, node = settings["nnodes"], settings["node_rank"]
    if node >= nnodes:
        raise ConfigError(
            f"option.node_rank={node} is not below option.nnodes={nnodes}. Fix: number the nodes 0..nnodes-1."
        )
    if nnodes > 1 and (not settings["master_addr"] or settings["master_port"] is None):
        raise ConfigError(
            f"option.nnodes={nnodes} needs option.master_addr and option.master_port (MASTER_ADDR and "
            "MASTER_PORT, as torchrun uses): where node 0 lets the ranks meet."
        )
    world = settings.get("world_size")
    degrees = settings["tensor_parallel_degree"] * settings["pipeline_parallel_degree"]
    if world is not None and degrees and world != degrees:
        raise ConfigError(
            f"WORLD_SIZE={world} but tensor_parallel_degree x pipeline_parallel_degree = {degrees}. Fix: "
            "make them agree (WORLD_SIZE counts every rank of the group, on every node)."
        )


ENV_SERVER_KEYS = {
    "SAGEMAKER_SAFE_PORT_RANGE": "sagemaker_safe_port_range",
    "SAGEMAKER_MULTI_MODEL": "sagemaker_multi_model",
}
"""SageMaker variables that set a server key where the properties are silent."""


def load_config(
    model_dir: str | None,
    environ: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    overrides: Mapping[str, str] | None = None,
) -> ServingConfig:
    """Merge serving.properties and environment into one validated ServingConfig.

    ``overrides`` (keys as in serving.properties) win over both: the parameters of a management-API
    load request, as in DJL."""
    environ = dict(os.environ if environ is None else environ)
    if model_dir is not None and not os.path.isdir(model_dir):
        raise ConfigError(f"Model directory {model_dir!r} does not exist. Fix: pass an existing folder.")
    props = load_properties(model_dir, environ)
    for variable, key in ENV_SERVER_KEYS.items():
        if variable in environ:
            props.set_default(key, environ[variable], f"environment variable {variable}")
    for key, value in (overrides or {}).items():
        props.force(key, value, "the load request's parameters")
    _warn_unknown(props)
    settings = parse_settings(props.values, {key: props.source(key) for key in props.values})
    if settings["maxWorkers"] is None:
        settings["maxWorkers"] = settings["minWorkers"]
    if environ.get("WORLD_SIZE", "").isdigit():
        settings["world_size"] = int(environ["WORLD_SIZE"])
    _validate(settings)
    api_key = read_api_key(props, environ)
    check_tls(settings["tls_cert"], settings["tls_key"])
    settings = {k: v for k, v in settings.items() if k not in SECRET_KEYS}
    options = {k[len("option.") :]: v for k, v in props.values.items() if k.startswith("option.")}
    model_props = {
        k: v for k, v in props.values.items() if not k.startswith("option.") and k not in SECRET_KEYS
    }
    name = settings["model_name"] or (os.path.basename(os.path.abspath(model_dir)) if model_dir else "model")
    settings["model_name"] = re.sub(r"\W", "_", name)  # what /ping, /v1/models and every answer say
    return ServingConfig(
        model_dir=os.path.abspath(model_dir) if model_dir else None,
        model_name=settings["model_name"],
        host=host,
        port=port if port is not None else 8080,
        options=options,
        model_properties=model_props,
        settings=settings,
        api_key=api_key,
        **{field_name: settings[OPTIONS[key].name] for field_name, key in SERVER_FIELDS.items()},
    )
