"""Decide what `EngineConfig.model_path` holds and load it: safetensors, GGUF, or opt-in pickle weights.

Pickle checkpoints (.bin/.pt/.pth) are refused unless explicitly allowed because unpickling can run
arbitrary code; safetensors and GGUF cannot.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from engines.base import EngineConfig, EngineLoadError
from engines.device import configure_threads, has_native_bf16, resolve_device
from engines.hf.tasks import TaskSpec, canonical_task, get_task

logger = logging.getLogger("engines.hf")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
STANDARD_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TRAINER_ARTIFACTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state")
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
ARCHITECTURE_SUFFIXES = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForSeq2SeqLM", "text2text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForMaskedLM", "fill-mask"),
    ("Model", "feature-extraction"),
)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""option.device_map values accelerate turns into a placement; anything else is a placement itself."""
ENCODER_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "albert", "deberta", "deberta-v2",
     "camembert", "modernbert", "nomic_bert"}
)  # fmt: skip


@dataclass(frozen=True)
class Checkpoint:
    """Where the weights are and in which format ("safetensors", "gguf" or "pickle")."""

    directory: Path
    format: str
    file: str | None = None
    """The .gguf file, or a pickle file not named like transformers' own."""

    def describe(self) -> str:
        return f"{self.format} checkpoint {self.directory / (self.file or '')}"


@dataclass(frozen=True)
class LoadedModel:
    """Everything a task runner needs."""

    model: Any
    tokenizer: Any
    task: str
    dtype: torch.dtype
    checkpoint: Checkpoint
    config: EngineConfig


def load(config: EngineConfig) -> LoadedModel:
    """Resolve the device, checkpoint, task and dtype from `config`, then load the model and tokenizer.

    The returned `LoadedModel.config` names the device actually chosen (never "auto")."""
    config = replace(config, device=resolve_device(config.device))
    configure_threads(config.num_threads, config.workers)
    checkpoint = resolve_checkpoint(config)
    hf_config = _load_hf_config(checkpoint, config)
    task = resolve_task(config.task, hf_config, checkpoint)
    dtype = resolve_dtype(config.dtype, hf_config, config.device, has_native_bf16(config.device))
    model = load_model(get_task(task), checkpoint, config, dtype, hf_config)
    tokenizer = load_tokenizer(checkpoint, config)
    return LoadedModel(model, tokenizer, task, dtype, checkpoint, config)


def resolve_checkpoint(config: EngineConfig) -> Checkpoint:
    """Pick the weights in `config.model_path`, preferring safetensors, then GGUF, then (opt-in) pickle."""
    path = Path(config.model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return Checkpoint(path.parent, "gguf", path.name)
    if not path.is_dir():
        raise EngineLoadError(f"Model path {str(path)!r} does not exist or is not a folder.")
    if config.gguf_file:
        if not (path / config.gguf_file).is_file():
            raise EngineLoadError(f"option.gguf_file {config.gguf_file!r} is not a file in {path}.")
        return Checkpoint(path, "gguf", config.gguf_file)
    has_config = (path / "config.json").is_file()
    if has_config and any(path.glob("*.safetensors")):
        return Checkpoint(path, "safetensors")
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise EngineLoadError(f"{path} holds several GGUF files {ggufs}; choose one with option.gguf_file.")
    if ggufs:
        return Checkpoint(path, "gguf", ggufs[0])
    pickles = sorted(
        p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES + (".bin.index.json",))
    )
    if has_config and pickles:
        return _pickle_checkpoint(path, pickles, config.allow_unsafe_weights)
    found = sorted(p.name for p in path.iterdir())[:20]
    raise EngineLoadError(
        f"No loadable model in {path}: looked for config.json with *.safetensors weights, a *.gguf file, "
        f"or config.json with *.bin/*.pt/*.pth weights (needs option.allow_unsafe_weights=true). "
        f"Found: {found or 'an empty folder'}."
    )


def _pickle_checkpoint(path: Path, names: list[str], allowed: bool) -> Checkpoint:
    if not allowed:
        raise EngineLoadError(
            f"{path} only has pickle checkpoints ({', '.join(names)}). Pickle checkpoints can execute "
            "arbitrary code when loaded, so they are refused unless option.allow_unsafe_weights=true; "
            "prefer converting them to safetensors."
        )
    if any(name in STANDARD_PICKLES for name in names):
        return Checkpoint(path, "pickle")
    weights = [name for name in names if not name.startswith(TRAINER_ARTIFACTS)]
    if len(weights) != 1:
        raise EngineLoadError(
            f"Cannot tell which pickle file in {path} holds the weights: {weights or names}."
        )
    return Checkpoint(path, "pickle", weights[0])


def _load_hf_config(checkpoint: Checkpoint, config: EngineConfig) -> Any:
    from transformers import AutoConfig

    kwargs = _common_kwargs(checkpoint, config)
    try:
        return AutoConfig.from_pretrained(str(checkpoint.directory), **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise EngineLoadError(f"Cannot read the model config of {checkpoint.describe()}: {error}") from error


def _common_kwargs(checkpoint: Checkpoint, config: EngineConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": config.trust_remote_code, "revision": config.revision}
    if checkpoint.format == "gguf":
        kwargs["gguf_file"] = checkpoint.file
    return kwargs


def resolve_dtype(name: str, hf_config: Any, device: str = "cpu", native_bf16: bool = False) -> torch.dtype:
    """The torch dtype for option.dtype on `device` (resolved, not "auto"), logging what "auto" chose.

    `native_bf16` says whether the device computes bf16 natively (engines.device.has_native_bf16).
    "auto" is bf16 where it is native; fp16 on a GPU without bf16; otherwise the checkpoint's dtype,
    except that an fp16 checkpoint runs in fp32 on such a CPU (fp16 math is slow there)."""
    key = (name or "auto").strip().lower()
    if key != "auto":
        if key not in DTYPES:
            allowed = ", ".join([*DTYPES, "auto"])
            raise EngineLoadError(f"Unsupported option.dtype {name!r}; allowed values: {allowed}.")
        return DTYPES[key]
    dtype, reason = _auto_dtype(_checkpoint_dtype(hf_config), torch.device(device).type, native_bf16)
    logger.info("dtype: %s (option.dtype=auto; %s)", str(dtype).removeprefix("torch."), reason)
    return dtype


def _checkpoint_dtype(hf_config: Any) -> torch.dtype | None:
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) and stored.is_floating_point else None


def _auto_dtype(stored: torch.dtype | None, device_type: str, native_bf16: bool) -> tuple[torch.dtype, str]:
    """The dtype "auto" picks and why."""
    if native_bf16:
        return torch.bfloat16, f"the {'GPU' if device_type == 'cuda' else 'CPU'} computes bf16 natively"
    if device_type == "cuda":
        return torch.float16, "the GPU has no bf16 support"
    if stored is None:
        return torch.float32, "the checkpoint names no float dtype"
    if stored == torch.float16 and device_type == "cpu":
        return torch.float32, "fp16 checkpoint on a CPU without native bf16, where fp16 math is slow"
    return stored, "the checkpoint's dtype; this CPU has no native bf16"


def resolve_task(task: str | None, hf_config: Any, checkpoint: Checkpoint) -> str:
    """The configured task (aliases resolved and validated), else one inferred from the architecture."""
    if task:
        name = canonical_task(task)
        get_task(name)
        return name
    return infer_task(hf_config, checkpoint)


def infer_task(hf_config: Any, checkpoint: Checkpoint) -> str:
    """Task from sentence-transformers files, then `architectures`, then `model_type`."""
    if (checkpoint.directory / "modules.json").is_file():
        return "feature-extraction"
    for architecture in getattr(hf_config, "architectures", None) or []:
        task = _task_for_architecture(architecture, hf_config)
        if task:
            return task
    model_type = getattr(hf_config, "model_type", None)
    if getattr(hf_config, "is_encoder_decoder", False):
        return "text2text-generation"
    if model_type in ENCODER_MODEL_TYPES:
        return "feature-extraction"
    if checkpoint.format == "gguf":
        return "text-generation"
    raise EngineLoadError(
        f"Cannot infer the task of {checkpoint.describe()} (architectures="
        f"{getattr(hf_config, 'architectures', None)}, model_type={model_type!r}); set option.task."
    )


def _task_for_architecture(architecture: str, hf_config: Any) -> str | None:
    if architecture.endswith("ForConditionalGeneration"):
        return "text2text-generation" if getattr(hf_config, "is_encoder_decoder", False) else None
    for suffix, task in ARCHITECTURE_SUFFIXES:
        if architecture.endswith(suffix):
            return task
    return None


def load_model(
    spec: TaskSpec, checkpoint: Checkpoint, config: EngineConfig, dtype: torch.dtype, hf_config: Any
) -> Any:
    """Load the model with the task's Auto class, in `dtype`, on `config.device` (or spread over GPUs by
    accelerate, see device_map_kwargs), in eval mode."""
    import transformers

    auto_class = getattr(transformers, spec.auto_class)
    placement = device_map_kwargs(config, _free_gpu_memory(config))
    if placement:
        _require_accelerate(placement["device_map"])
    custom_pickle = checkpoint.format == "pickle" and checkpoint.file
    if placement and custom_pickle:
        raise EngineLoadError(
            f"option.device_map / tensor_parallel_degree cannot spread {checkpoint.describe()}: a state "
            "dict under a custom name is loaded whole. Convert it to safetensors."
        )
    try:
        if custom_pickle:
            model = _load_pickle_file(auto_class, checkpoint, config, dtype, hf_config)
        else:
            kwargs = _common_kwargs(checkpoint, config)
            if checkpoint.format != "gguf":
                kwargs["use_safetensors"] = checkpoint.format == "safetensors"
            model = auto_class.from_pretrained(str(checkpoint.directory), dtype=dtype, **kwargs, **placement)
    except (OSError, ValueError, KeyError) as error:
        raise EngineLoadError(f"Cannot load {checkpoint.describe()} as {spec.auto_class}: {error}") from error
    if placement:
        # transformers only dispatches (and sets hf_device_map) when the modules landed on several devices.
        whole = {"": model.device.index if model.device.type == "cuda" else model.device.type}
        check_placement(getattr(model, "hf_device_map", None) or whole, placement)
    elif config.device != "cpu":
        model.to(config.device)
    return model.eval()


def device_map_kwargs(config: EngineConfig, gpu_free_bytes: Sequence[int]) -> dict[str, Any]:
    """from_pretrained's `device_map` and `max_memory`, or {} to load whole onto `config.device`.

    The native engine splits each layer over ranks; this handler serves the architectures it lacks, so,
    as DJL's "huggingface accelerate" path, option.tensor_parallel_degree (0 = every visible GPU) spreads
    whole layers over that many GPUs from config.device's index, and option.device_map (auto, balanced,
    sequential...; every GPU unless a degree limits it) picks accelerate's strategy. A placement
    (JSON or a device) passes through. `gpu_free_bytes`: free bytes of each visible GPU; each used GPU
    may hold gpu_memory_utilization of its free memory in weights (the rest is for activations and cache).
    """
    requested = (config.device_map or "").strip()
    strategy = requested.lower() if requested.lower() in DEVICE_MAP_STRATEGIES else None
    degree = config.tensor_parallel_degree
    if requested and strategy is None:
        return {"device_map": _parse_device_map(requested)}
    device = torch.device(config.device)
    if device.type != "cuda":
        if degree != 1 or strategy:
            logger.warning(
                "option.tensor_parallel_degree=%d%s: the Hugging Face handler does not split layers on %s; "
                "loading the whole model (the native engine has real tensor parallelism on CPU).",
                degree,
                f", option.device_map={strategy}" if strategy else "",
                device.type.upper(),
            )
        return {}
    if degree == 1 and strategy is None:
        return {}
    first = device.index or 0
    available = len(gpu_free_bytes) - first
    count = available if degree in (0, 1) else degree
    if count > available:
        where = f" from cuda:{first} on" if first else ""
        raise EngineLoadError(
            f"option.tensor_parallel_degree={degree} spreads the model over {degree} GPUs, but "
            f"{available} GPU(s) are visible{where}. Fix: lower it (or use max), or check "
            "CUDA_VISIBLE_DEVICES."
        )
    share = config.gpu_memory_utilization
    budget = {i: int(gpu_free_bytes[i] * share) for i in range(first, first + count)}
    return {"device_map": strategy or "auto", "max_memory": budget}


def check_placement(device_map: dict[str, Any], placement: dict[str, Any]) -> None:
    """Log where accelerate put the modules; fail when a budgeted placement overflowed the GPUs, since
    accelerate then silently serves the rest from CPU memory or from disk, orders of magnitude slower."""
    placed = Counter(str(device) for device in device_map.values())
    logger.info("device_map=%s placed modules on %s", placement["device_map"], dict(placed))
    gpus = [str(index) for index in placement.get("max_memory", {})]
    spilled = sorted(set(placed) - set(gpus)) if gpus else []
    if spilled:
        count = sum(placed[device] for device in spilled)
        raise EngineLoadError(
            f"The model does not fit on GPU(s) {', '.join(gpus)} (option.gpu_memory_utilization of their "
            f"free memory): accelerate put {count} module(s) on {', '.join(spilled)}. "
            "Fix: raise option.tensor_parallel_degree (or max), free GPU memory, or pick a smaller dtype."
        )


def _parse_device_map(text: str) -> Any:
    """option.device_map as a placement: JSON ({"": 0}, per-module devices), a GPU index, or a device."""
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError as error:
            raise EngineLoadError(f"option.device_map is not valid JSON: {error}") from error
    return int(text) if text.isdigit() else text


def _free_gpu_memory(config: EngineConfig) -> list[int]:
    """Free bytes per visible GPU, queried only when a device_map may use them (it opens a CUDA
    context on every GPU)."""
    spreads = config.tensor_parallel_degree != 1 or config.device_map
    if not spreads or torch.device(config.device).type != "cuda":
        return []
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def _require_accelerate(device_map: Any) -> None:
    """transformers places a device_map with accelerate, which is not a dependency of this server."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise EngineLoadError(
            f"device_map={device_map!r} (option.device_map / option.tensor_parallel_degree on the Hugging "
            "Face handler) needs the accelerate package: pip install accelerate."
        ) from None


def _load_pickle_file(
    auto_class: Any, checkpoint: Checkpoint, config: EngineConfig, dtype: torch.dtype, hf_config: Any
) -> Any:
    """A state dict saved under a custom name (e.g. model.pt): build from config.json, then fill it."""
    model = auto_class.from_config(hf_config, dtype=dtype, trust_remote_code=config.trust_remote_code)
    state = torch.load(checkpoint.directory / str(checkpoint.file), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    if result.missing_keys or result.unexpected_keys:
        logger.warning(
            "%s: %d missing and %d unexpected weights (missing: %s)",
            checkpoint.describe(),
            len(result.missing_keys),
            len(result.unexpected_keys),
            result.missing_keys[:5],
        )
    return model


def load_tokenizer(checkpoint: Checkpoint, config: EngineConfig) -> Any:
    """The tokenizer stored with the checkpoint (inside the GGUF file for GGUF models)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(checkpoint.directory), **_common_kwargs(checkpoint, config))
    except (OSError, ValueError, KeyError) as error:
        raise EngineLoadError(f"Cannot load the tokenizer of {checkpoint.describe()}: {error}") from error


def detect_task(config: EngineConfig) -> str:
    """The task ``load`` would serve, from config.json alone (no weights read): how the handler
    picks a generation engine or a task engine before loading anything."""
    checkpoint = resolve_checkpoint(config)
    return resolve_task(config.task, _load_hf_config(checkpoint, config), checkpoint)
