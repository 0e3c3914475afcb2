"""The CPU image, built with podman from a debootstrap base and run as SageMaker runs it.

Builds container/Containerfile.cpu through `lmi container`'s code (the docker SDK against podman's API
service, started here when nothing answers), then runs it with the default model and with a custom
model.py, and smoke-tests each: every dialect, streaming, PID 1 = the server, SIGTERM drain.
Layers are cached by podman between runs, so only the first build on a machine is slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from support import free_port

from serving.container import run
from serving.container.build import build_image, make_base, source_root
from serving.container.engine import PODMAN_CONF, connect, stop_started
from serving.container.smoke import run_checks

pytestmark = pytest.mark.timeout(1500)
TAG = "localhost/lmi-serving:cpu-test"


@pytest.fixture(scope="module")
def client():
    make_base(source_root())  # installs podman, runc and debootstrap when missing
    yield connect()
    stop_started()


@pytest.fixture(scope="module")
def image(client):
    built = build_image(client, TAG, "cpu", base="localhost/lmi-base:bookworm")
    print(f"\nimage {built.tag}: {built.size_bytes / 2**20:.0f} MiB, built in {built.seconds:.0f} s")
    return built


def started(client, image, model_dir=None, env=None):
    port = free_port()
    container = run.start(client, image.tag, port, model_dir, env or {})
    url = f"http://127.0.0.1:{port}"
    try:
        seconds = run.wait_ready(container, url, timeout_s=300)
    except run.ContainerError:
        run.stop(container, timeout_s=5)
        raise
    return container, url, seconds


def healthcheck(client, tag: str) -> list[str] | None:
    """The image's HEALTHCHECK test. podman's Docker-compatible inspect leaves it out, so with podman
    it comes from `podman image inspect`."""
    found = client.images.get(tag).attrs["Config"].get("Healthcheck")
    if found or not shutil.which("podman"):
        return (found or {}).get("Test")
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(PODMAN_CONF))}
    out = subprocess.run(["podman", "image", "inspect", tag, "--format", "{{json .Config.Healthcheck}}"],
                         capture_output=True, text=True, env=env, check=True).stdout  # fmt: skip
    return (json.loads(out) or {}).get("Test")


def test_image_carries_the_sagemaker_contract(client, image):
    attrs = client.images.get(image.tag).attrs
    config = attrs["Config"]
    assert config["Entrypoint"] == ["serve"]  # exec form: no shell between SIGTERM and the server
    assert "8080/tcp" in config["ExposedPorts"]
    labels = config["Labels"]
    assert labels["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"
    assert labels["com.amazonaws.sagemaker.capabilities.multi-models"] == "true"
    assert healthcheck(client, image.tag), "no HEALTHCHECK"
    probe = "for tool in g++ gcc cc c++; do command -v $tool; done; echo checked"
    out = client.containers.run(image.tag, entrypoint=["sh", "-c", probe], remove=True)
    assert out.strip() == b"checked"  # no compiler: the toolchain stayed in the build stage


def test_default_model_serves_every_dialect(client, image):
    container, url, seconds = started(client, image)
    print(f"\ncontainer start to /ping 200: {seconds:.1f} s")
    try:
        logs = run.tail_logs(container, 400)
        results = run_checks(url, container, generation=True, sigterm=False)
        failed = [f"{c.name}: {c.detail}" for c in results if not c.ok]
        assert not failed, "\n".join(failed) + "\n" + logs
        assert "prebuilt for" in logs  # the image's kernels, not a compile at start (there is no compiler)
    finally:
        container.remove(force=True)


def test_sigterm_drains_a_stream_in_flight(client, image):
    """The stream finishes with its final event and the container exits 0 within 30 s of SIGTERM."""
    container, url, _ = started(client, image)
    try:
        results = run_checks(url, container, generation=False, sigterm=True)
        failed = [f"{c.name}: {c.detail}" for c in results if not c.ok]
        assert not failed, "\n".join(failed)
    finally:
        container.remove(force=True)


def test_custom_model_py_with_a_mounted_model_dir(client, image, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "serving.properties").write_text("engine=Python\n")
    (model / "model.py").write_text(
        textwrap.dedent(
            """
            from djl_python import Input, Output

            def handle(inputs: Input):
                if inputs.is_empty():
                    return None
                text = inputs.get_as_json()["inputs"]
                return Output().add_as_json({"shout": text.upper()})
            """
        )
    )
    container, url, _ = started(client, image, model_dir=str(model))
    try:
        results = run_checks(url, container, generation=False, sigterm=False)
        assert all(c.ok for c in results), [(c.name, c.detail) for c in results]
        import requests

        assert requests.post(f"{url}/invocations", json={"inputs": "quiet"}, timeout=30).json() == {
            "shout": "QUIET"
        }
    finally:
        assert run.stop(container) == 0  # SIGTERM: a clean exit


def test_run_names_a_missing_image_and_how_to_build_it(client):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving",
            "container",
            "run",
            "--image",
            "localhost/no-such-image:1",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "lmi container build --tag localhost/no-such-image:1" in result.stderr
