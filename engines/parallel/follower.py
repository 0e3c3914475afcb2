"""A follower rank: ``python -m engines.parallel.follower --rank R --config JSON``.

Started by rank 0 (engines.parallel.group.start_followers) on its machine, or by ``lmi serve
--node-rank N`` on another; joins the group at MASTER_ADDR:MASTER_PORT, loads its part of the model,
sizes the same KV cache as every rank, then runs every step rank 0 broadcasts until told to stop.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from engines.base import EngineConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--config", required=True, help="the EngineConfig as JSON")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("SERVING_LOG_LEVEL", "info").upper(),
        format=f"%(asctime)s rank{args.rank} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = EngineConfig(**json.loads(args.config))
    from engines.parallel.group import GROUP_FAILED_EXIT, run_follower
    from engines.rolling.factory import load_rank

    try:
        model, cache, comm = load_rank(config, args.rank, args.threads)
        run_follower(model, cache, comm, cache.block_size)
    except RuntimeError as exc:  # the group broke (rank 0 or a peer died): exit, the group restarts
        logging.getLogger("engines.parallel").error("Rank %d leaves the group: %s", args.rank, exc)
        return GROUP_FAILED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
