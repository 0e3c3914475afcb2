"""A follower rank: joins the group at MASTER_ADDR:MASTER_PORT, loads its part of the model, sizes the
same KV cache as every rank, then runs every step rank 0 broadcasts until told to stop.

Forked by rank 0 (engines.parallel.spawn, through engines.parallel.group.start_followers) on its machine,
or by ``lmi serve --node-rank N`` on another; ``python -m engines.parallel.follower --rank R --config
JSON`` runs one by hand.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def serve(rank: int, config_json: str, threads: int | None) -> int:
    """The follower's whole life; returns its exit code (GROUP_FAILED_EXIT when its group broke)."""
    import json

    from engines.base import EngineConfig

    logging.basicConfig(
        level=os.environ.get("SERVING_LOG_LEVEL", "info").upper(),
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    config = EngineConfig(**json.loads(config_json))
    from engines.parallel.group import GROUP_FAILED_EXIT, run_follower
    from engines.rolling.factory import load_rank

    try:
        model, cache, comm = load_rank(config, rank, threads)
        run_follower(model, cache, comm, cache.block_size)
    except RuntimeError as exc:  # the group broke (rank 0 or a peer died): exit, the group restarts
        logging.getLogger("engines.parallel").error("Rank %d leaves the group: %s", rank, exc)
        return GROUP_FAILED_EXIT
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--config", required=True, help="the EngineConfig as JSON")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    return serve(args.rank, args.config, args.threads)


if __name__ == "__main__":
    sys.exit(main())
