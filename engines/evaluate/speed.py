"""Speed and size of one engine configuration: decode tokens/s at batch 1 and 32, time to first token
of a 128-token prompt, the bytes its weights take in memory and on disk, and its peak memory."""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from engines.device import release_freed_memory
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


class PeakMemory:
    """The most memory a phase took above where it started: the process's resident high-water mark on
    CPUs (Linux's VmHWM, reset through /proc/self/clear_refs), allocated bytes on CUDA.

    Where the mark cannot be reset (not Linux, or a read-only /proc), ``peak`` is None rather than a
    figure that includes an earlier phase."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.base: int | None = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        # Free an earlier phase's garbage first: collected during this phase (the collector runs on
        # allocations), it lowered the resident size under the mark and hid this phase's growth (a
        # 64 MiB allocation measured 0 in a full test run; the int8 candidate 785-1,260 MB across runs).
        gc.collect()
        release_freed_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
            self.base = _status_bytes("VmRSS")
        except OSError:
            self.base = None

    def peak(self) -> int | None:
        """Bytes above the start at the highest point since, or None when it cannot be known."""
        if self.base is None:
            return None
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return max(0, _status_bytes("VmHWM") - self.base)

    def current(self) -> int | None:
        """Bytes above the start now."""
        if self.base is None:
            return None
        now = torch.cuda.memory_allocated() if self.cuda else _status_bytes("VmRSS")
        return now - self.base


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # kB
    raise OSError(f"/proc/self/status has no {field}")


def weight_bytes(model: Any) -> int:
    """Bytes of every parameter, buffer and oneDNN-packed weight (kept beside the module, not in it),
    each memory counted once: a rescored LM head's float rows are the embedding's own."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [m.packed for m in model.modules() if isinstance(getattr(m, "packed", None), torch.Tensor)]
    spans = {(_address(t), t.numel() * t.element_size()) for t in tensors}
    return sum(size for _, size in spans)


def _address(tensor: torch.Tensor) -> int:
    """Where the tensor's memory starts; an opaque oneDNN tensor (no storage) counts as its own."""
    try:
        return tensor.data_ptr()
    except RuntimeError:
        return -id(tensor)


def disk_bytes(folder: str) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
