"""Kernels compiled ahead of time (the image build) load without a compiler and match the torch ops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from engines.kernels.prebuilt import LEVELS, best_level, load_prebuilt, prebuild

V3 = next(level for level in LEVELS if level.name == "x86-64-v3")


@pytest.fixture(scope="module")
def prebuilt_dir(tmp_path_factory):
    if os.uname().machine != "x86_64":
        pytest.skip("the prebuilt levels are x86-64 ones")
    out = tmp_path_factory.mktemp("prebuilt")
    prebuild(out, ("fused_ops",), (V3,))
    return out


def test_best_level_is_the_first_the_cpu_can_run():
    v3 = {"avx2", "fma", "bmi2", "f16c", "movbe"}
    bf16 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_bf16", "avx512_vnni"}
    both = ["avx512-bf16", "x86-64-v3"]
    assert best_level(v3 | bf16, both) == "avx512-bf16"
    assert best_level(v3 | bf16 - {"avx512_bf16"}, both) == "x86-64-v3"
    assert best_level(v3 | bf16 - {"avx512_vnni"}, both) == "x86-64-v3"  # the quantized matmul's vpdpbusd
    assert best_level(v3 | bf16, ["x86-64-v3"]) == "x86-64-v3"  # only what was built
    assert best_level({"sse2"}, both) is None


def test_a_prebuilt_kernel_loads_with_no_compiler_and_matches_torch(prebuilt_dir, tmp_path):
    script = textwrap.dedent(
        """
        import logging, sys, torch
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from engines.kernels.build import load_kernel
        from engines.kernels.ops import TorchOps
        x, w = torch.randn(5, 64), torch.randn(64)
        got = load_kernel("fused_ops").rms_norm(x, w, 1e-6, None)[0]
        torch.testing.assert_close(got, TorchOps.rms_norm(x, w, 1e-6))  # AVX2 sums in another order
        print("MATCH")
        """
    )
    env = {
        **os.environ,
        "LMI_KERNEL_PREBUILT": str(prebuilt_dir),
        "LMI_KERNEL_CACHE": str(tmp_path / "empty-cache"),  # a JIT build would land here
        "CXX": str(tmp_path / "no-such-compiler"),
        "PATH": "/nonexistent",  # no c++, no ninja
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MATCH" in result.stdout
    assert "Kernel fused_ops: prebuilt for x86-64-v3" in result.stdout
    assert not (tmp_path / "empty-cache").exists()


def test_a_manifest_for_another_torch_or_source_is_ignored(prebuilt_dir, tmp_path, caplog):
    manifest = json.loads((prebuilt_dir / "manifest.json").read_text())
    for change, reason in (({"torch": "0.0.1"}, "built for another torch"), ({}, "another source")):
        stale = tmp_path / reason.replace(" ", "-")
        stale.mkdir()
        edited = {**manifest, **change}
        if not change:
            edited["kernels"] = {"fused_ops": {**manifest["kernels"]["fused_ops"], "source_sha256": "0" * 64}}
        (stale / "manifest.json").write_text(json.dumps(edited))
        with caplog.at_level("WARNING", logger="engines.kernels"):
            assert load_prebuilt("fused_ops", str(stale)) is None
        assert reason in caplog.text
    assert load_prebuilt("fused_ops", str(prebuilt_dir), cpu={"sse2"}) is None  # below every level
    assert load_prebuilt("paged_attention", str(prebuilt_dir)) is None  # not in this manifest
