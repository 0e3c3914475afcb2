"""Time one layer's causal prefill attention over the paged KV cache for the default model's shapes.

Compares SDPA over keys gathered from the cache (engines.kernels.paged.sequence_attention, NativeOps'
route for long chunks before the tiled kernel), the per-token native kernel (native_paged_attention)
and the query-tiled native kernel (native_prefill_attention). The variants alternate inside one loop
and each figure is a median, so load from other processes on a small machine hits them alike.

    python scripts/bench_prefill_attention.py --dtype bf16 --runs 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.kernels.native_attention import (  # noqa: E402
    native_paged_attention,
    native_prefill_attention,
)
from engines.kernels.paged import PagedAttentionMeta, sequence_attention  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
CASES = [(256, 0), (512, 0), (1024, 0), (2048, 0), (512, 1024)]
"""(chunk tokens, cached prefix tokens)."""


def make_case(
    chunk: int, prefix: int, dtype: torch.dtype, heads: int, kv_heads: int, dim: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PagedAttentionMeta]:
    """One sequence's chunk over a cache whose blocks are dealt in shuffled order."""
    context = prefix + chunk
    blocks = -(-context // block_size)
    generator = torch.Generator().manual_seed(0)
    table = torch.randperm(blocks, generator=generator).tolist()
    cache_k = torch.randn(blocks, kv_heads, block_size, dim, generator=generator).to(dtype)
    cache_v = torch.randn(blocks, kv_heads, block_size, dim, generator=generator).to(dtype)
    q = torch.randn(chunk, heads, dim, generator=generator).to(dtype)
    return q, cache_k, cache_v, PagedAttentionMeta.build([table], [chunk], [context])


def variants(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, meta: PagedAttentionMeta
) -> dict[str, Callable[[], object]]:
    table, context = meta.block_tables[0], int(meta.context_lens[0])
    return {
        "sdpa": lambda: sequence_attention(q, cache_k, cache_v, table, context),
        "token": lambda: native_paged_attention(q, cache_k, cache_v, meta),
        "tiled": lambda: native_prefill_attention(q, cache_k, cache_v, meta),
    }


def medians(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median seconds per call of each variant, the variants taking turns in every run."""
    for fn in fns.values():
        fn()  # warm-up (and the one-time kernel build)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs=3, default=[9, 3, 64], metavar=("HEADS", "KV", "DIM"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    heads, kv_heads, dim = args.shape
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, heads {heads}, "
          f"kv heads {kv_heads}, head_dim {dim}, block {args.block_size}, load {load:.2f}\n")  # fmt: skip
    print("| chunk | prefix | SDPA ms | per-token kernel ms | tiled kernel ms | tiled / SDPA |")
    print("|---|---|---|---|---|---|")
    for chunk, prefix in CASES:
        case = make_case(chunk, prefix, DTYPES[args.dtype], heads, kv_heads, dim, args.block_size)
        ms = {name: seconds * 1e3 for name, seconds in medians(variants(*case), args.runs).items()}
        print(f"| {chunk} | {prefix} | {ms['sdpa']:.2f} | {ms['token']:.2f} | {ms['tiled']:.2f} "
              f"| {ms['tiled'] / ms['sdpa']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
