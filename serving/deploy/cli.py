"""``lmi deploy --spec deploy.yaml``: create, update (``--dry-run`` to preview) or ``--delete`` an endpoint.

Imported by ``lmi`` itself on every start, so boto3 and yaml are imported inside ``run``. The spec is
parsed once (serving/deploy/spec.py) and handed to the target: SageMaker through boto3. A local
target (running ``spec.containers()`` on the local container engine) plugs in at ``_target``.
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
    "or wait failed (the failure reason is printed), 2 the spec is invalid (every bad field is named)."
)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``deploy``; ``args.run(args)`` dispatches to ``run``."""
    parser = subparsers.add_parser(
        "deploy", help="deploy a deploy.yaml spec to SageMaker", description=DESCRIPTION
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
    if args.dry_run:
        from dataclasses import asdict

        from serving.deploy.plan import plan

        print(json.dumps(asdict(plan(spec)), indent=2))
        return 0
    return _target(spec, args)


def _target(spec: Any, args: argparse.Namespace) -> int:
    """Apply or delete on SageMaker; the one place a local target would be chosen instead."""
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


def sagemaker_client(region: str | None, service: str = "sagemaker", read_timeout_s: float = 60.0) -> Any:
    """A boto3 client; AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_SAGEMAKER point it elsewhere (tests)."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(region_name=region)
    return session.client(service, config=Config(read_timeout=read_timeout_s))
