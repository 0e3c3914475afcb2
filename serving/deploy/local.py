"""``lmi deploy --spec F --local``: the spec's containers on the local engine, started as SageMaker does.

As the SageMaker SDK's local mode does, model data is fetched on this host (serving/deploy/model_data.py)
and mounted read-only at /opt/ml/model; each container gets ``serve`` and the spec's environment, nothing
from the caller's shell. Every container of the spec (the endpoint's model, or one per inference
component) runs once, on consecutive host ports from ``--port``; copies, instance types and resource
shares are SageMaker's business and are not simulated. Labels name the endpoint, the container and a
fingerprint of what it runs, so a re-run of an unchanged spec leaves it running, a changed one replaces
it, and ``--delete`` and ``lmi invoke --local`` find it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.container import run
from serving.container.engine import ContainerError
from serving.deploy.spec import Container, DeploySpec, Startup

if TYPE_CHECKING:
    from docker.models.containers import Container as EngineContainer

ENDPOINT_LABEL = "lmi-serving.deploy.endpoint"
NAME_LABEL = "lmi-serving.deploy.name"
FINGERPRINT_LABEL = "lmi-serving.deploy.fingerprint"
STOP_TIMEOUT_S = 30


@dataclass(frozen=True)
class LocalContainer:
    """One container of the spec as it runs here."""

    endpoint: str
    name: str
    """The spec's name for it: the endpoint, or ``<endpoint>-<component>``."""
    container: Container
    port: int
    """Requested host port on 127.0.0.1; 0 picks a free one."""
    startup: Startup
    model_dir: Path | None = None

    @property
    def container_name(self) -> str:
        return f"lmi-deploy-{self.name}"

    def labels(self, image_id: str | None) -> dict[str, str]:
        """Labels to find it by; the fingerprint changes with anything that would change what runs."""
        env = sorted(self.container.environment.items())
        what = [self.container.image, image_id, str(self.model_dir), env, self.port]
        fingerprint = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]
        return {ENDPOINT_LABEL: self.endpoint, NAME_LABEL: self.name, FINGERPRINT_LABEL: fingerprint}


@dataclass(frozen=True)
class Running:
    """A started (or kept) container and where it answers."""

    planned: LocalContainer
    container: EngineContainer
    url: str


def plan(spec: DeploySpec, port: int) -> list[LocalContainer]:
    """Every container of the spec, on ``port``, ``port + 1`` ... (or each on a free port when 0)."""
    containers = spec.containers()
    if port and port + len(containers) - 1 > 65535:
        raise ValueError(
            f"--port {port}: {len(containers)} containers need ports up to {port + len(containers) - 1}"
        )
    startups = {c.name: c.startup for c in spec.components}
    return [
        LocalContainer(
            spec.endpoint, name, container, port + i if port else 0, startups.get(name, spec.startup)
        )
        for i, (name, container) in enumerate(containers)
    ]


def fetch_models(
    planned: list[LocalContainer], timeout_s: float, say: Callable[[str], None]
) -> list[LocalContainer]:
    """Each container with its model data fetched to a local folder (a cached, unchanged one is reused)."""
    from serving.artifacts import ArtifactError, FetchOptions
    from serving.artifacts.cache import DOWNLOAD_DIR_ENV
    from serving.deploy.model_data import fetch_model_data

    fetched = []
    for each in planned:
        data = each.container.model_data
        if data is None:
            fetched.append(each)
            continue
        timeout = each.startup.model_data_download_timeout or timeout_s
        options = FetchOptions(download_dir=os.environ.get(DOWNLOAD_DIR_ENV), timeout_s=timeout)
        try:
            folder = fetch_model_data(data, options)
        except ArtifactError as exc:
            raise type(exc)(f"{each.name}: {exc}") from None
        say(f"{each.name}: model data {data.uri} in {folder}")
        fetched.append(replace(each, model_dir=folder))
    return fetched


def of_endpoint(client: Any, endpoint: str) -> list[EngineContainer]:
    """Containers ``--local`` started for ``endpoint``, running or not."""
    return client.containers.list(all=True, filters={"label": f"{ENDPOINT_LABEL}={endpoint}"})


def up(
    client: Any, planned: list[LocalContainer], timeout_s: float, say: Callable[[str], None]
) -> list[Running]:
    """Start what changed, keep what did not, stop what the spec no longer has; wait for every /ping."""
    existing = {c.labels.get(NAME_LABEL): c for c in of_endpoint(client, planned[0].endpoint)}
    for name in existing.keys() - {each.name for each in planned}:
        say(f"{name}: no longer in the spec; stopping it")
        run.stop(existing[name], STOP_TIMEOUT_S)
    running, started = [], []
    try:
        for each in planned:
            labels = each.labels(_image_id(client, each.container.image))
            old = existing.get(each.name)
            if _unchanged(old, labels[FINGERPRINT_LABEL]):
                running.append(Running(each, old, run.published_url(old)))
                say(f"{each.name}: unchanged, running at {running[-1].url}")
                continue
            if old is not None:
                say(f"{each.name}: changed; replacing {old.name}")
                run.stop(old, STOP_TIMEOUT_S)
            running.append(_start(client, each, labels))
            started.append(running[-1])
        for each in started:
            timeout = each.planned.startup.container_startup_health_check_timeout or timeout_s
            seconds = run.wait_ready(each.container, each.url, timeout)
            say(f"{each.planned.name}: ready at {each.url} ({seconds:.1f} s to /ping 200)")
    except BaseException:  # a failed start or Ctrl-C: nothing half-started is left behind
        for each in started:
            run.stop(each.container, timeout_s=5)
        raise
    return running


def _unchanged(old: EngineContainer | None, fingerprint: str) -> bool:
    return old is not None and old.status == "running" and old.labels.get(FINGERPRINT_LABEL) == fingerprint


def _start(client: Any, each: LocalContainer, labels: dict[str, str]) -> Running:
    from serving.container.cli import free_port

    port = each.port or free_port()
    model_dir = str(each.model_dir) if each.model_dir else None
    env = dict(each.container.environment)
    container = run.start(client, each.container.image, port, model_dir, env, each.container_name, labels)
    return Running(each, container, f"http://127.0.0.1:{port}")


def _image_id(client: Any, image: str) -> str | None:
    """None when missing: the start then fails with run.start's message on how to build it."""
    import docker

    try:
        return client.images.get(image).id
    except docker.errors.ImageNotFound:
        return None


def delete(client: Any, endpoint: str, say: Callable[[str], None]) -> int:
    """Stop (SIGTERM, then SIGKILL after 30 s) and remove every container of ``endpoint``; how many."""
    found = of_endpoint(client, endpoint)
    if not found:
        say(f"no local containers of {endpoint}: nothing to delete")
    for container in found:
        code = run.stop(container, STOP_TIMEOUT_S)
        say(f"{container.labels.get(NAME_LABEL)}: stopped and removed {container.name} (exit {code})")
    return len(found)


def local_url(client: Any, endpoint: str, name: str) -> str:
    """The URL of the running container ``name`` (the endpoint or a component's full name)."""
    for container in of_endpoint(client, endpoint):
        if container.labels.get(NAME_LABEL) == name and container.status == "running":
            return run.published_url(container)
    raise ContainerError(
        f"No local container of {name} is running: start it with `lmi deploy --spec <file> --local --detach`."
    )


def follow(running: list[Running], say: Callable[[str], None]) -> int:
    """Print the containers' logs until all exit or Ctrl-C, then stop them; the first non-zero exit code."""
    threads = [
        threading.Thread(target=_print_logs, args=(each, len(running) > 1), daemon=True) for each in running
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        pass
    # Stopped together: one at a time, each container's grace period would add up past what a
    # supervisor waiting on Ctrl-C allows. Each step is reported, so a slow engine shows where.
    say(f"stopping {len(running)} container(s) (up to {STOP_TIMEOUT_S} s each)")

    def stop(each: Running) -> int:
        started = time.monotonic()
        code = run.stop(each.container, STOP_TIMEOUT_S)
        say(f"{each.planned.name}: stopped (exit {code}) in {time.monotonic() - started:.1f} s")
        return code

    with ThreadPoolExecutor(max_workers=max(1, len(running))) as pool:
        codes = list(pool.map(stop, running))
    return next((code for code in codes if code), 0)


def _print_logs(each: Running, prefixed: bool) -> None:
    prefix = f"[{each.planned.name}] " if prefixed else ""
    for chunk in each.container.logs(stream=True, follow=True):
        sys.stdout.write(prefix + chunk.decode(errors="replace"))
        sys.stdout.flush()
