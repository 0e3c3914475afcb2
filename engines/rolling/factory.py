"""Build a RollingEngine from an EngineConfig: native Llama weights, tokenizer, a sized KV cache."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from engines.base import EngineConfig, EngineLoadError
from engines.device import configure_threads, has_native_bf16, resolve_device
from engines.rolling.engine import RollingEngine
from engines.sequence import eos_token_ids

log = logging.getLogger("engines.rolling")

DEFAULT_MAX_MODEL_LEN = 2048


def supports_rolling(model_path: str) -> str | None:
    """None when the native engine can run this checkpoint, else the reason it cannot."""
    from engines.llama.weights import check_supported

    config_file = Path(model_path) / "config.json"
    if not config_file.is_file() or not list(Path(model_path).glob("*.safetensors")):
        return "the native engine loads config.json + *.safetensors only"
    try:
        check_supported(json.loads(config_file.read_text()), DEFAULT_MAX_MODEL_LEN)
    except NotImplementedError as exc:
        return str(exc)
    return None


def _attention_shape(raw: dict) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) from a config.json."""
    heads = raw["num_attention_heads"]
    return heads, raw.get("num_key_value_heads") or heads, raw.get("head_dim") or raw["hidden_size"] // heads


def _cache_slots(config: EngineConfig, raw: dict, max_model_len: int, dtype: torch.dtype) -> int:
    """max_rolling_batch_size slots, fewer if option.kv_cache_memory_bytes cannot hold that many."""
    from engines.llama.kv_cache import SlotKVCache

    slots, budget = config.max_rolling_batch_size, config.kv_cache_memory_bytes
    if budget is None:
        return slots
    _, kv_heads, head_dim = _attention_shape(raw)
    shape = (raw["num_hidden_layers"], max_model_len, kv_heads, head_dim, dtype)
    fitting = SlotKVCache.slots_for_budget(budget, *shape)
    if fitting < 1:
        raise EngineLoadError(
            f"option.kv_cache_memory_bytes={budget} cannot hold one sequence of option.max_model_len="
            f"{max_model_len} tokens ({SlotKVCache.slot_bytes(*shape)} bytes). Raise the budget or lower "
            "max_model_len."
        )
    if fitting < slots:
        log.warning(
            "KV cache budget holds %d sequences, fewer than max_rolling_batch_size=%d", fitting, slots
        )
    return min(slots, fitting)


def create_rolling_engine(config: EngineConfig) -> RollingEngine:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from engines.hf.loading import resolve_dtype
    from engines.kernels.ops import select_ops
    from engines.llama.weights import load_llama

    started = time.perf_counter()
    device = resolve_device(config.device)
    configure_threads(config.num_threads, config.workers)
    raw = json.loads((Path(config.model_path) / "config.json").read_text())
    limit = int(raw.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN)
    max_model_len = config.max_model_len or min(limit, DEFAULT_MAX_MODEL_LEN)
    stored = AutoConfig.from_pretrained(config.model_path)
    dtype = resolve_dtype(config.dtype, stored, device, has_native_bf16(device))
    slots = _cache_slots(config, raw, max_model_len, dtype)
    try:
        ops = select_ops(config.kernels, device, _attention_shape(raw))
    except (ValueError, RuntimeError) as exc:
        raise EngineLoadError(str(exc)) from exc
    model, cache, hf_config = load_llama(config.model_path, dtype, device, slots, max_model_len, ops=ops)
    tokenizer = AutoTokenizer.from_pretrained(config.model_path)
    try:
        generation = GenerationConfig.from_pretrained(config.model_path)
    except OSError:
        generation = None
    log.info(
        "Rolling-batch engine: %s in %s on %s, %s kernels, KV cache %d slots x %d tokens = %.0f MiB, "
        "loaded in %.1f s",
        raw.get("architectures", ["?"])[0],
        dtype,
        device,
        ops.name,
        slots,
        max_model_len,
        cache.total_bytes() / 2**20,
        time.perf_counter() - started,
    )
    return RollingEngine(
        model, cache, tokenizer, eos_token_ids(tokenizer, hf_config, generation), max_model_len
    )
