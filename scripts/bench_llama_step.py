"""Time the native Llama engine's forward steps on the bundled SmolLM2-135M model.

Prints decode-step latency and tokens/s for several batch sizes at a fixed context length, one
batched prefill, and (with --attention) the decode-attention variants the engine chooses between.
The paged KV cache gives each sequence contiguous blocks (enough for every slot at the longest
length), so the figures measure the bare step, not the block allocator.
Each figure is the best of --repeats runs, because other processes on a small machine add noise.

    python scripts/bench_llama_step.py --dtype bf16 fp32 --batch-sizes 1 8 32 64 --context 200
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.hf.default_model import ensure_default_model  # noqa: E402
from engines.kernels.native_attention import native_paged_attention  # noqa: E402
from engines.kernels.ops import CHOICES, select_ops  # noqa: E402
from engines.kernels.paged import (  # noqa: E402
    PagedAttentionMeta,
    batched_decode_attention,
    paged_attention_reference,
)
from engines.llama.batch import ForwardBatch  # noqa: E402
from engines.llama.weights import load_llama  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def best_seconds(fn: Callable[[], object], iterations: int, repeats: int) -> float:
    """Best mean time of `fn` over `repeats` runs of `iterations` calls, after two warm-up calls."""
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(iterations):
            fn()
        best = min(best, (time.perf_counter() - started) / iterations)
    return best


def block_tables(slots: int, max_len: int, block_size: int) -> list[list[int]]:
    """Contiguous blocks per sequence: slot s owns blocks [s * n, (s + 1) * n) for max_len tokens."""
    per_slot = -(-max_len // block_size)
    return [list(range(slot * per_slot, (slot + 1) * per_slot)) for slot in range(slots)]


def decode_batch(tables: list[list[int]], batch_size: int, context: int, block_size: int) -> ForwardBatch:
    """One new token for each of the first batch_size sequences, each with `context` tokens cached.

    The cached K/V are whatever the cache holds (zeros); their values do not change the timing."""
    return ForwardBatch.build(
        [(tables[slot], [100 + slot], context - 1) for slot in range(batch_size)], block_size
    )


def bench_model(args: argparse.Namespace, name: str) -> None:
    max_len = max(args.context, args.prefill_len) + 8
    slots = max(max(args.batch_sizes), args.prefill_seqs)
    ops = select_ops(args.kernels, "cpu")
    path = ensure_default_model()
    model, _ = load_llama(path, DTYPES[name], "cpu", max_len, not args.no_pack, ops)
    tables = block_tables(slots, max_len, args.block_size)
    cache = model.make_cache(slots * len(tables[0]), args.block_size)
    for batch_size in args.batch_sizes:
        batch = decode_batch(tables, batch_size, args.context, args.block_size)
        seconds = best_seconds(lambda batch=batch: model(batch, cache), args.iterations, args.repeats)
        rate = batch_size / seconds
        print(f"| {name} | decode | {batch_size} | {args.context} | {seconds * 1e3:.1f} | {rate:.0f} |")
    prompts = [(tables[slot], [(7 * slot + i) % 1000 + 10 for i in range(args.prefill_len)], 0)
               for slot in range(args.prefill_seqs)]  # fmt: skip
    batch = ForwardBatch.build(prompts, args.block_size)
    seconds = best_seconds(lambda: model(batch, cache), 1, args.repeats)
    tokens = args.prefill_seqs * args.prefill_len
    print(f"| {name} | prefill {args.prefill_seqs}x{args.prefill_len} | {args.prefill_seqs} | 0 "
          f"| {seconds * 1e3:.1f} | {tokens / seconds:.0f} |")  # fmt: skip


def bench_attention(args: argparse.Namespace, name: str) -> None:
    """One layer's decode attention for SmolLM2's shapes (9 heads, 3 kv heads, head_dim 64)."""
    dtype, batch, length, heads, kv_heads, dim = DTYPES[name], max(args.batch_sizes), args.context, 9, 3, 64
    tables = block_tables(batch, length, args.block_size)
    cache_k = torch.randn(batch * len(tables[0]), kv_heads, args.block_size, dim, dtype=dtype)
    cache_v = torch.randn_like(cache_k)
    q = torch.randn(batch, heads, dim, dtype=dtype)
    meta = PagedAttentionMeta.build(tables, [1] * batch, [length] * batch)
    variants = {
        "native kernel (default)": lambda: native_paged_attention(q, cache_k, cache_v, meta),
        "gathered blocks, one SDPA call (--kernels torch)": lambda: batched_decode_attention(
            q, cache_k, cache_v, meta
        ),
        "per-sequence SDPA (reference)": lambda: paged_attention_reference(q, cache_k, cache_v, meta),
    }
    for label, fn in variants.items():
        seconds = best_seconds(fn, args.iterations, args.repeats)
        print(f"| {name} | {label} | {batch} | {length} | {seconds * 1e3:.3f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--context", type=int, default=200, help="tokens in the cache per decoding sequence")
    parser.add_argument("--prefill-seqs", type=int, default=8)
    parser.add_argument("--prefill-len", type=int, default=150)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-pack", action="store_true", help="plain F.linear, no CPU fast path (dense kernel or oneDNN)"
    )
    parser.add_argument("--attention", action="store_true", help="also time decode-attention variants")
    parser.add_argument("--kernels", choices=CHOICES, default="auto", help="option.kernels")
    parser.add_argument("--block-size", type=int, default=16, help="option.block_size (a power of two)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, pack={not args.no_pack}, "
        f"kernels {args.kernels}\n"
    )
    print("| dtype | step | batch | context | ms/step | tok/s |\n|---|---|---|---|---|---|")
    for name in args.dtype:
        bench_model(args, name)
    if args.attention:
        print("\n| dtype | decode attention, one layer | batch | context | ms |\n|---|---|---|---|---|")
        for name in args.dtype:
            bench_attention(args, name)


if __name__ == "__main__":
    main()
