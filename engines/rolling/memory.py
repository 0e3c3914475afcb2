"""How many KV-cache blocks the native engine gets: from a byte budget, the GPU's free memory, or the
CPU default of ``max_rolling_batch_size`` full-length sequences.

On a GPU the cache takes what ``gpu_memory_utilization`` of the device leaves after the weights and
the activations of the largest step, measured by running that step once at start-up (vLLM's
profiling approach), so a step never runs out of memory and the cache is as large as it can be.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from engines.base import EngineConfig, EngineLoadError
from engines.llama.batch import ForwardBatch
from engines.llama.kv_cache import PagedKVCache

log = logging.getLogger("engines.rolling")


def cache_blocks(model: Any, config: EngineConfig, max_model_len: int) -> int:
    """Blocks for the cache; EngineLoadError when not even one max_model_len sequence fits."""
    spec, size = model.spec, config.block_size
    per_block = PagedKVCache.block_bytes(spec.num_layers, size, spec.num_kv_heads, spec.head_dim, model.dtype)
    one_sequence = -(-max_model_len // size)
    device = next(model.parameters()).device
    if config.kv_cache_memory_bytes is not None:
        blocks, source = config.kv_cache_memory_bytes // per_block, "option.kv_cache_memory_bytes"
    elif device.type == "cuda":
        available = gpu_cache_bytes(model, config, max_model_len)
        blocks, source = max(0, available) // per_block, "option.gpu_memory_utilization"
    else:
        blocks, source = config.max_rolling_batch_size * one_sequence, "option.max_rolling_batch_size"
    if blocks < one_sequence:
        raise EngineLoadError(
            f"The KV cache ({source}) holds {blocks} blocks of {size} tokens ({per_block} bytes each), fewer "
            f"than one sequence of option.max_model_len={max_model_len} needs ({one_sequence}). Raise "
            f"{source} or lower option.max_model_len."
        )
    return blocks


def gpu_cache_bytes(model: Any, config: EngineConfig, max_model_len: int) -> int:
    """gpu_memory_utilization x the device's memory, minus the peak of the weights plus one
    largest-prefill step (measured), minus what other processes already use."""
    device = next(model.parameters()).device
    tokens = min(config.max_rolling_batch_prefill_tokens, max_model_len)
    scratch = model.make_cache(-(-tokens // config.block_size), config.block_size)
    table = list(range(scratch.num_blocks))
    batch = ForwardBatch.build([(table, [0] * tokens, 0)], config.block_size, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    model(batch, scratch)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - scratch.total_bytes()
    del scratch, batch
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    ours = torch.cuda.memory_reserved(device)
    others = max(0, total - free - ours)
    budget = int(total * config.gpu_memory_utilization) - peak - others
    log.info(
        "GPU memory: %.1f GiB total, weights + peak activations %.2f GiB, other processes %.2f GiB, "
        "gpu_memory_utilization %.2f -> KV cache %.2f GiB",
        total / 2**30,
        peak / 2**30,
        others / 2**30,
        config.gpu_memory_utilization,
        budget / 2**30,
    )
    return budget
