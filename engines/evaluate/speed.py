"""Speed and size of one engine configuration: decode tokens/s at batch 1 and 32, time to first token
of a 128-token prompt, and the bytes its weights take in memory and on disk."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from engines.types import GenerationRequest, SamplingParams

PROMPT_TOKENS = 128


def _drain(engine: Any, admit: list[GenerationRequest]) -> int:
    tokens = 0
    while admit or engine.running:
        tokens += len(engine.step(admit, []))
        admit = []
    return tokens


def measure_speed(engine: Any, new_tokens: int = 32, batches: tuple[int, ...] = (1, 32)) -> dict[str, float]:
    """Decode tok/s per batch (steps after the prefill), TTFT p50 of 3, and resident weight bytes."""
    vocab = engine.model.full_spec.vocab_size
    prompt = [(7 * i) % (vocab - 10) + 10 for i in range(PROMPT_TOKENS)]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    _drain(engine, [GenerationRequest("warm", prompt, SamplingParams(max_new_tokens=2, ignore_eos=True))])
    out: dict[str, float] = {}
    firsts = []
    for attempt in range(3):
        started = time.perf_counter()
        events = engine.step([GenerationRequest(f"ttft{attempt}", [attempt + 3, *prompt[1:]], params)], [])
        while not events:
            events = engine.step([], [])
        firsts.append(time.perf_counter() - started)
        _drain(engine, [])
    out["ttft_ms"] = statistics.median(firsts) * 1000
    for size in batches:
        if size > engine.capacity:
            continue
        requests = [GenerationRequest(f"b{size}-{i}", [i + 3, *prompt[1:32]], params) for i in range(size)]
        engine.step(requests, [])  # the prompts
        started, tokens = time.perf_counter(), 0
        while engine.running:
            tokens += len(engine.step([], []))
        out[f"decode_tok_s_batch{size}"] = tokens / (time.perf_counter() - started)
    out["weight_bytes"] = weight_bytes(engine.model)
    return out


def weight_bytes(model: Any) -> int:
    """Bytes of every parameter, buffer and oneDNN-packed weight (kept beside the module, not in it)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for module in model.modules():
        packed = getattr(module, "packed", None)
        if isinstance(packed, torch.Tensor):
            tensors[id(packed)] = packed
    return sum(t.numel() * t.element_size() for t in tensors.values())


def disk_bytes(folder: str) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
