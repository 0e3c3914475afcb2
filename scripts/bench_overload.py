"""Overload benchmark: throughput and latency as concurrency climbs past the slot count, and the CPU
the server's own processes take meanwhile.

Starts ``lmi serve`` (the default model unless --model-dir) with ``max_rolling_batch_size=--slots``,
then for each --concurrency runs ``lmi bench`` (streaming, --max-new-tokens with ignore_eos) and
samples /proc for the CPU used by the main process (the broker thread and the supervisor), the HTTP
front (gunicorn) and the model worker during that row. Prints one table and one JSON line.

    python scripts/bench_overload.py --concurrency 8 32 64 128 256 --slots 32 --max-new-tokens 64

The bar from the issue: tok/s at 4 x slots >= 0.9 x tok/s at slots, errors only immediate 503/429.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import ServerProcess  # noqa: E402


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc's ppid fields)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone, or its stat was half-written
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def process_groups(main: int) -> dict[str, list[int]]:
    """main (broker + supervisor), http (gunicorn front and its workers), worker (the model: every rank
    of a parallel group)."""
    groups: dict[str, list[int]] = {"main": [main], "http": [], "worker": []}
    for pid in descendants(main):
        line = cmdline(pid)
        model = "handlers.worker" in line or "engines.parallel.follower" in line
        groups["worker" if model else "http"].append(pid)
    return groups


def cpu_by_group(groups: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_seconds(p) for p in pids) for name, pids in groups.items()}


def bare_step_ms(args: argparse.Namespace, env: dict[str, str]) -> float:
    """p50 of the engine's own step for one sequence (prompt ~110 tokens, --max-new-tokens), in this
    process, after the server has stopped: the floor a concurrency-1 stream's ITL is compared with."""
    import statistics

    from engines.base import EngineConfig
    from engines.hf.default_model import ensure_default_model
    from engines.rolling.factory import create_rolling_engine
    from engines.types import GenerationRequest, SamplingParams

    path = args.model_dir or ensure_default_model()
    dtype = env.get("OPTION_DTYPE", "auto")
    max_len = int(env.get("OPTION_MAX_MODEL_LEN", "0")) or None
    quantize = env.get("OPTION_QUANTIZE") or None
    engine = create_rolling_engine(
        EngineConfig(
            model_path=path,
            dtype=dtype,
            max_model_len=max_len,
            max_rolling_batch_size=args.slots,
            quantize=quantize,
        )
    )
    prompt = engine.tokenizer("The history of the old harbour town is long and " * 11)["input_ids"]
    times: list[float] = []
    for run in range(2):  # the first run warms up
        times.clear()
        params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
        engine.step([GenerationRequest(f"bare{run}", prompt, params)], [])
        while engine.running:
            started = time.perf_counter()
            engine.step([], [])
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def run_row(args: argparse.Namespace, url: str, concurrency: int, groups: dict[str, list[int]]) -> dict:
    before, started = cpu_by_group(groups), time.monotonic()
    cmd = [sys.executable, "-m", "serving", "bench", "--url", url, "--api", args.api, "--quiet"]
    cmd += ["--concurrency", str(concurrency), "--max-new-tokens", str(args.max_new_tokens)]
    cmd += ["--duration", str(args.duration), "--num-requests", str(max(2 * concurrency, args.min_requests))]
    cmd += ["--warmup", "0", "--timeout", str(args.timeout)]
    cmd += ["--prompt-len-min", str(args.prompt_len[0]), "--prompt-len-max", str(args.prompt_len[1])]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    after = cpu_by_group(groups)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"lmi bench failed ({done.returncode}):\n{done.stderr[-3000:]}")
    row = json.loads(lines[-1])["rows"][0]
    row["cpu_share"] = {name: round((after[name] - before[name]) / wall, 3) for name in after}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model-dir", help="model folder (default: the default model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64, 128, 256])
    parser.add_argument("--slots", type=int, default=32, help="option.max_rolling_batch_size (32)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of requests per row (40)")
    parser.add_argument("--min-requests", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--api", default="openai-completions", choices=("lmi", "openai-completions", "openai-chat", "tgi")
    )
    parser.add_argument("--env", nargs="*", default=[], help="extra KEY=VALUE for the server")
    parser.add_argument(
        "--prompt-len", type=int, nargs=2, default=[20, 200], metavar=("MIN", "MAX"), help="prompt tokens"
    )
    parser.add_argument(
        "--bare-step", action="store_true", help="also time the engine's own batch-1 step (after the server)"
    )
    args = parser.parse_args()
    env = {"OPTION_MAX_ROLLING_BATCH_SIZE": str(args.slots)}
    env.update(item.split("=", 1) for item in args.env)
    rows = []
    with ServerProcess(args.model_dir, env) as srv:
        srv.wait_ready(timeout_s=600)
        groups = process_groups(srv.proc.pid)
        subprocess.run(  # one warm-up request, untimed
            [sys.executable, "-m", "serving", "bench", "--url", srv.url, "--api", args.api, "--quiet"]
            + ["--concurrency", "1", "--num-requests", "2", "--max-new-tokens", "8", "--warmup", "0"],
            cwd=ROOT,
            capture_output=True,
            check=False,
        )
        for concurrency in args.concurrency:
            row = run_row(args, srv.url, concurrency, groups)
            rows.append(row)
            print(f"c={concurrency}: {row['output_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    header = "| conc | tok/s | TTFT p50/p99 ms | ITL p50/p99 ms | ok/err | main CPU | HTTP CPU | worker CPU |"
    print(header)
    print("|" + "---|" * 8)
    for r in rows:
        cpu = r["cpu_share"]
        print(
            f"| {r['concurrency']} | {r['output_tokens_per_s']:.1f} | {r['ttft_ms']['p50']:.0f} / "
            f"{r['ttft_ms']['p99']:.0f} | {r['itl_ms']['p50']:.1f} / {r['itl_ms']['p99']:.1f} | "
            f"{r['completed']}/{r['errors']} | {cpu['main']:.2f} | {cpu['http']:.2f} | {cpu['worker']:.2f} |"
        )
    by_conc = {r["concurrency"]: r["output_tokens_per_s"] for r in rows}
    if args.slots in by_conc and 4 * args.slots in by_conc:
        ratio = by_conc[4 * args.slots] / by_conc[args.slots]
        print(f"tok/s at {4 * args.slots} / tok/s at {args.slots} = {ratio:.2f} (bar: >= 0.90)")
    bare = bare_step_ms(args, env) if args.bare_step else None
    if bare is not None and 1 in by_conc:
        itl = next(r["itl_ms"]["p50"] for r in rows if r["concurrency"] == 1)
        print(f"concurrency 1: ITL p50 {itl:.1f} ms, bare engine step p50 {bare:.1f} ms: {itl / bare:.2f}x")
    record = {"slots": args.slots, "max_new_tokens": args.max_new_tokens, "bare_step_ms": bare, "rows": rows}
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
