"""``lmi partition``: cut a checkpoint into one file per rank ahead of time (engines.parallel.partition).

A server started on the output with the same degrees reads each rank's file straight into its
parameters instead of every rank slicing the whole checkpoint. Imported by ``lmi`` itself, so torch and
the engines are imported inside ``run``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")


class PartitionError(Exception):
    """A problem the user fixes by changing the command (exit 2)."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "partition",
        help="cut a model into one file per tensor/pipeline-parallel rank, ahead of serving",
        description="Partition a Llama-family safetensors checkpoint for option.tensor_parallel_degree and "
        "option.pipeline_parallel_degree: one rank-NNN-of-MMM.safetensors per rank (fused, contiguous, in "
        "the serving dtype) plus lmi-partition.json. Serve the output with the same degrees.",
    )
    parser.add_argument("--model-dir", required=True, help="a local folder, s3://bucket/prefix/ or a Hub id")
    parser.add_argument("--tensor-parallel-degree", type=_positive_int, required=True)
    parser.add_argument("--pipeline-parallel-degree", type=_positive_int, default=1)
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="stored dtype: the server's option.dtype"
    )
    parser.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help="store the decoder projections quantized (option.quantize)",
    )
    parser.add_argument(
        "--group-size",
        type=_positive_int,
        default=None,
        help="int4: input columns per scale (default: 128, or 32 for weights converted from a 4-bit GGUF)",
    )
    parser.add_argument("--output", required=True, help="folder to write (must be absent or empty)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --output")
    parser.add_argument("--download-dir", default=os.environ.get("SERVING_DOWNLOAD_DIR"), help="cache root")
    parser.add_argument("--revision", help="Hub revision")
    parser.add_argument("--log-level", default=os.environ.get("SERVING_LOG_LEVEL", "info"))
    parser.set_defaults(run=run)
    return parser


def _say(message: str) -> None:
    print(f"partition: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """0: written; 1: the source could not be fetched; 2: the command does not fit the model or folder."""
    from serving.artifacts import ArtifactError

    output = Path(args.output)
    try:
        _check_output(output, args.force)
        source = _fetch(args)
        _check_source(source, output, args.tensor_parallel_degree, args.pipeline_parallel_degree)
    except ArtifactError as exc:
        _say(f"error: {exc}")
        return 1
    except PartitionError as exc:
        _say(f"error: {exc}")
        return 2
    created = not output.exists()
    try:
        manifest, seconds = _write(source, output, args)
    except (PartitionError, ValueError) as exc:
        if created:
            shutil.rmtree(output, ignore_errors=True)
        _say(f"error: {exc}")
        return 2
    print(summary(manifest, output, seconds))
    return 0


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise PartitionError(f"--output {output} is a file; give a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise PartitionError(
            f"--output {output} exists and is not empty. Fix: choose a new folder, or pass --force to "
            "write into it (an earlier partition's files there are replaced)"
        )


def _fetch(args: argparse.Namespace) -> Path:
    """The local folder of --model-dir: a folder as is, else downloaded like ``lmi pull``."""
    from serving.artifacts import FetchOptions, fetch, is_fetchable

    if not is_fetchable(args.model_dir):
        if not os.path.isdir(args.model_dir):
            raise PartitionError(
                f"--model-dir {args.model_dir!r} is not a folder, an s3:// URL or a Hub id (org/name)"
            )
        return Path(args.model_dir)
    keys = {"download_dir": args.download_dir, "revision": args.revision}
    try:
        options = FetchOptions.from_properties({k: v for k, v in keys.items() if v})
    except ValueError as exc:
        raise PartitionError(str(exc)) from None
    return fetch(args.model_dir, options)


def _check_source(source: Path, output: Path, tp: int, pp: int) -> None:
    """Architecture, degrees and files, before anything is written."""
    import json

    from transformers import AutoConfig

    from engines.base import EngineLoadError
    from engines.llama.spec import LlamaSpec
    from engines.llama.weights import check_supported
    from engines.parallel.layout import ParallelLayout, check_degrees
    from engines.parallel.partition import is_partitioned

    if output.resolve() == source.resolve():
        raise PartitionError(f"--output is the source folder {source}; choose another folder")
    if is_partitioned(source):
        raise PartitionError(f"{source} is already a partition; partition the original checkpoint")
    config_file = source / "config.json"
    if not config_file.is_file() or not any(source.glob("*.safetensors")):
        raise PartitionError(f"{source} needs config.json and *.safetensors weights to be partitioned")
    try:
        check_supported(json.loads(config_file.read_text()), max_model_len=1)
        spec = LlamaSpec.from_hf(AutoConfig.from_pretrained(source))
        check_degrees(spec, ParallelLayout(tp, pp))
    except (NotImplementedError, EngineLoadError, ValueError) as exc:
        raise PartitionError(str(exc)) from None


def _write(source: Path, output: Path, args: argparse.Namespace) -> tuple[Any, float]:
    from engines.base import EngineLoadError
    from engines.parallel.partition import MANIFEST, write_partition

    for stale in [output / MANIFEST, *output.glob("rank-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # --force over an earlier partition: none of its ranks survive
    started = time.perf_counter()
    try:
        manifest = write_partition(
            source,
            output,
            args.tensor_parallel_degree,
            args.pipeline_parallel_degree,
            args.dtype,
            quantize=args.quantize,
            group_size=args.group_size,
            calibration=getattr(args, "calibration", None),
        )
    except (NotImplementedError, EngineLoadError) as exc:
        raise PartitionError(str(exc)) from None
    if manifest.source != args.model_dir:  # name what the user gave (s3://...), not the download cache
        manifest.source = args.model_dir
        manifest.write(output)
    return manifest, time.perf_counter() - started


def _quantized(manifest: Any) -> str:
    if not manifest.quantize:
        return ""
    return f", {manifest.quantize}" + (f" in groups of {manifest.group_size}" if manifest.group_size else "")


def summary(manifest: Any, output: Path, seconds: float) -> str:
    """The manifest as a table, the totals and the command that serves the result."""
    tp, pp = manifest.tensor_parallel_degree, manifest.pipeline_parallel_degree
    total = sum(entry.bytes for entry in manifest.files)
    name_width = max(len(entry.file) for entry in manifest.files)
    lines = [
        f"Partitioned {manifest.source} for tensor_parallel_degree={tp}, pipeline_parallel_degree={pp} "
        f"({manifest.dtype}{_quantized(manifest)}) into {output} in {seconds:.1f} s",
        f"  {'rank':>4}  {'file':<{name_width}}  {'bytes':>15}  sha256",
    ]
    lines += [
        f"  {e.rank:>4}  {e.file:<{name_width}}  {e.bytes:>15,}  {e.sha256[:16]}" for e in manifest.files
    ]
    lines.append(f"  {len(manifest.files)} files, {total:,} bytes ({total / 2**30:.2f} GiB)")
    serve = f"OPTION_TENSOR_PARALLEL_DEGREE={tp}"
    serve += f" OPTION_PIPELINE_PARALLEL_DEGREE={pp}" if pp > 1 else ""
    lines.append(f"Serve it with the same degrees: {serve} lmi serve --model-dir {output}")
    return "\n".join(lines)
