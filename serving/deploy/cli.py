"""``lmi deploy --spec deploy.yaml``: create, update (``--dry-run`` to preview) or ``--delete`` an endpoint.

Imported by ``lmi`` itself on every start, so boto3, yaml and docker are imported inside ``run``. The
spec is parsed once (serving/deploy/spec.py) and handed to the target that ``_target`` picks: SageMaker
through boto3, or with ``--local`` the local container engine (serving/deploy/local.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "Deploy the model described by a deploy.yaml (kept in git next to serving.properties) to a SageMaker "
    "endpoint: models, endpoint config, endpoint, inference components. Re-running an unchanged spec "
    "creates nothing; a changed spec creates new versions, switches the endpoint to them and removes "
    "the old ones. Credentials, region and endpoint URL come from the usual AWS settings (AWS_PROFILE, "
    "AWS_REGION, AWS_ENDPOINT_URL ...); the spec's region wins. Exit codes: 0 done, 1 a SageMaker call "
    "or wait failed (the failure reason is printed), 2 the spec is invalid (every bad field is named). "
    "--local runs the same containers on this machine's Docker or podman instead, as SageMaker starts "
    "them: model data fetched from the spec's S3 here and mounted read-only at /opt/ml/model, the spec's "
    "environment, one container per inference component on consecutive ports."
)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535, or 0 for free ones), got {text}")
    return port


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``deploy``; ``args.run(args)`` dispatches to ``run``."""
    parser = subparsers.add_parser(
        "deploy", help="deploy a deploy.yaml spec to SageMaker (or --local)", description=DESCRIPTION
    )
    parser.add_argument("--spec", type=Path, required=True, help="the deploy.yaml to apply")
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--delete", action="store_true", help="delete the endpoint, its components and what lmi deploy made"
    )
    action.add_argument(
        "--dry-run", action="store_true", help="print the create requests as JSON; call nothing"
    )
    parser.add_argument("--wait-timeout", type=_positive, default=3600.0, help="seconds per wait (3600)")
    parser.add_argument(
        "--poll-interval", type=_positive, default=15.0, help="seconds between status checks (15)"
    )
    local = parser.add_argument_group("local run (--local)")
    local.add_argument(
        "--local", action="store_true", help="run the spec's containers on the local Docker or podman engine"
    )
    local.add_argument(
        "--port", type=_port, help="host port of the first container; the next ones count up (8080; 0: free)"
    )
    local.add_argument(
        "--detach", action="store_true", help="return once every /ping answers; leave the containers running"
    )
    parser.set_defaults(run=run)
    return parser


def say(message: str) -> None:
    print(f"deploy: {message}", flush=True)


def _error(message: str) -> None:
    print(f"deploy: error: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """0 deployed (or deleted); 1 a SageMaker call or wait failed; 2 the spec is invalid."""
    from serving.deploy.fields import SpecError
    from serving.deploy.spec import load_spec

    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        _error(str(exc))
        return 2
    for warning in spec.warnings:
        print(f"deploy: warning: {warning}", file=sys.stderr, flush=True)
    misuse = _local_misuse(args)
    if misuse:
        _error(misuse)
        return 2
    if args.dry_run:
        from dataclasses import asdict

        from serving.deploy.plan import plan

        print(json.dumps(asdict(plan(spec)), indent=2))
        return 0
    return _target(spec, args)


def _local_misuse(args: argparse.Namespace) -> str | None:
    """Why the --local flags do not fit together; None when they do."""
    if not args.local and (args.port is not None or args.detach):
        return "--port and --detach apply to --local runs only: add --local"
    if args.local and args.dry_run:
        return "--dry-run previews SageMaker requests; --local sends none: drop one of them"
    return None


def _target(spec: Any, args: argparse.Namespace) -> int:
    """Apply or delete on SageMaker, or with --local on the local container engine."""
    if args.local:
        return _local(spec, args)
    from botocore.exceptions import BotoCoreError

    from serving.deploy.apply import apply
    from serving.deploy.cleanup import delete
    from serving.deploy.sagemaker import DeployError, SageMaker

    try:
        sm = SageMaker(sagemaker_client(spec.region), say, args.wait_timeout, args.poll_interval)
        (delete if args.delete else apply)(spec, sm)
    except DeployError as exc:
        _error(str(exc))
        return 1
    except BotoCoreError as exc:  # no credentials or region, endpoint unreachable
        _error(f"{type(exc).__name__}: {exc}")
        return 1
    return 0


def _local(spec: Any, args: argparse.Namespace) -> int:
    """0 running (or deleted; in the foreground: stopped cleanly); 1 a fetch or container failed; 2 bad
    --port."""
    from botocore.exceptions import BotoCoreError

    from serving.artifacts import ArtifactError
    from serving.container.engine import ContainerError, connect
    from serving.deploy import local

    try:
        planned = local.plan(spec, 8080 if args.port is None else args.port)
    except ValueError as exc:
        _error(str(exc))
        return 2
    try:
        client = connect()
        if args.delete:
            local.delete(client, spec.endpoint, say)
            return 0
        planned = local.fetch_models(planned, args.wait_timeout, say)
        running = local.up(client, planned, args.wait_timeout, say)
    except (ArtifactError, ContainerError) as exc:
        _error(str(exc))
        return 1
    except BotoCoreError as exc:  # no credentials, an unknown profile
        _error(f"{type(exc).__name__}: {exc}")
        return 1
    if args.detach:
        return 0
    return local.follow(running, say)


def sagemaker_client(region: str | None, service: str = "sagemaker", read_timeout_s: float = 60.0) -> Any:
    """A boto3 client; AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_SAGEMAKER point it elsewhere (tests)."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(region_name=region)
    return session.client(service, config=Config(read_timeout=read_timeout_s))
