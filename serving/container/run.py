"""Start an image the way SageMaker does: `serve`, port 8080 published, the model read-only at
/opt/ml/model, the environment from --env and the caller's OPTION_*; then wait for /ping."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import time
from pathlib import Path

import docker
import requests
from docker.models.containers import Container

from serving.artifacts.archive import extract_archive
from serving.artifacts.errors import ArtifactError
from serving.container.engine import ContainerError

log = logging.getLogger("serving.container")

LABEL = "lmi-serving.container"
"""Containers started by `lmi container run` carry it; `stop` and `test` find them by it."""
PASSED_PREFIXES = ("OPTION_", "SERVING_", "HF_MODEL_ID", "TENSOR_PARALLEL_DEGREE")


def model_folder(source: str) -> Path:
    """A model folder to mount: the folder itself, or a model.tar.gz unpacked once into the cache."""
    path = Path(source).expanduser().resolve()
    if path.is_dir():
        return path
    if not path.is_file() or not tarfile.is_tarfile(path):
        raise ContainerError(f"--model-dir {source}: neither a folder nor a .tar.gz archive.")
    digest = hashlib.sha256(f"{path}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    target = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmi-serving" / "model-tars" / digest
    )
    if not target.is_dir():
        partial = target.with_name(target.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        try:
            extract_archive(path, partial)  # the artifact module's safe extraction, as for S3 tarballs
        except ArtifactError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise ContainerError(f"--model-dir {source}: {exc}") from None
        partial.rename(target)
    return target


def environment(pairs: list[str]) -> dict[str, str]:
    """The caller's OPTION_*/SERVING_*/HF_MODEL_ID, then each --env KEY=VALUE."""
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_PREFIXES)}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ContainerError(f"--env {pair!r}: expected KEY=VALUE.")
        env[key] = value
    return env


def start(
    client: docker.DockerClient,
    image: str,
    port: int,
    model_dir: str | None = None,
    env: dict[str, str] | None = None,
    name: str | None = None,
    labels: dict[str, str] | None = None,
) -> Container:
    """Started detached with LABEL (plus ``labels``, by which a caller finds its own containers later)."""
    volumes = {}
    if model_dir:
        volumes[str(model_folder(model_dir))] = {"bind": "/opt/ml/model", "mode": "ro"}
    try:
        return client.containers.run(
            image,
            command=["serve"],  # what SageMaker passes
            detach=True,
            ports={"8080/tcp": ("127.0.0.1", port)},
            volumes=volumes,
            environment=env or {},
            name=name,
            labels={LABEL: "1", **(labels or {})},
        )
    except docker.errors.ImageNotFound:
        raise ContainerError(
            f"No image {image!r}: build it with `lmi container build --tag {image}`."
        ) from None
    except docker.errors.APIError as exc:
        raise ContainerError(f"Could not start {image}: {exc.explanation or exc}") from None


def wait_ready(container: Container, url: str, timeout_s: float) -> float:
    """Seconds until /ping answered 200; raises with the container's last log lines if it exits first
    or the timeout passes."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        container.reload()
        if container.status in ("exited", "dead"):
            raise ContainerError(f"The container exited during start-up:\n{tail_logs(container)}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise ContainerError(f"/ping did not answer 200 within {timeout_s:g} s:\n{tail_logs(container)}")


def tail_logs(container: Container, lines: int = 60) -> str:
    try:
        return container.logs(tail=lines).decode(errors="replace")
    except docker.errors.APIError as exc:
        return f"(no logs: {exc})"


def published_url(container: Container) -> str:
    container.reload()
    binding = container.ports.get("8080/tcp") or []
    if not binding:
        raise ContainerError(f"Container {container.name} publishes no port 8080.")
    return f"http://127.0.0.1:{binding[0]['HostPort']}"


def ours(client: docker.DockerClient) -> list[Container]:
    return client.containers.list(filters={"label": LABEL})


def stop(container: Container, timeout_s: int = 30) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; removes the container; returns its exit code."""
    container.stop(timeout=timeout_s)
    code = container.wait(timeout=timeout_s + 10).get("StatusCode", -1)
    container.remove(force=True)
    return code
