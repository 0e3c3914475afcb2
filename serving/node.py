"""A compute-only node of a multi-node group (``lmi serve --node-rank N``, N > 0): no HTTP, no broker.

It runs this machine's ranks (``python -m handlers.node``) and starts them again whenever they exit,
which they do when the group breaks (node 0's worker restarted, or a rank died), so they rejoin the
group node 0 forms next. SIGTERM stops them.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading

from serving.config import ServingConfig
from serving.workers import die_with_parent, write_worker_spec

log = logging.getLogger("serving.node")

RESTART_DELAY_S = 1.0


def run_node(config: ServingConfig) -> int:
    """Keep this node's ranks running until SIGTERM/SIGINT; returns the exit code."""
    settings = config.settings
    runtime_dir = tempfile.mkdtemp(prefix="lmi-node-")
    spec_path = os.path.join(runtime_dir, "worker.json")
    write_worker_spec(config, spec_path)
    stopping = threading.Event()
    current: list[subprocess.Popen] = []

    def on_signal(signum: int, _frame: object) -> None:
        log.info("Received signal %d: stopping this node's ranks", signum)
        stopping.set()
        for process in current:
            if process.poll() is None:
                process.terminate()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "Node %d of %d: compute only; the group meets at %s:%s",
        settings["node_rank"],
        settings["nnodes"],
        settings["master_addr"],
        settings["master_port"],
    )
    while not stopping.is_set():
        process = subprocess.Popen(
            [sys.executable, "-m", "handlers.node", "--spec", spec_path],
            preexec_fn=functools.partial(die_with_parent, signal.SIGTERM),
        )
        current[:] = [process]
        code = process.wait()
        if not stopping.is_set():
            log.warning(
                "This node's ranks exited with code %s; starting them again to rejoin the group", code
            )
            stopping.wait(RESTART_DELAY_S)
    return 0
