"""``lmi invoke``: one request to ``--url``, ``--endpoint`` or the endpoint of ``--spec deploy.yaml``
(on SageMaker, or with ``--local`` the container ``lmi deploy --spec F --local`` started).

Imported by ``lmi`` on every start, so boto3, yaml and docker are imported inside ``run``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

DESCRIPTION = (
    "Send one request and print the answer; with --stream print tokens as they arrive. Targets: a "
    "server's URL (e.g. http://127.0.0.1:8080, POSTs to /invocations unless the URL has a path), a "
    "SageMaker endpoint (invoke_endpoint / invoke_endpoint_with_response_stream), or the endpoint a "
    "deploy.yaml describes (--component picks one of its inference components; --local: the container "
    "`lmi deploy --spec F --local` runs for it). The body is --body "
    '(JSON text, or @file) or LMI\'s {"inputs": PROMPT, "parameters": {"max_new_tokens": N}}.'
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``invoke``; ``args.run(args)`` dispatches to ``run``."""
    parser = subparsers.add_parser(
        "invoke", help="send one request to a server or endpoint", description=DESCRIPTION
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8080")
    target.add_argument("--endpoint", help="a SageMaker endpoint name")
    target.add_argument("--spec", help="a deploy.yaml: its endpoint and region")
    parser.add_argument("--component", help="inference component (its name in the spec, or the full name)")
    parser.add_argument(
        "--local", action="store_true", help="with --spec: the local container `lmi deploy --local` started"
    )
    parser.add_argument("--region", help="AWS region for --endpoint (default: the AWS settings)")
    body = parser.add_mutually_exclusive_group(required=True)
    body.add_argument("prompt", nargs="?", help="the prompt text")
    body.add_argument("--body", help="the request body as is (JSON text, or @file)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="with a prompt (64)")
    parser.add_argument(
        "--stream", action="store_true", help="stream the answer, printing tokens as they arrive"
    )
    parser.add_argument("--content-type", default="application/json", help="(application/json)")
    parser.add_argument("--accept", help="Accept header (default: none)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for an answer or the next streamed piece (120)",
    )
    parser.set_defaults(run=run)
    return parser


def _error(message: str) -> None:
    print(f"invoke: error: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """0 answered; 1 the request failed or the stream ended in an error; 2 bad arguments or spec."""
    from serving.deploy.fields import SpecError
    from serving.deploy.invoke import InvokeError, request_body

    try:
        body = request_body(args.prompt, args.body, args.max_new_tokens, args.stream)
        target = _target(args)
    except (SpecError, ValueError, OSError) as exc:
        _error(str(exc))
        return 2
    except InvokeError as exc:  # --local: nothing runs for the spec
        _error(str(exc))
        return 1
    try:
        _send(args, target, body, sys.stdout)
    except InvokeError as exc:
        _error(str(exc))
        return 1
    return 0


def _target(args: argparse.Namespace) -> tuple[str, str | None, str | None]:
    """(URL or endpoint name, inference component, region)."""
    if args.local and not args.spec:
        raise ValueError("--local needs --spec: the deploy.yaml that `lmi deploy --local` ran")
    if args.url:
        if args.component:
            raise ValueError("--component needs --endpoint or --spec")
        url = args.url.rstrip("/")
        has_path = "/" in url.split("://", 1)[-1]
        return (url if has_path else url + "/invocations"), None, None
    if args.endpoint:
        return args.endpoint, args.component, args.region
    from serving.deploy.spec import load_spec

    spec = load_spec(args.spec)
    component = _component(spec, args.component)
    if args.local:
        return _local_url(spec.endpoint, component or spec.endpoint) + "/invocations", None, None
    return spec.endpoint, component, args.region or spec.region


def _local_url(endpoint: str, name: str) -> str:
    from serving.container.engine import ContainerError, connect
    from serving.deploy.invoke import InvokeError
    from serving.deploy.local import local_url

    try:
        return local_url(connect(), endpoint, name)
    except ContainerError as exc:
        raise InvokeError(str(exc)) from None


def _component(spec: Any, wanted: str | None) -> str | None:
    names = {c.name.removeprefix(spec.endpoint + "-"): c.name for c in spec.components}
    if not names:
        if wanted:
            raise ValueError(f"--component {wanted}: {spec.endpoint} has no inference components in the spec")
        return None
    if wanted is None and len(names) == 1:
        return next(iter(names.values()))
    if wanted in names or wanted in names.values():
        return names.get(wanted, wanted)
    choices = ", ".join(sorted(names))
    raise ValueError(f"--component: choose one of the spec's inference components: {choices}")


def _send(
    args: argparse.Namespace, target: tuple[str, str | None, str | None], body: bytes, out: Any
) -> None:
    from serving.deploy.invoke import endpoint_params, invoke_endpoint, invoke_url

    name, component, region = target
    if args.url or args.local:
        invoke_url(name, body, args.content_type, args.accept, args.timeout, out)
        return
    params = endpoint_params(name, component, body, args.content_type, args.accept)
    invoke_endpoint(region, params, args.stream, args.timeout, out)
