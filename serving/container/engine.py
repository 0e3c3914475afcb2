"""A Docker-API client: Docker or podman, from DOCKER_HOST, else podman's API service started here."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import docker
from docker.errors import DockerException

log = logging.getLogger("serving.container")

PODMAN_CONF = Path(__file__).resolve().parents[2] / "container" / "podman" / "containers.conf"
"""podman settings for machines without systemd or cgroup delegation (used unless CONTAINERS_CONF is set)."""
API_TIMEOUT_S = 900
"""Per API call: an image build streams for minutes."""


class ContainerError(RuntimeError):
    """A container operation failed; the message says what to do about it."""


def podman_socket() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"  # noqa: S108 - a per-user socket name below
    return Path(runtime) / f"lmi-podman-{os.getuid()}.sock"


def _answers(base_url: str | None) -> docker.DockerClient | None:
    try:
        client = (
            docker.DockerClient(base_url=base_url, timeout=API_TIMEOUT_S)
            if base_url
            else docker.from_env(timeout=API_TIMEOUT_S)
        )
        client.ping()
        return client
    except DockerException:
        return None


def start_podman_service(socket: Path, wait_s: float = 30.0) -> None:
    """podman's Docker-compatible API on ``socket``, in its own session so it outlives this command
    (a detached container is stopped later by another `lmi container` call)."""
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env and PODMAN_CONF.is_file():
        env["CONTAINERS_CONF"] = str(PODMAN_CONF)
    env.setdefault("BUILDAH_FORMAT", "docker")  # OCI image configs drop HEALTHCHECK; Docker's keep it
    socket.unlink(missing_ok=True)
    log_file = open(socket.with_suffix(".log"), "ab")  # noqa: SIM115 - handed to the child for its life
    STARTED[str(socket)] = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket}"],
        env=env,
        stdout=log_file,
        stderr=log_file,
        start_new_session=True,
    )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if socket.exists() and _answers(f"unix://{socket}"):
            return
        time.sleep(0.2)
    raise ContainerError(f"podman system service did not answer on {socket} within {wait_s:g} s; see "
                         f"{socket.with_suffix('.log')}")  # fmt: skip


STARTED: dict[str, subprocess.Popen] = {}
"""podman services this process started (socket -> process): tests stop theirs with stop_started()."""


def stop_started() -> None:
    """Stop the podman API services this process started (a CLI call leaves its own running on
    purpose: a detached container is managed by later calls)."""
    while STARTED:
        _, process = STARTED.popitem()
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def connect() -> docker.DockerClient:
    """The engine at DOCKER_HOST (or Docker's default socket); else podman's API service, started if
    it is not running, which is said in the log with the DOCKER_HOST that reaches it."""
    if os.environ.get("DOCKER_HOST"):
        client = _answers(None)
        if client is None:
            raise ContainerError(f"No Docker API answers at DOCKER_HOST={os.environ['DOCKER_HOST']}.")
        return client
    client = _answers(None)
    if client is not None:
        return client
    if shutil.which("podman") is None:
        raise ContainerError(
            "No container engine: Docker does not answer and podman is not installed. Install Docker, or "
            "podman (Debian: apt-get install podman runc), or set DOCKER_HOST."
        )
    socket = podman_socket()
    client = _answers(f"unix://{socket}") if socket.exists() else None
    if client is None:
        start_podman_service(socket)
        log.warning("Started podman's API service: DOCKER_HOST=unix://%s reaches it", socket)
        client = _answers(f"unix://{socket}")
    if client is None:
        raise ContainerError(f"podman's API service at {socket} stopped answering")
    return client
