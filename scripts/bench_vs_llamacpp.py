"""lmi serve against llama.cpp's llama-server on the same machine, same client, same load: concurrency 1,
streaming OpenAI completions of --max-new-tokens with ignore_eos, a distinct prompt per request (no
prefix-cache hits on either side), one server at a time, each warmed with two requests first.

Each pair is a GGUF file for llama-server and the option.quantize lmi serves the default model with:

    python scripts/bench_vs_llamacpp.py --llama-server ~/llama.cpp/build/bin/llama-server \
        --pair smollm2-bf16.gguf=none --pair SmolLM2-135M-Instruct.Q4_1.gguf=int4 \
        --pair smollm2-bf16.gguf=int8 --pair SmolLM2-135M-Instruct.Q4_1.gguf=gguf

llama-server is not a dependency: build it from llama.cpp (cmake --build build --target llama-server).
The bf16 and Q8_0 files can be made from the bundled Q4_1 file with llama.cpp's quantize tool
(--allow-requantize), which keeps the Q4_1 grid: the values the default model serves in bf16.
Prints one table (tok/s, TTFT and inter-token latency percentiles) and one JSON line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bench_batching import wait_up  # noqa: E402
from support import ServerProcess, free_port  # noqa: E402

WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wise", "owls",
    "watch", "from", "an", "old", "oak", "tree", "near", "river", "where", "children", "play", "and",
    "merchants", "sell", "bread", "fish", "apples", "warm", "tea", "to", "travellers",
]  # fmt: skip


def prompt(index: int, words: int) -> str:
    rng = random.Random(index)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def stream_one(port: int, text: str, max_tokens: int) -> tuple[float, list[float], float]:
    """(seconds to the first token, gaps between tokens, seconds for the request) of one completion."""
    body = {"model": "default", "prompt": text, "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    first, last, gaps = None, None, []
    for line in response:
        line = line.strip()
        if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
            continue
        choices = json.loads(line[5:]).get("choices") or [{}]
        if not choices[0].get("text"):
            continue  # a closing chunk without text
        now = time.perf_counter()
        if first is None:
            first = now - started
        else:
            gaps.append(now - last)
        last = now
    conn.close()
    return first or float("nan"), gaps, time.perf_counter() - started


def measure(port: int, requests: int, max_tokens: int, words: int, offset: int) -> dict:
    for i in range(2):  # warm-up
        stream_one(port, prompt(offset + 10_000 + i, words), max_tokens)
    ttfts, gaps, started = [], [], time.perf_counter()
    for i in range(requests):
        first, between, _ = stream_one(port, prompt(offset + i, words), max_tokens)
        ttfts.append(first)
        gaps += between
    wall = time.perf_counter() - started
    out = {
        "tok_s": round(requests * max_tokens / wall, 1),
        "ttft_p50_ms": round(percentile(ttfts, 0.5) * 1e3, 1),
    }
    return out | {f"itl_p{q}_ms": round(percentile(gaps, q / 100) * 1e3, 2) for q in (50, 90, 99)}


def run_llama_server(binary: str, gguf: str, threads: int, args: argparse.Namespace, offset: int) -> dict:
    port = free_port()
    command = [binary, "-m", gguf, "-t", str(threads), "-tb", str(threads), "--host", "127.0.0.1",
               "--port", str(port), "-c", "4096", "-np", "1", "--no-webui"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(port, proc, timeout_s=120, path="/health")
        return measure(port, args.requests, args.max_new_tokens, args.prompt_words, offset)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_lmi(quantize: str, args: argparse.Namespace, offset: int) -> dict:
    env = {"OPTION_MAX_ROLLING_BATCH_SIZE": str(args.slots)}
    if quantize != "none":
        env["OPTION_QUANTIZE"] = quantize
    with ServerProcess(None, env) as server:
        server.wait_ready(timeout_s=600)
        return measure(server.port, args.requests, args.max_new_tokens, args.prompt_words, offset)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--llama-server", required=True, help="path of llama.cpp's llama-server binary")
    pair_help = "a GGUF for llama-server and the option.quantize for lmi (none: bf16)"
    parser.add_argument("--pair", action="append", required=True, metavar="GGUF=QUANTIZE", help=pair_help)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2, help="llama-server's -t (lmi: torch's default)")
    parser.add_argument("--slots", type=int, default=64, help="lmi's option.max_rolling_batch_size")
    args = parser.parse_args()
    rows = []
    for index, pair in enumerate(args.pair):
        gguf, quantize = pair.split("=", 1)
        offset = index * 1000  # the same prompts for both servers of a pair
        llama = run_llama_server(args.llama_server, gguf, args.threads, args, offset)
        lmi = run_lmi(quantize, args, offset)
        rows.append({"gguf": Path(gguf).name, "quantize": quantize, "llama_server": llama, "lmi": lmi,
                     "ratio": round(lmi["tok_s"] / llama["tok_s"], 2)})  # fmt: skip
        print(f"done: {rows[-1]}", file=sys.stderr, flush=True)
    head = "| llama-server file | tok/s | ITL p50 / p99 ms | lmi option.quantize | tok/s | ITL p50 / p99 ms |"
    print(head + " lmi / llama.cpp |\n|---|---|---|---|---|---|---|")
    for row in rows:
        llama, lmi = row["llama_server"], row["lmi"]
        itl = [f"{side['itl_p50_ms']} / {side['itl_p99_ms']}" for side in (llama, lmi)]
        cells = [row["gguf"], llama["tok_s"], itl[0], row["quantize"], lmi["tok_s"], itl[1], row["ratio"]]
        print("| " + " | ".join(str(cell) for cell in cells) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
