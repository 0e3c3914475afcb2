"""Read serving.properties (Java syntax) and merge environment overrides exactly as DJL does.

The result is a flat ``dict[str, str]`` plus, for each key, where it came from, so that
configuration errors can name the file or variable to fix.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}
_UPPER_KEY = re.compile(r"^[A-Z_\d]+$")

# Aliases applied only where neither the file nor OPTION_* set the target (DJL/SageMaker/TGI names).
_ENV_ALIASES: dict[str, str] = {
    "HF_MODEL_ID": "option.model_id",
    "HF_REVISION": "option.revision",
    "HF_TASK": "option.task",
    "HF_MODEL_TRUST_REMOTE_CODE": "option.trust_remote_code",
    "HF_MODEL_QUANTIZE": "option.quantize",
    "TENSOR_PARALLEL_DEGREE": "option.tensor_parallel_degree",
    "SM_NUM_GPUS": "option.tensor_parallel_degree",
    "PIPELINE_PARALLEL_DEGREE": "option.pipeline_parallel_degree",
    "NNODES": "option.nnodes",
    "NODE_RANK": "option.node_rank",
    "MASTER_ADDR": "option.master_addr",
    "MASTER_PORT": "option.master_port",
    "MAX_BATCH_SIZE": "option.max_rolling_batch_size",
    "MAX_BATCH_PREFILL_TOKENS": "option.max_rolling_batch_prefill_tokens",
    "MAX_CONCURRENT_REQUESTS": "job_queue_size",
    "SAGEMAKER_STARTUP_TIMEOUT": "option.model_loading_timeout",
    "MODEL_LOADING_TIMEOUT": "option.model_loading_timeout",
    "SAGEMAKER_MODEL_SERVER_TIMEOUT": "option.predict_timeout",
    "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "option.predict_timeout",
    "PREDICT_TIMEOUT": "option.predict_timeout",
    "SAGEMAKER_MAX_REQUEST_SIZE": "max_request_size",
    "DJL_ENTRY_POINT": "option.entryPoint",
}


@dataclass
class Properties:
    """Model properties with the origin of every value (for error messages)."""

    values: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def set_default(self, key: str, value: str, source: str) -> None:
        if value != "" and key not in self.values:
            self.values[key] = value
            self.sources[key] = source

    def force(self, key: str, value: str, source: str) -> None:
        self.values[key] = value
        self.sources[key] = source

    def source(self, key: str) -> str:
        return self.sources.get(key, "default")


def _logical_lines(text: str) -> list[str]:
    """Join backslash-continued lines; a line ends a continuation only on an odd run of backslashes."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.lstrip() if pending else raw.lstrip()
        if not pending and (not line or line[0] in "#!"):
            continue
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:
            pending += line[:-1]
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


def _unescape(text: str) -> str:
    result: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\" or i + 1 >= len(text):
            result.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[i + 2 : i + 6]):
            result.append(chr(int(text[i + 2 : i + 6], 16)))
            i += 6
            continue
        result.append(_ESCAPES.get(nxt, nxt))
        i += 2
    return "".join(result)


def _split_key_value(line: str) -> tuple[str, str]:
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == "\\":
            i += 2
            continue
        if ch in "=:" or ch.isspace():
            break
        i += 1
    key, rest = line[:i], line[i:].lstrip()
    if rest[:1] in ("=", ":"):
        rest = rest[1:].lstrip()
    return _unescape(key), _unescape(rest)


def parse_properties(text: str) -> dict[str, str]:
    """Parse java.util.Properties text: ``k=v``, ``k: v``, ``k v``, comments, continuations."""
    return dict(_split_key_value(line) for line in _logical_lines(text))


def env_option_key(env_name: str) -> str:
    """Map ``OPTION_FOO_BAR`` to ``option.foo_bar`` with DJL's special cases."""
    suffix = env_name[len("OPTION_") :]
    if suffix == "ENTRYPOINT":
        return "option.entryPoint"
    if suffix == "ENGINE":
        return "engine"
    return "option." + (suffix.lower() if _UPPER_KEY.match(suffix) else suffix)


def load_properties(model_dir: str | None, environ: Mapping[str, str]) -> Properties:
    """File values first; then OPTION_*, SERVING_*, and TGI/SageMaker aliases fill only what is unset."""
    props = Properties()
    path = os.path.join(model_dir, "serving.properties") if model_dir else None
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            for key, value in parse_properties(fh.read()).items():
                props.force(key, value, f"{path}")
    for name in sorted(environ):
        if name.startswith("OPTION_") and len(name) > len("OPTION_"):
            props.set_default(env_option_key(name), environ[name], f"environment variable {name}")
    for name in sorted(environ):
        if name.startswith("SERVING_") and len(name) > len("SERVING_"):
            props.set_default(name[len("SERVING_") :].lower(), environ[name], f"environment variable {name}")
    for name, key in _ENV_ALIASES.items():
        if name in environ:
            props.set_default(key, environ[name], f"environment variable {name}")
    if "SAGEMAKER_MAX_PAYLOAD_IN_MB" in environ and environ["SAGEMAKER_MAX_PAYLOAD_IN_MB"]:
        mb = environ["SAGEMAKER_MAX_PAYLOAD_IN_MB"]
        value = str(int(float(mb) * 1024 * 1024)) if _is_number(mb) else mb
        props.set_default("max_request_size", value, "environment variable SAGEMAKER_MAX_PAYLOAD_IN_MB")
    _cluster_defaults(props, environ)
    workers = environ.get("SAGEMAKER_NUM_MODEL_WORKERS", "")
    if workers:
        for key in ("minWorkers", "maxWorkers"):
            props.force(key, workers, "environment variable SAGEMAKER_NUM_MODEL_WORKERS")
    return props


SAGEMAKER_RESOURCE_CONFIG = "/opt/ml/input/config/resourceconfig.json"
DEFAULT_MASTER_PORT = "29500"
"""torchrun's default rendezvous port, used when SageMaker's host list makes the nodes."""


def _cluster_defaults(props: Properties, environ: Mapping[str, str]) -> None:
    """On a SageMaker multi-host job, resourceconfig.json names the hosts: nnodes is their count, this
    node's rank its place in the list, and the first host is where the ranks meet (unless set)."""
    path = environ.get("SERVING_RESOURCE_CONFIG", SAGEMAKER_RESOURCE_CONFIG)
    try:
        with open(path, encoding="utf-8") as fh:
            cluster = json.load(fh)
        hosts, current = list(cluster["hosts"]), cluster["current_host"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if len(hosts) < 2 or current not in hosts:
        return
    source = f"{path} (hosts {', '.join(hosts)})"
    props.set_default("option.nnodes", str(len(hosts)), source)
    props.set_default("option.node_rank", str(hosts.index(current)), source)
    props.set_default("option.master_addr", hosts[0], source)
    props.set_default("option.master_port", DEFAULT_MASTER_PORT, source)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
