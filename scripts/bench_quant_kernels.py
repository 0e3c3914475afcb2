"""Quantized projection kernels against bf16 and against the memory they read, one decode step's worth.

A model's 30 layers of distinct weights (SmolLM2-135M's shapes by default) are far larger than the
caches, so each step reads every weight from memory, as serving does; the same bytes summed by torch
are the baseline a memory-bound kernel should approach. Prints, per method and batch rows, the time
of one step's projections (median of --steps), its ratio to bf16, and the bytes read per second
against that baseline. Random weights: the figures are about speed, not values.

    python scripts/bench_quant_kernels.py --rows 1 8 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.llama.linear import Linear  # noqa: E402
from engines.quant.linear import QuantizedLinear  # noqa: E402
from engines.quant.methods import quantize_int4, quantize_int8  # noqa: E402

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
"""SmolLM2-135M's qkv, o_proj, gate_up and down (out, in)."""


def build(method: str, layers: int) -> list[list[torch.nn.Module]]:
    generator = torch.Generator().manual_seed(0)
    model = []
    for _ in range(layers):
        row = []
        for out_features, in_features in SHAPES:
            weight = torch.randn(out_features, in_features, generator=generator) * 0.05
            if method == "bf16":
                linear = Linear(in_features, out_features, False, torch.bfloat16, "cpu")
                linear.weight.data.copy_(weight)
                linear.pack()
                row.append(linear)
            elif method == "int8":
                row.append(QuantizedLinear(quantize_int8(weight), None, torch.bfloat16))
            else:
                group = int(method.removeprefix("int4-g"))
                row.append(QuantizedLinear(quantize_int4(weight, group), None, torch.bfloat16))
        model.append(row)
    return model


def matrix_bytes(module: torch.nn.Module, shape: tuple[int, int]) -> int:
    """Bytes one call reads: the quantized buffers, or the bf16 weight (oneDNN's packed copy is as big)."""
    if isinstance(module, QuantizedLinear):
        return module.weight_bytes()
    return shape[0] * shape[1] * 2


def median_ms(fn: Callable[[], object], steps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["bf16", "int8", "int4-g32"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with torch.inference_mode():
        for method in args.methods:
            model = build(method, args.layers)
            sizes = [matrix_bytes(m, shape) for row in model for m, shape in zip(row, SHAPES, strict=True)]
            size = sum(sizes)
            words = [torch.ones(n // 4) for n in sizes]  # distinct buffers of the same sizes, as floats
            read = median_ms(lambda words=words: [w.sum() for w in words], args.steps)
            for rows in args.rows:
                xs = [torch.randn(rows, k).bfloat16() for _, k in SHAPES]

                def step(model: list = model, xs: list = xs) -> None:
                    for row in model:
                        for module, x in zip(row, xs, strict=True):
                            module(x)

                took = median_ms(step, args.steps)
                results.append(
                    {
                        "method": method,
                        "rows": rows,
                        "step_ms": round(took, 3),
                        "weight_mib": round(size / 2**20, 1),
                        "gb_s": round(size / took / 1e6, 1),
                        "read_gb_s": round(size / read / 1e6, 1),
                    }
                )
    base = {r["rows"]: r["step_ms"] for r in results if r["method"] == "bf16"}
    print("| method | rows | step ms | vs bf16 | weights MiB | GB/s the kernel reads | GB/s torch sums |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{base[r['rows']] / r['step_ms']:.2f}x" if r["rows"] in base else "-"
        cells = (r["method"], r["rows"], r["step_ms"], ratio, r["weight_mib"], r["gb_s"], r["read_gb_s"])
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
