"""``lmi bench`` / ``python -m serving.bench``: options, validation, and the order of a run.

Order: reach the server (model name, TGI probe, warm-up), then the baseline while the server is idle,
then one load row per --concurrency / --rate value. Imported by ``lmi`` itself, so everything heavy
(aiohttp, transformers, torch) is imported inside ``run``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from serving.bench.baseline import DTYPES
from serving.bench.clients import API_NAMES
from serving.bench.config import BenchConfig
from serving.bench.prompts import PromptSource

DESCRIPTION = (
    "Benchmark an LLM serving endpoint with streamed requests: closed loop (--concurrency, several values "
    "give one row each) or open loop (--rate, Poisson arrivals). Reports requests/min, output tokens/s, "
    "TTFT, inter-token latency and end-to-end latency (mean/p50/p90/p99) as a table and one JSON line "
    "(the last line of stdout). A request that fails, times out or returns fewer than --max-new-tokens "
    "tokens counts as an error. --baseline also times one-at-a-time Hugging Face generate for comparison."
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    target = p.add_argument_group("target")
    target.add_argument(
        "--url", default="http://127.0.0.1:8080", help="server base URL (default %(default)s)"
    )
    target.add_argument("--api", choices=API_NAMES, default="lmi", help="request/stream format (default lmi)")
    target.add_argument(
        "--model", help="model name for the OpenAI APIs (default: the first of GET /v1/models)"
    )
    target.add_argument("--timeout", type=_positive_float, default=120.0, help="seconds per request (120)")
    target.add_argument(
        "--tgi-ignore-eos",
        choices=("auto", "on", "off"),
        default="auto",
        help="--api tgi: send parameters.ignore_eos (TGI has none); auto: if a probe request is accepted",
    )
    load = p.add_argument_group("load (rows: each --concurrency value, then each --rate value)")
    load.add_argument("--concurrency", type=_positive_int, nargs="+", default=[], help="closed-loop clients")
    load.add_argument("--rate", type=_positive_float, nargs="+", default=[], help="open loop: requests/s")
    load.add_argument(
        "--max-concurrency", type=_positive_int, default=256, help="open-loop in-flight cap (256)"
    )
    load.add_argument(
        "--num-requests",
        type=_positive_int,
        help="requests per row (default: 4 per client or 10 s of arrivals, >= 32)",
    )
    load.add_argument("--duration", type=_positive_float, help="seconds per row to keep issuing requests")
    load.add_argument("--warmup", type=int, default=1, help="untimed requests before the rows (1)")
    shape = p.add_argument_group("requests")
    shape.add_argument("--prompt-len-min", type=_positive_int, default=20, help="prompt tokens, min (20)")
    shape.add_argument("--prompt-len-max", type=_positive_int, default=200, help="prompt tokens, max (200)")
    shape.add_argument("--max-new-tokens", type=_positive_int, default=128, help="output tokens (ignore_eos)")
    shape.add_argument("--seed", type=int, default=0, help="prompts and arrival times (0)")
    shape.add_argument(
        "--tokenizer", help="HF tokenizer folder to size prompts exactly (default: 1 word ~ 1 token)"
    )
    base = p.add_argument_group("baseline (naive HF generate, before the rows, server idle)")
    base.add_argument("--baseline", action="store_true", help="also time one-at-a-time HF generate")
    base.add_argument("--baseline-model", help="local HF model folder (default: the server's default model)")
    base.add_argument("--baseline-dtype", choices=DTYPES, default="float32", help="(float32)")
    base.add_argument(
        "--baseline-device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)"
    )
    base.add_argument("--baseline-requests", type=_positive_int, default=3, help="sequential requests (3)")
    out = p.add_argument_group("output")
    out.add_argument("--json-out", type=Path, help="also append the JSON line to this file")
    out.add_argument("--quiet", action="store_true", help="print only the JSON line")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``bench`` to an ``add_subparsers()`` object; ``args.run(args)`` dispatches to ``run``."""
    parser = subparsers.add_parser("bench", help="benchmark a serving endpoint", description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.bench", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def _config(args: argparse.Namespace) -> BenchConfig:
    if args.prompt_len_min > args.prompt_len_max:
        raise ValueError(f"--prompt-len-min {args.prompt_len_min} > --prompt-len-max {args.prompt_len_max}")
    return BenchConfig(
        url=args.url.rstrip("/"),
        api=args.api,
        model=args.model,
        concurrency=list(args.concurrency),
        rates=list(args.rate),
        max_concurrency=args.max_concurrency,
        num_requests=args.num_requests,
        duration_s=args.duration,
        max_new_tokens=args.max_new_tokens,
        timeout_s=args.timeout,
        warmup=max(0, args.warmup),
        tgi_ignore_eos=args.tgi_ignore_eos,
        seed=args.seed,
    )


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """0: every row completed requests; 1: a row had none, or the server could not be used; 2: bad options."""
    try:
        cfg = _config(args)
    except ValueError as exc:
        _say(f"error: {exc}")
        return 2
    from serving.bench import report
    from serving.bench.prompts import load_tokenizer
    from serving.bench.runner import BenchError, resolve_api, run_rows, warm_up

    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    prompts = PromptSource(args.prompt_len_min, args.prompt_len_max, args.seed, tokenizer)
    try:
        api = asyncio.run(resolve_api(cfg))
        asyncio.run(warm_up(cfg, api, prompts))
    except BenchError as exc:
        _say(f"error: {exc}")
        return 1
    try:
        baseline = _baseline(args, prompts) if args.baseline else None
    except Exception as exc:  # missing model or broken transformers: say so, no traceback
        _say(f"error: baseline failed: {exc!r}")
        return 1
    rows = asyncio.run(run_rows(cfg, api, prompts, _say))
    report.add_baseline_ratios(rows, baseline)
    line = report.json_line(report.record(cfg.as_dict(), rows, baseline))
    if not args.quiet:
        print(report.table(rows, baseline))
    print(line, flush=True)
    if args.json_out:
        with args.json_out.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return 0 if all(r["completed"] for r in rows) else 1


def _baseline(args: argparse.Namespace, prompts: PromptSource) -> dict:
    from serving.bench.baseline import run_baseline

    texts = [prompts.get(i).text for i in range(args.baseline_requests)]
    _say(f"baseline: {len(texts)} sequential HF generate requests ({args.baseline_dtype})")
    return run_baseline(
        args.baseline_model, args.baseline_dtype, args.baseline_device, texts, args.max_new_tokens
    )
