"""The naive reference: one request at a time through Hugging Face ``generate``, in this process.

It answers "how much does the server buy over the obvious script?". It runs before the load rows, while
the server under test is idle, so neither disturbs the other. torch and transformers are imported only
here, inside functions: ``serving`` must stay importable without loading torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from serving.bench.stats import describe

Generate = Callable[[str, int], int]
"""generate(prompt, new_tokens) -> number of tokens generated."""

DTYPES = ("float32", "float16", "bfloat16")


def default_model_path() -> str:
    """The server's bundled default model (SmolLM2-135M-Instruct), converted on first use."""
    from engines.hf.default_model import ensure_default_model

    return ensure_default_model()


def load_hf_generator(path: str, dtype: str, device: str) -> tuple[Generate, str]:
    """Greedy generate with min_new_tokens == max_new_tokens, so every request has the asked length."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(prompt: str, new_tokens: int) -> int:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return int(output.shape[1] - inputs["input_ids"].shape[1])

    return generate, device


def measure(generate: Generate, prompts: Sequence[str], max_new_tokens: int) -> dict[str, Any]:
    """Sequential requests after one untimed 2-token warm-up (the server under test is warm as well)."""
    generate(prompts[0], min(2, max_new_tokens))
    latencies, tokens = [], 0
    started = time.perf_counter()
    for prompt in prompts:
        t0 = time.perf_counter()
        tokens += generate(prompt, max_new_tokens)
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    return {
        "requests": len(prompts),
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "requests_per_min": round(len(prompts) * 60 / wall, 3),
        "output_tokens_per_s": round(tokens / wall, 3),
        "e2e_ms": describe(latencies),
    }


def run_baseline(
    path: str | None, dtype: str, device: str, prompts: Sequence[str], max_new_tokens: int
) -> dict:
    path = path or default_model_path()
    started = time.perf_counter()
    generate, device = load_hf_generator(path, dtype, device)
    load_s = round(time.perf_counter() - started, 3)
    info = {"model": path, "dtype": dtype, "device": device, "load_s": load_s}
    return info | measure(generate, prompts, max_new_tokens)
