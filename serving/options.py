"""The declaration of every property key the server or a model worker reads: type, default, values, doc.

``load_config`` parses every declared key once at start-up (a bad value stops the server before any
model loads); the model worker receives the typed values, and the README's tables are generated from
this table (``python -m serving.options``). Keys not declared here still reach user handlers as
strings; the ones in ``COMPAT_KEYS`` are accepted for DJL compatibility and have no effect.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from serving.artifacts.selection import parse_patterns
from serving.errors import ConfigError

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclass(frozen=True)
class OptionSpec:
    """One property key: how its string becomes a typed value, its default, and what it does."""

    key: str
    """The key as written in serving.properties (``option.*`` for model options)."""
    type: type
    """int, float, bool, str or tuple (a list of patterns)."""
    default: Any
    doc: str
    """One line for the README table."""
    choices: tuple[str, ...] = ()
    """Allowed values of a str key (compared lower-case); empty: any value."""
    minimum: int = 1
    """Smallest allowed int (floats must be finite and > 0)."""
    unit: str = ""
    """"seconds", "milliseconds" or "bytes": named in errors."""
    aliases: tuple[str, ...] = ()
    """Other keys that set the same value; the first key present wins."""
    parse: Callable[[str], Any] | None = None
    """A custom parser (raises ValueError) for values the fields above cannot describe."""
    expected: str = ""
    """What a custom parser accepts, for error messages."""
    shown_default: str = ""
    """The README's default column when the default is computed at run time."""

    @property
    def name(self) -> str:
        """The key without ``option.``: how handlers and the worker's typed values name it."""
        return self.key.removeprefix("option.")

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key, *self.aliases)

    def describe(self) -> str:
        """What a valid value looks like, e.g. "seconds, a number > 0"."""
        if self.expected:
            text = self.expected
        elif self.type is bool:
            text = "true or false"
        elif self.type is float:
            text = "a number > 0"
        elif self.type is int:
            text = "a positive integer" if self.minimum == 1 else f"an integer >= {self.minimum}"
        elif self.choices:
            text = "one of " + ", ".join(self.choices)
        else:
            text = "a string"
        return f"{self.unit}, {text}" if self.unit else text

    def convert(self, raw: str) -> Any:
        """The typed value of `raw`; ValueError when it is not allowed."""
        text = raw.strip()
        if self.parse is not None:
            return self.parse(text)
        if self.type is bool:
            if text.lower() not in TRUE + FALSE:
                raise ValueError
            return text.lower() in TRUE
        if self.type is int:
            if int(text) < self.minimum:
                raise ValueError
            return int(text)
        if self.type is float:
            if not math.isfinite(float(text)) or float(text) <= 0:
                raise ValueError
            return float(text)
        if self.choices and text.lower() not in self.choices:
            raise ValueError
        return text.lower() if self.choices else text


def _block_size(text: str) -> int:
    value = int(text)
    if value < 1 or value > 256 or value & (value - 1):
        raise ValueError
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError
    return value


def _port_range(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
    if not match or int(match[1]) > int(match[2]):
        raise ValueError
    return int(match[1]), int(match[2])


def _address(text: str) -> str:
    """``http(s)://host:port`` or ``host:port`` (as DJL's management_address) → ``host:port``."""
    match = re.fullmatch(r"(?:https?://)?(\[[0-9a-fA-F:.]+\]|[\w.-]+):(\d{1,5})/?", text)
    if not match or not 0 < int(match[2]) < 65536:
        raise ValueError
    return f"{match[1]}:{match[2]}"


def _int_range(text: str, low: int, high: int) -> int:
    value = int(text)
    if not low <= value <= high:
        raise ValueError
    return value


def _degree(text: str) -> int:
    """A parallel degree: a positive integer, or ``max`` (0: every visible GPU, resolved by the worker)."""
    if text.strip().lower() == "max":
        return 0
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text.lower()):
        raise ValueError
    return text.lower()


ROLLING_BATCH_CHOICES = ("auto", "lmi-dist", "scheduler", "vllm", "trtllm", "disable")
TASK_CHOICES = ("text-generation", "text2text-generation", "feature-extraction", "text-classification",
                "fill-mask", "text-embedding", "embedding", "sentiment-analysis")  # fmt: skip
DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16")
KERNEL_CHOICES = ("auto", "native", "triton", "torch")
OUTPUT_FORMATTER_CHOICES = ("json", "jsonlines", "sse", "json_chat", "jsonlines_chat")
LOG_LEVEL_CHOICES = ("debug", "info", "warning", "error", "critical")
LOG_FORMAT_CHOICES = ("text", "json")

_SERVER = [
    OptionSpec("engine", str, "Python",
               doc="Accepted for compatibility (`Python`, `MPI`, `DeepSpeed`...); the Python engine is "
                   "used."),
    OptionSpec("model_name", str, None,
               doc="Name used in `/ping` and `/predictions/{model}`.",
               shown_default="folder name"),
    OptionSpec("job_queue_size", int, 1000,
               doc="Requests waiting for a worker; beyond it → 503 at once."),
    OptionSpec("batch_size", int, 1,
               doc="Dynamic batch size.",
               aliases=("max_dynamic_batch_size",)),
    OptionSpec("max_batch_delay", int, 100,
               doc="How long a request may be held to fill a batch during a wave of load (never when idle).",
               minimum=0, unit="milliseconds"),
    OptionSpec("minWorkers", int, 1,
               doc="Model worker processes (replicas); requests go to an idle one.",
               aliases=("cpu.minWorkers", "min_workers")),
    OptionSpec("maxWorkers", int, None,
               doc="Accepted as in DJL; must be >= `minWorkers` (`minWorkers` workers run).",
               aliases=("cpu.maxWorkers", "max_workers"), shown_default="`minWorkers`"),
    OptionSpec("retry_threshold", int, 10,
               doc="Worker crashes tolerated before the model is FAILED (DJL's default is 0).",
               minimum=0),
    OptionSpec("fail_fast", bool, False,
               doc="Exit with code 137 when the model is FAILED."),
    OptionSpec("max_request_size", int, 6 * 1024 * 1024,
               doc="Request body limit (6 MiB, as SageMaker) → 413.",
               unit="bytes"),
    OptionSpec("http_workers", int, 1,
               doc="HTTP front processes (gevent: each holds thousands of connections)."),
    OptionSpec("sagemaker_safe_port_range", tuple, None,
               doc="Set from `SAGEMAKER_SAFE_PORT_RANGE`; validated and recorded (internal traffic uses "
                   "Unix sockets).",
               parse=_port_range, expected="a range like 20000-20999"),
    OptionSpec("download_dir", str, None,
               doc="Cache root for S3 and archive models (`SERVING_DOWNLOAD_DIR`).",
               shown_default="`~/.cache/lmi-serving/download`"),
    OptionSpec("log_level", str, "info",
               doc="Log level (`SERVING_LOG_LEVEL`).",
               choices=LOG_LEVEL_CHOICES),
    OptionSpec("log_format", str, "text",
               doc="`json`: every process logs one JSON object per line (`SERVING_LOG_FORMAT`).",
               choices=LOG_FORMAT_CHOICES),
    OptionSpec("access_log", bool, True,
               doc="One log line per HTTP request (successful `/ping` and `/metrics` excepted): route, "
                   "status, latency, tokens, worker (`SERVING_ACCESS_LOG`)."),
    OptionSpec("log_requests", bool, False,
               doc="Add request and response bodies (prompts, outputs; first 8 KiB) to the access log "
                   "(`SERVING_LOG_REQUESTS`)."),
    OptionSpec("metrics", bool, True,
               doc="Prometheus metrics at `GET /metrics`; `false` collects nothing and the route answers "
                   "404 (`SERVING_METRICS`)."),
    OptionSpec("sagemaker_multi_model", bool, False,
               doc="Set from `SAGEMAKER_MULTI_MODEL`: serve SageMaker's multi-model API (`/models`) on the "
                   "inference port; no model loads at start-up unless a folder or `option.model_id` is "
                   "given."),
    OptionSpec("enable_management_api", bool, False,
               doc="Serve DJL's management API (load, list, describe, scale, unload models) on "
                   "`management_address`."),
    OptionSpec("management_address", str, "127.0.0.1:8081",
               doc="Where the management API listens (`http://host:port` or `host:port`); the inference "
                   "listener itself when equal to it.",
               parse=_address, expected="host:port or http(s)://host:port",
               shown_default="`http://127.0.0.1:8081`"),
    OptionSpec("memory_budget_mb", int, None,
               doc="Memory the models loaded through `/models` may reserve together (start-up model "
                   "included); a load beyond it → 507 naming the numbers.",
               shown_default="memory available at start-up"),
    OptionSpec("required_memory_mb", int, None,
               doc="Memory one worker of this model needs, reserved against `memory_budget_mb` before it "
                   "loads.",
               shown_default="1.2 × the model folder's size"),
    OptionSpec("api_key", str, None,
               doc="Every route but `/ping`, `/openapi.json` and `/metrics` requires `Authorization: Bearer "
                   "<key>` or `X-Api-Key: <key>` → else 401 (`SERVING_API_KEY`; see [Security](#security))."),
    OptionSpec("api_key_file", str, None,
               doc="A file holding `api_key`, instead of it (`SERVING_API_KEY_FILE`)."),
    OptionSpec("metrics_require_key", bool, False,
               doc="Put `/metrics` behind `api_key` too (`SERVING_METRICS_REQUIRE_KEY`)."),
    OptionSpec("tls_cert", str, None,
               doc="PEM certificate (chain): the inference and management listeners serve HTTPS only "
                   "(`SERVING_TLS_CERT`, with `tls_key`)."),
    OptionSpec("tls_key", str, None,
               doc="The certificate's unencrypted PEM private key (`SERVING_TLS_KEY`)."),
    OptionSpec("keepalive_timeout", int, 2,
               doc="How long a connection may wait for its next request and take to send a TLS handshake, "
                   "request line and headers; then it is closed (`SERVING_KEEPALIVE_TIMEOUT`).",
               unit="seconds"),
    OptionSpec("request_body_timeout", float, 60.0,
               doc="How long a request body may take to arrive after its headers → 408 and the connection "
                   "closed (`SERVING_REQUEST_BODY_TIMEOUT`).",
               unit="seconds"),
    OptionSpec("limit_request_line", int, 4094,
               doc="Longest request line (method, URL with query, version) → 414 "
                   "(`SERVING_LIMIT_REQUEST_LINE`).",
               unit="bytes", parse=lambda text: _int_range(text, 1, 8190),
               expected="an integer from 1 to 8190"),
    OptionSpec("limit_request_fields", int, 100,
               doc="Most header fields in one request → 431 (`SERVING_LIMIT_REQUEST_FIELDS`).",
               parse=lambda text: _int_range(text, 1, 32768), expected="an integer from 1 to 32768"),
    OptionSpec("limit_request_field_size", int, 8190,
               doc="Longest header field (name and value) → 431 (`SERVING_LIMIT_REQUEST_FIELD_SIZE`).",
               unit="bytes"),
]  # fmt: skip

_MODEL = [
    OptionSpec("option.entryPoint", str, None,
               doc="Handler file or module (see above)."),
    OptionSpec("option.handler", str, "handle",
               doc="Function name in the entry point."),
    OptionSpec("option.env", str, None,
               doc="`K=V,K2=V2`: extra environment for the model worker processes (not passed to the "
                   "handler)."),
    OptionSpec("option.model_id", str, None,
               doc="Local folder, `s3://bucket/prefix/`, Hub id, or `.tar.gz` archive (see [Model "
                   "sources](#model-sources-s3-the-hugging-face-hub-archives)).",
               aliases=("option.s3url",)),
    OptionSpec("option.revision", str, None,
               doc="Hub revision."),
    OptionSpec("option.gguf_file", str, None,
               doc="The `.gguf` file to load when the model folder holds several."),
    OptionSpec("option.allow_patterns", tuple, None,
               doc="Files to fetch (comma-separated or JSON list of patterns); overrides the default "
                   "selection.",
               parse=parse_patterns, expected="comma-separated patterns or a JSON list of strings"),
    OptionSpec("option.ignore_patterns", tuple, None,
               doc="Files to skip (comma-separated or JSON list of patterns).",
               parse=parse_patterns, expected="comma-separated patterns or a JSON list of strings"),
    OptionSpec("option.download_timeout", float, None,
               doc="Limit for the whole download.",
               unit="seconds", shown_default="0.9 × `model_loading_timeout`"),
    OptionSpec("option.download_workers", int, 32,
               doc="Parallel transfers (s5cmd `--numworkers`, boto3 concurrency)."),
    OptionSpec("option.download_retries", int, 3,
               doc="Download attempts, with back-off."),
    OptionSpec("option.task", str, None,
               doc="The Hugging Face task; `text-embedding`/`embedding` mean `feature-extraction`, "
                   "`sentiment-analysis` means `text-classification`.",
               choices=TASK_CHOICES, shown_default="inferred"),
    OptionSpec("option.device", str, "auto",
               doc="`auto` (CUDA when torch sees a GPU, else the CPU), `cpu`, `cuda` or `cuda:N`; the "
                   "worker logs its choice.",
               parse=_device, expected="auto, cpu, cuda or cuda:N"),
    OptionSpec("option.dtype", str, "auto",
               doc="`auto`: bf16 on GPUs (fp16 without bf16 support) and on CPUs with native bf16 "
                   "(`avx512_bf16`/`amx_bf16`), else the checkpoint's (fp32 for fp16 checkpoints on CPU).",
               choices=DTYPE_CHOICES),
    OptionSpec("option.num_threads", int, None,
               doc="Torch threads per model worker.",
               shown_default="`OMP_NUM_THREADS`, else physical cores / `minWorkers`"),
    OptionSpec("option.trust_remote_code", bool, False,
               doc="Allow model code from the checkpoint."),
    OptionSpec("option.allow_unsafe_weights", bool, False,
               doc="Allow pickle checkpoints (`.bin`/`.pt`)."),
    OptionSpec("option.predict_timeout", float, 120.0,
               doc="How long a request may take before it gets a 504.",
               unit="seconds"),
    OptionSpec("option.model_loading_timeout", float, 240.0,
               doc="How long a worker may take to load before the model is FAILED.",
               unit="seconds"),
    OptionSpec("option.rolling_batch", str, "auto",
               doc="Continuous batching for supported LLMs (the LMI names mean `auto`); `disable`: dynamic "
                   "batching.",
               choices=ROLLING_BATCH_CHOICES),
    OptionSpec("option.max_rolling_batch_size", int, 32,
               doc="Sequences running at once (on CPU the KV cache holds this many of `max_model_len`)."),
    OptionSpec("option.max_rolling_batch_prefill_tokens", int, 4096,
               doc="Prompt tokens computed per step (native engine: longer prompts are split into chunks "
                   "that run alongside the decodes)."),
    OptionSpec("option.enable_prefix_caching", bool, True,
               doc="Native engine: prompts starting like an earlier one reuse its cached KV blocks."),
    OptionSpec("option.block_size", int, None,
               doc="Native engine: tokens per KV-cache block (prefix-cache hits come in whole blocks; on "
                   "CPU longer blocks read faster).",
               shown_default="16 on GPUs, 64 on CPU",
               parse=_block_size, expected="a power of two from 1 to 256"),
    OptionSpec("option.gpu_memory_utilization", float, 0.9,
               doc="Native engine on a GPU: share of the device memory for weights, activations and the "
                   "KV cache, which takes what the others leave.",
               parse=_fraction, expected="a number in (0, 1]"),
    OptionSpec("option.enforce_eager", bool, False,
               doc="Native engine on a GPU: run decode steps eagerly instead of as captured CUDA graphs."),
    OptionSpec("option.async_scheduling", bool, True,
               doc="Native engine on a GPU: queue each step before reading the last one's tokens, so "
                   "detokenising and stop checks run while the GPU computes (off: one step at a time)."),
    OptionSpec("option.tensor_parallel_degree", int, 1,
               doc="Native engine: ranks each layer is split across (one process each: a GPU per rank, "
                   "or a share of the CPU cores); `max`: every visible GPU. The HF handler spreads layers "
                   "over that many GPUs (`device_map`).",
               parse=_degree, expected="a positive integer or max"),
    OptionSpec("option.device_map", str, None,
               doc="HF handler on GPUs: accelerate's `device_map` (`auto`, `balanced`, `sequential`, or a "
                   "JSON map) for models the native engine does not run; `tensor_parallel_degree` > 1 "
                   "means `auto` over that many GPUs."),
    OptionSpec("option.pipeline_parallel_degree", int, 1,
               doc="Native engine: stages the layers are split into (micro-batched); the group has "
                   "tensor x pipeline ranks."),
    OptionSpec("option.nnodes", int, 1,
               doc="Machines one parallel group spans (torchrun's `--nnodes`; on SageMaker the hosts of "
                   "`resourceconfig.json`). Node 0 serves HTTP, the others only compute."),
    OptionSpec("option.node_rank", int, 0, minimum=0,
               doc="This machine's index among `nnodes` (`lmi serve --node-rank N`)."),
    OptionSpec("option.master_addr", str, None,
               doc="Where the ranks of a multi-node group meet (node 0's address).",
               shown_default="127.0.0.1 (one node)"),
    OptionSpec("option.master_port", int, None,
               doc="The rendezvous port on `master_addr`.",
               shown_default="a free port (one node)"),
    OptionSpec("option.save_mp_checkpoint_path", str, None,
               doc="Partition the model for the degrees into this folder at start-up (as `lmi partition`) "
                   "and serve from it; a later start reads each rank's file only."),
    OptionSpec("option.quantize", str, None,
               doc="Native engine: weight-only quantization of the decoder projections (`int8`: "
                   "per-channel scales; `int4`: groups of `quantize_group_size` with scale and minimum). "
                   "`gguf`: serve the GGUF file's own quantized blocks (Q4_0/Q4_1/Q4_K as int4, Q8_0 as "
                   "int8, in groups of 32) with no re-quantisation: the default model, or a folder with "
                   "its .gguf beside config.json. AWQ/GPTQ checkpoints load as stored without it. "
                   "`fp8`: float8 e4m3 weights, per-channel scales, activations scaled per token, through "
                   "torch._scaled_mm on GPUs of compute capability 8.9+ (Ada, Hopper); refused on CPUs.",
               choices=("int8", "int4", "fp8", "gguf")),
    OptionSpec("option.quantize_group_size", int, None,
               doc="int4: input columns per scale; where it does not divide a width, 64 or 32 is used. "
                   "Unset on weights converted from a 4-bit GGUF (the default model): 32, the file's own "
                   "grid, which coarser groups would lose.",
               shown_default="128 (32 for a 4-bit GGUF source)"),
    OptionSpec("option.max_model_len", int, None,
               doc="Tokens per sequence (prompt + generated); sizes the KV cache.",
               shown_default="min(model, 2048)"),
    OptionSpec("option.kv_cache_memory_bytes", int, None,
               doc="KV cache budget in bytes (start-up fails if it cannot hold one sequence of "
                   "`max_model_len`); on GPUs it overrides `gpu_memory_utilization`.",
               unit="bytes"),
    OptionSpec("option.kernels", str, "auto",
               doc="Hot-path ops: `auto` = the native CPU kernels if they build (Triton on GPUs), else "
                   "torch; `native`/`triton` make a failure stop start-up.",
               choices=KERNEL_CHOICES),
    OptionSpec("option.output_formatter", str, None,
               doc="Response framing on `/invocations` (`_chat`: the same framing).",
               choices=OUTPUT_FORMATTER_CHOICES, shown_default="`json`/`jsonlines`"),
    OptionSpec("option.tgi_compat", bool, False,
               doc="TGI-shaped `/invocations` answers."),
]  # fmt: skip

OPTIONS: dict[str, OptionSpec] = {spec.key: spec for spec in _SERVER + _MODEL}
"""Every declared key, server keys first."""

COMPAT_KEYS = frozenset(
    {"load_on_devices", "max_idle_time", "gpu.minWorkers", "gpu.maxWorkers", "reserved_memory_mb",
     "gpu.required_memory_mb", "gpu.reserved_memory_mb", "log_request_metric", "metrics_aggregation",
     "metric_dimension", "translatorFactory", "health_check_override", "prometheus", "features",
     "option.enable_streaming", "option.pythonExecutable", "option.parallel_loading",
     "option.mpi_mode", "option.async_mode", "option.low_cpu_mem_usage", "option.normalize",
     "option.max_num_seqs", "option.chat_template",
     "option.pooling", "option.max_length", "option.truncation"}
)  # fmt: skip
"""DJL / LMI keys accepted without a warning; nothing here reads them."""

KNOWN_KEYS = frozenset(k for spec in OPTIONS.values() for k in spec.keys) | COMPAT_KEYS


def parse_value(spec: OptionSpec, key: str, raw: str, source: str) -> Any:
    """`raw` as `spec`'s type; ConfigError names the key, the value, where it came from and the fix."""
    try:
        return spec.convert(raw)
    except ValueError:
        expected = spec.describe()
        raise ConfigError(
            f"Invalid value {raw!r} for {key} (from {source}): expected {expected}. "
            f"Fix: set {key}=<{expected}> or remove it to use the default."
        ) from None


def parse_settings(values: Mapping[str, str], sources: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every declared key's typed value, by `OptionSpec.name`, defaults filled in; an empty value is unset.

    `values` is keyed like serving.properties (``option.max_model_len``); `sources` says where each
    value came from, for the error message."""
    settings: dict[str, Any] = {}
    for spec in OPTIONS.values():
        key = next((k for k in spec.keys if values.get(k, "").strip()), None)
        if key is None:
            settings[spec.name] = spec.default
        else:
            source = (sources or {}).get(key, "the model's properties")
            settings[spec.name] = parse_value(spec, key, values[key], source)
    return settings


def settings_from_properties(properties: Mapping[str, str]) -> dict[str, Any]:
    """`parse_settings` for handler init properties, where option.* keys arrive without the prefix."""
    names = {key: key.removeprefix("option.") for spec in OPTIONS.values() for key in spec.keys}
    return parse_settings({key: properties[name] for key, name in names.items() if name in properties})


def markdown_table(option_keys: bool) -> str:
    """The README table of the declared `option.*` keys, or (False) of the server and model keys."""
    rows = ["| Key | Default | Meaning |", "|---|---|---|"]
    for spec in OPTIONS.values():
        if spec.key.startswith("option.") != option_keys:
            continue
        key = f"`{spec.key}`" + (f" ({', '.join(f'`{a}`' for a in spec.aliases)})" if spec.aliases else "")
        values = f" Values: {', '.join(f'`{c}`' for c in spec.choices)}." if spec.choices else ""
        rows.append(f"| {key} | {_shown_default(spec)} | {spec.doc}{values} |")
    return "\n".join(rows)


_UNIT_SYMBOLS = {"seconds": " s", "milliseconds": " ms", "bytes": " bytes"}


def _shown_default(spec: OptionSpec) -> str:
    if spec.shown_default:
        return spec.shown_default
    if spec.default is None:
        return "–"
    if isinstance(spec.default, bool):
        return f"`{str(spec.default).lower()}`"
    if isinstance(spec.default, str):
        return f"`{spec.default}`"
    value = f"{spec.default:g}" if isinstance(spec.default, float) else str(spec.default)
    return value + _UNIT_SYMBOLS.get(spec.unit, "")


if __name__ == "__main__":
    print("### Server and model keys\n\n" + markdown_table(option_keys=False) + "\n")
    print("### `option.*` keys\n\n" + markdown_table(option_keys=True))
