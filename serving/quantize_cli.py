"""``lmi quantize --model-dir SRC --method int8|int4 [--group-size 128] [--calibration FILE]
--output DIR``: a quantized checkpoint (the decoder projections in the portable form of
engines.quant.storage, with a manifest naming the method, group size and source hash) that ``lmi serve``
loads without quantizing again. ``--calibration`` scales the projections activation-aware first
(engines.quant.awq_scaling).

It is a one-rank partition (serving.partition_cli does the work): ``lmi partition --quantize`` writes
quantized partitions for several ranks the same way.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from serving.partition_cli import DTYPE_CHOICES, _positive_int


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "quantize",
        help="write a weight-only int8/int4 checkpoint that lmi serve loads as it is",
    )
    parser.add_argument("--model-dir", required=True, help="a local folder, s3://bucket/prefix/ or a Hub id")
    parser.add_argument("--method", choices=("int8", "int4"), required=True)
    parser.add_argument(
        "--group-size",
        type=_positive_int,
        default=None,
        help="int4: input columns per scale (default: 128, or 32 for weights converted from a 4-bit GGUF)",
    )
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="dtype of what stays unquantized"
    )
    parser.add_argument(
        "--calibration",
        help="a UTF-8 text file (a few thousand tokens of text like the model's traffic): scale the "
        "projections activation-aware (AWQ-style) before quantizing",
    )
    parser.add_argument("--output", required=True, help="folder to write (must be absent or empty)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --output")
    parser.add_argument("--download-dir", default=os.environ.get("SERVING_DOWNLOAD_DIR"), help="cache root")
    parser.add_argument("--revision", help="Hub revision")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from serving.partition_cli import run as partition

    args.tensor_parallel_degree, args.pipeline_parallel_degree, args.quantize = 1, 1, args.method
    return partition(args)
