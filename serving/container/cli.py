"""`lmi container build|run|test|stop`."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from typing import Any

log = logging.getLogger("serving.container")

DEFAULT_TAG = "localhost/lmi-serving:cpu"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("container", help="build, run and smoke-test the serving image")
    sub = parser.add_subparsers(dest="container_command", required=True)
    build = sub.add_parser("build", help="build container/Containerfile.<flavor>")
    build.add_argument("--tag", default=DEFAULT_TAG)
    build.add_argument("--flavor", choices=("cpu", "cuda"), default="cpu")
    build.add_argument(
        "--base", help="base image; 'debootstrap' makes one from Debian's mirror (no registry)"
    )
    run = sub.add_parser("run", help="start an image as SageMaker does and wait for /ping")
    run.add_argument("--image", default=DEFAULT_TAG)
    run.add_argument("--model-dir", help="model folder or model.tar.gz, mounted read-only at /opt/ml/model")
    run.add_argument("--port", type=int, default=8080, help="host port on 127.0.0.1 (0: a free one)")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--name")
    run.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for /ping (600)")
    run.add_argument("--detach", action="store_true", help="return once /ping answers; leave it running")
    test = sub.add_parser("test", help="smoke-test a running container (every dialect, PID 1, SIGTERM drain)")
    test.add_argument("--url", help="its URL (default: the one `lmi container run` started)")
    test.add_argument("--name", help="the container, for the PID 1 and SIGTERM checks")
    test.add_argument("--custom", action="store_true", help="a custom model.py: ping and one invocation only")
    test.add_argument("--no-sigterm", action="store_true", help="leave it running (skip the drain check)")
    stop = sub.add_parser("stop", help="stop the containers `lmi container run` started (or --name)")
    stop.add_argument("--name")
    for each in (build, run, test, stop):
        each.add_argument("--log-level", default="info")
    parser.set_defaults(run=main)
    return parser


def main(args: argparse.Namespace) -> int:
    from serving.container.engine import ContainerError, connect

    try:
        if getattr(args, "base", None) == "debootstrap":  # first: it installs podman where it is missing
            from serving.container.build import make_base, source_root

            args.base = make_base(source_root())
        client = connect()
        return COMMANDS[args.container_command](client, args)
    except ContainerError as exc:
        log.error("%s", exc)
        return 1


def _build(client: Any, args: argparse.Namespace) -> int:
    from serving.container.build import build_image

    built = build_image(client, args.tag, args.flavor, args.base)
    print(f"{built.tag}: {built.size_bytes / 2**20:.0f} MiB, built in {built.seconds:.0f} s")
    return 0


def _run(client: Any, args: argparse.Namespace) -> int:
    from serving.container import run

    port = args.port or free_port()
    container = run.start(client, args.image, port, args.model_dir, run.environment(args.env), args.name)
    url = f"http://127.0.0.1:{port}"
    try:
        seconds = run.wait_ready(container, url, args.timeout)
    except run.ContainerError:
        run.stop(container, timeout_s=5)
        raise
    print(f"{container.name} ready at {url} ({seconds:.1f} s to /ping 200)", flush=True)
    if args.detach:
        return 0
    try:
        for chunk in container.logs(stream=True, follow=True):
            sys.stdout.write(chunk.decode(errors="replace"))
    except KeyboardInterrupt:
        pass
    return run.stop(container)


def _test(client: Any, args: argparse.Namespace) -> int:
    from serving.container import run
    from serving.container.smoke import run_checks

    container = client.containers.get(args.name) if args.name else None
    if container is None and not args.url:
        running = run.ours(client)
        if len(running) != 1:
            raise run.ContainerError(
                f"{len(running)} containers from `lmi container run`: give --url or --name."
            )
        container = running[0]
    url = args.url or run.published_url(container)
    results = run_checks(url, container, generation=not args.custom, sigterm=not args.no_sigterm)
    for check in results:
        print(f"{'ok ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    if container is not None and not args.no_sigterm:
        container.remove(force=True)
    return 0 if all(check.ok for check in results) else 1


def _stop(client: Any, args: argparse.Namespace) -> int:
    from serving.container import run

    targets = [client.containers.get(args.name)] if args.name else run.ours(client)
    for container in targets:
        code = run.stop(container)
        print(f"{container.name}: stopped (exit {code})")
    return 0


COMMANDS = {"build": _build, "run": _run, "test": _test, "stop": _stop}
