"""Command-line entry points: ``lmi serve`` for people, ``serve`` for SageMaker-style containers."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from serving.config import SAGEMAKER_MODEL_DIR, load_config
from serving.errors import ConfigError
from serving.options import LOG_LEVEL_CHOICES

log = logging.getLogger("serving.cli")


def _setup_logging(level: str) -> None:
    if level.lower() not in LOG_LEVEL_CHOICES:
        allowed = ", ".join(LOG_LEVEL_CHOICES)
        print(f"Invalid log level {level!r} (--log-level or SERVING_LOG_LEVEL): use one of {allowed}.",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _serve(model_dir: str | None, host: str, port: int, node_rank: int | None = None) -> int:
    """Validate every key first: a bad value exits with code 2 before any process starts."""
    environ = dict(os.environ)
    if node_rank is not None:
        environ["OPTION_NODE_RANK"] = str(node_rank)
    try:
        config = load_config(model_dir, environ, host=host, port=port)
    except ConfigError as exc:
        log.error("Invalid configuration: %s", exc)
        return 2
    if config.settings["node_rank"] > 0:
        from serving.node import run_node

        return run_node(config)
    from serving.server import Server  # heavy-ish imports only when serving

    return Server(config).run()


COMMAND_MODULES = (
    "serving.bench.cli",
    "serving.container.cli",
    "serving.deploy.cli",
    "serving.deploy.invoke_cli",
    "serving.eval_cli",
    "serving.partition_cli",
    "serving.quantize_cli",
)
"""Modules adding one subcommand each: ``add_parser(subparsers)`` sets ``run`` (args -> exit code)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmi", description="lmi-serving: DJL/LMI-compatible model server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model folder (default: SmolLM2-135M-Instruct)")
    serve.add_argument("--model-dir", help="folder with serving.properties, model.py and/or weights")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--log-level", default=os.environ.get("SERVING_LOG_LEVEL", "info"))
    serve.add_argument(
        "--node-rank",
        type=int,
        help="this machine's index in a multi-node group (option.node_rank); nodes above 0 only compute",
    )
    pull = sub.add_parser("pull", help="download and verify a model ahead of time; prints its local folder")
    pull.add_argument("source", help="s3://bucket/prefix/, a Hub id (org/name), or a .tar.gz/.tar archive")
    pull.add_argument("--dest", help="fill exactly this folder (default: the download cache)")
    pull.add_argument("--download-dir", default=os.environ.get("SERVING_DOWNLOAD_DIR"), help="cache root")
    pull.add_argument("--revision", help="Hub revision")
    pull.add_argument("--allow-patterns", help="comma-separated patterns to fetch (overrides the default)")
    pull.add_argument("--ignore-patterns", help="comma-separated file patterns to skip")
    pull.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole download (3600)")
    pull.add_argument("--workers", type=int, default=32, help="parallel transfers (32)")
    pull.add_argument("--log-level", default=os.environ.get("SERVING_LOG_LEVEL", "info"))
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


def _pull(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from serving.artifacts import ArtifactError, FetchOptions, fetch, is_fetchable

    keys = {
        "download_dir": args.download_dir,
        "revision": args.revision,
        "allow_patterns": args.allow_patterns,
        "ignore_patterns": args.ignore_patterns,
        "download_timeout": str(args.timeout),
        "download_workers": str(args.workers),
    }
    try:
        options = replace(FetchOptions.from_properties({k: v for k, v in keys.items() if v}), dest=args.dest)
        if not is_fetchable(args.source):
            raise ArtifactError(f"{args.source!r} is a local folder or not a model source; nothing to pull.")
        path = fetch(args.source, options)
    except (ArtifactError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 1
    print(path)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "log_level", "info"))
    if args.command == "serve":
        sys.exit(_serve(args.model_dir, args.host, args.port, args.node_rank))
    if args.command == "pull":
        sys.exit(_pull(args))
    sys.exit(args.run(args))  # a COMMAND_MODULES subcommand


def sagemaker_serve() -> None:
    """The container entry: bind 0.0.0.0 on SAGEMAKER_BIND_TO_PORT (8080) and read /opt/ml/model."""
    _setup_logging(os.environ.get("SERVING_LOG_LEVEL", "info"))
    model_dir = os.environ.get("SM_MODEL_DIR", SAGEMAKER_MODEL_DIR)
    if not os.path.isdir(model_dir) or not os.listdir(model_dir):
        model_dir = None  # nothing mounted: HF_MODEL_ID / OPTION_MODEL_ID or the default model
    port_text = os.environ.get("SAGEMAKER_BIND_TO_PORT", "8080")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        log.error("Invalid SAGEMAKER_BIND_TO_PORT=%r: expected a TCP port number (1-65535).", port_text)
        sys.exit(2)
    sys.exit(_serve(model_dir, "0.0.0.0", int(port_text)))  # noqa: S104 - the container must listen externally


if __name__ == "__main__":
    main()
