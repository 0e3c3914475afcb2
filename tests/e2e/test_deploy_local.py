"""``lmi deploy --spec F --local`` end to end: the CPU image, a tiny Llama in SeaweedFS, real containers.

The model is uploaded as a model.tar.gz (at the bucket's root, next to other objects) and as an
uncompressed prefix; `lmi deploy --local` fetches it on the host, mounts it read-only at /opt/ml/model
and starts the image with `serve`; `lmi invoke --spec F --local` reaches it; `--delete` (or Ctrl-C in the
foreground) removes what it started. Every container of the test endpoints is removed at the end,
whatever happened.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from support import ROOT, free_port, tiny_model_script

from scripts.seaweedfs import SeaweedS3
from serving.container.build import build_image, make_base, source_root
from serving.container.engine import connect, stop_started
from serving.deploy.local import of_endpoint

pytestmark = pytest.mark.timeout(1800)
TAG = "localhost/lmi-serving:cpu-test"  # shared with test_container_image.py: one image, one build
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
TINY = {"OPTION_DTYPE": "fp32", "OPTION_MAX_MODEL_LEN": "128", "OPTION_MAX_ROLLING_BATCH_SIZE": "2"}
ENDPOINTS = ("local-archive", "local-components", "local-missing")


@pytest.fixture(scope="module")
def client():
    make_base(source_root())  # installs podman, runc and debootstrap when missing
    engine = connect()
    yield engine
    for endpoint in ENDPOINTS:
        for container in of_endpoint(engine, endpoint):
            container.remove(force=True)
    stop_started()


@pytest.fixture(scope="module")
def image(client):
    built = build_image(client, TAG, "cpu", base="localhost/lmi-base:bookworm")
    print(f"\nimage {built.tag}: {built.size_bytes / 2**20:.0f} MiB, built in {built.seconds:.0f} s")
    return built.tag


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture(scope="module")
def uploaded(s3, tmp_path_factory) -> Path:
    """s3://models/tiny/ (the folder as is) and s3://models/model.tar.gz (its files at the archive's root)."""
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_model_script().make_tiny_model("llama", folder / "model", seed=0)
    archive = folder / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(model.iterdir()):
            tar.add(path, arcname=path.name)
    s3.upload_folder(model, "models", "tiny")
    s3.client().upload_file(str(archive), "models", "model.tar.gz")
    return model


@pytest.fixture(scope="module")
def cli_env(s3, tmp_path_factory) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "SERVING_", "AWS_", "HF_"))}
    download = tmp_path_factory.mktemp("download")
    return {**clean, **s3.env(), "SERVING_DOWNLOAD_DIR": str(download), "PYTHONPATH": str(ROOT)}


def write_spec(folder: Path, endpoint: str, **fields: object) -> Path:
    path = folder / f"{endpoint}.yaml"
    spec = {"endpoint": endpoint, "role": ROLE, "instance_type": "ml.c6i.xlarge", **fields}
    path.write_text(yaml.safe_dump(spec))
    return path


def lmi(env: dict[str, str], *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "serving", *argv]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def invoke(env: dict[str, str], spec: Path, *extra: str) -> str:
    """The generated text of `lmi invoke --spec F --local`."""
    result = lmi(env, "invoke", "--spec", str(spec), "--local", *extra, "--max-new-tokens", "6", "Paris is")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["generated_text"]


def test_an_archive_spec_runs_detached_is_invoked_kept_on_rerun_and_deleted(
    client, image, uploaded, cli_env, tmp_path
):
    spec = write_spec(
        tmp_path, "local-archive", image=image, model_data="s3://models/model.tar.gz", environment=TINY
    )
    port = free_port()
    deploy = ["deploy", "--spec", str(spec), "--local"]
    result = lmi(cli_env, *deploy, "--detach", "--port", str(port))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"local-archive: ready at http://127.0.0.1:{port}" in result.stdout

    (container,) = of_endpoint(client, "local-archive")
    (mount,) = [m for m in container.attrs["Mounts"] if m["Destination"] == "/opt/ml/model"]
    assert mount["RW"] is False
    assert (Path(mount["Source"]) / "model.safetensors").read_bytes() == (
        uploaded / "model.safetensors"
    ).read_bytes()
    assert container.attrs["Config"]["Cmd"] == ["serve"]
    assert {"OPTION_DTYPE=fp32", "OPTION_MAX_MODEL_LEN=128"} <= set(container.attrs["Config"]["Env"])
    assert invoke(cli_env, spec)

    again = lmi(cli_env, *deploy, "--detach", "--port", str(port))
    assert again.returncode == 0, again.stderr
    assert "local-archive: unchanged, running at" in again.stdout
    assert [c.id for c in of_endpoint(client, "local-archive")] == [container.id]

    deleted = lmi(cli_env, *deploy, "--delete")
    assert deleted.returncode == 0, deleted.stderr
    assert "local-archive: stopped and removed lmi-deploy-local-archive (exit 0)" in deleted.stdout
    assert of_endpoint(client, "local-archive") == []
    gone = lmi(cli_env, "invoke", "--spec", str(spec), "--local", "hi")
    assert gone.returncode == 1
    assert "No local container of local-archive is running" in gone.stderr


class Lines:
    """A process's stdout, collected by a thread so waits can be bounded."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(process.stdout), daemon=True).start()

    def wait_for(self, pattern: str, count: int, process: subprocess.Popen, timeout_s: float) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and process.poll() is None:
            found = [m for line in list(self.lines) for m in re.findall(pattern, line)]
            if len(found) >= count:
                return found
            time.sleep(0.5)
        raise AssertionError(
            f"no {count} x {pattern!r} (exit {process.poll()}):\n{''.join(self.lines)[-4000:]}"
        )


def test_components_from_a_prefix_and_an_archive_run_in_the_foreground_until_ctrl_c(
    client, image, uploaded, cli_env, tmp_path
):
    components = [
        {"name": "prefix", "memory_mb": 1024, "model_data": "s3://models/tiny/"},
        {"name": "archive", "memory_mb": 1024, "model_data": "s3://models/model.tar.gz"},
    ]
    spec = write_spec(tmp_path, "local-components", image=image, environment=TINY, components=components)
    command = [sys.executable, "-m", "serving", "deploy", "--spec", str(spec), "--local", "--port", "0"]
    # Ctrl-C as at a terminal: a suite started in the background (`cmd &` in a script) runs with SIGINT
    # ignored, which children inherit and Python then leaves ignored, so the CLI would never see it.
    process = subprocess.Popen(
        command,
        env=cli_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        output = Lines(process)
        urls = output.wait_for(r"ready at (http://\S+)", 2, process, timeout_s=600)
        assert len(set(urls)) == 2
        names = sorted(c.name for c in of_endpoint(client, "local-components"))
        assert names == ["lmi-deploy-local-components-archive", "lmi-deploy-local-components-prefix"]
        # same weights, greedy decoding: both components answer alike
        assert invoke(cli_env, spec, "--component", "prefix") == invoke(
            cli_env, spec, "--component", "archive"
        )
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=90)
        except subprocess.TimeoutExpired:  # say which stop step hangs (they are reported as they go)
            raise AssertionError("no exit 90 s after Ctrl-C:\n" + "".join(output.lines)[-3000:]) from None
        assert code == 0, "".join(output.lines)[-3000:]
        assert "".join(output.lines).count(": stopped (exit 0) in ") == 2  # each component, reported
        assert of_endpoint(client, "local-components") == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_missing_model_data_names_the_object_and_starts_nothing(client, uploaded, cli_env, tmp_path):
    spec = write_spec(tmp_path, "local-missing", image=TAG, model_data="s3://models/missing/model.tar.gz")
    result = lmi(cli_env, "deploy", "--spec", str(spec), "--local", "--detach", "--port", "0", timeout=120)
    assert result.returncode == 1
    assert (
        "local-missing: model_data s3://models/missing/model.tar.gz: no such object. Check the bucket and "
        "key in the spec." in result.stderr
    )
    assert of_endpoint(client, "local-missing") == []
