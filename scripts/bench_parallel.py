"""Decode throughput of the native engine at TP=1 vs TP=2 (and PP=2) on this machine, with the share of
rank 0's step time spent in all-reduces / all-gathers.

Drives the engine directly (no HTTP), so the figures are the engine's: ``batch`` sequences of a 64-token
prompt generating ``--new-tokens`` each with ignore_eos, all admitted at once. TP=1 runs with every core in
one process; a group of N ranks gives each rank cores / N threads. Prints one row per (layout, batch):
tok/s, p50/p90 step time, the collective share, and the ratio to TP=1 at the same batch.

    python scripts/bench_parallel.py [--model-dir DIR] [--batch 1 32] [--layouts 1x1 2x1 1x2]
"""

from __future__ import annotations

import argparse
import statistics
import time

from engines.base import EngineConfig
from engines.rolling.factory import create_rolling_engine
from engines.types import GenerationRequest, SamplingParams


def measure(path: str, tp: int, pp: int, batch: int, new_tokens: int, dtype: str) -> dict[str, float]:
    config = EngineConfig(
        model_path=path, dtype=dtype, tensor_parallel_degree=tp, pipeline_parallel_degree=pp,
        max_rolling_batch_size=max(batch, 1), max_model_len=64 + new_tokens + 8,
    )  # fmt: skip
    engine = create_rolling_engine(config)
    try:
        comm = engine.model.comm if engine.group is not None else None
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        warm = [
            GenerationRequest("warm", list(range(10, 74)), SamplingParams(max_new_tokens=4, ignore_eos=True))
        ]
        while warm or engine.running:
            engine.step(warm, [])
            warm = []
        requests = [
            GenerationRequest(f"r{i}", [(7 * i + j) % 5000 + 10 for j in range(64)], params)
            for i in range(batch)
        ]
        engine.step(requests, [])  # the prefill step
        reduce_before = comm.reduce_seconds if comm else 0.0
        steps, tokens, started = [], 0, time.perf_counter()
        while engine.running:
            t = time.perf_counter()
            tokens += len(engine.step([], []))
            steps.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
        reduce = (comm.reduce_seconds - reduce_before) if comm else 0.0
    finally:
        engine.close()
    steps.sort()
    return {
        "tok_s": tokens / elapsed,
        "p50_ms": statistics.median(steps) * 1000,
        "p90_ms": steps[int(0.9 * (len(steps) - 1))] * 1000,
        "comm_share": reduce / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2"], help="TPxPP")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    path = args.model_dir
    if path is None:
        from engines.hf.default_model import ensure_default_model

        path = ensure_default_model()
    print("| TPxPP | batch | tok/s | step p50 ms | step p90 ms | collectives share | vs 1x1 |")
    print("|---|---|---|---|---|---|---|")
    base: dict[int, float] = {}
    for layout in args.layouts:
        tp, pp = (int(x) for x in layout.lower().split("x"))
        for batch in args.batch:
            row = measure(path, tp, pp, batch, args.new_tokens, args.dtype)
            base.setdefault(batch, row["tok_s"]) if (tp, pp) == (1, 1) else None
            ratio = row["tok_s"] / base[batch] if batch in base else float("nan")
            print(
                f"| {tp}x{pp} | {batch} | {row['tok_s']:.1f} | {row['p50_ms']:.1f} | {row['p90_ms']:.1f} | "
                f"{row['comm_share']:.0%} | {ratio:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
