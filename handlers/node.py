"""This node's ranks of a multi-node group: ``python -m handlers.node --spec SPEC`` (serving.node).

Builds the same EngineConfig as node 0's model worker (the same properties, the model fetched here),
starts ranks node_rank x per-node .. +per-node as engines.parallel.follower processes and exits as
soon as one of them does, taking the others down: the group restarts as a whole.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    with open(args.spec, encoding="utf-8") as fh:
        spec = json.load(fh)
    logging.basicConfig(
        level=spec.get("log_level", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if spec.get("model_dir"):
        os.chdir(spec["model_dir"])
    from engines.parallel.spawn import prestart

    prestart()  # the ranks' fork server imports torch while this process does
    from engines.parallel.comm import Rendezvous
    from engines.parallel.group import start_followers
    from engines.rolling.factory import distributed_config, rank_threads, resolve_degrees
    from handlers.builtin.huggingface import engine_config

    config = distributed_config(resolve_degrees(engine_config(spec["properties"], spec.get("options"))))
    world = config.tensor_parallel_degree * config.pipeline_parallel_degree
    per_node = world // config.nnodes
    first = config.node_rank * per_node
    rendezvous = Rendezvous(config.master_addr, int(config.master_port))
    followers = start_followers(
        config, list(range(first, first + per_node)), rendezvous, rank_threads(config, per_node)
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()  # the watchdog exits this process when a rank exits
    followers.close(timeout_s=5.0)


if __name__ == "__main__":
    main()
