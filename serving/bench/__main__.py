"""``python -m serving.bench ...``: the same options as ``lmi bench``."""

import sys

from serving.bench.cli import build_parser, run

sys.exit(run(build_parser().parse_args()))
