"""The native decode-attention kernel against its plain-torch reference, and backend selection.

The kernel is compiled on first use (cached under LMI_KERNEL_CACHE or the user cache dir), so the first
run of this file pays the ~20 s build once for the whole suite.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from support import ROOT

from engines.kernels.decode_attention import (
    decode_attention_reference,
    native_decode_attention,
    select_decode_attention,
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _case(dtype, heads, kv_heads, head_dim, kv_lens, slots, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cache_k = torch.randn(8, kv_heads, 300, head_dim, generator=generator).to(dtype)
    cache_v = torch.randn(8, kv_heads, 300, head_dim, generator=generator).to(dtype)
    # q as a strided view (the engine passes a slice of its fused q/k projection)
    fused = torch.randn(len(slots), heads + kv_heads, head_dim, generator=generator).to(dtype)
    q = fused[:, :heads]
    return q, cache_k, cache_v, torch.tensor(slots), torch.tensor(kv_lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(9, 3, 64), (8, 2, 128), (6, 1, 80), (4, 4, 32)],  # SmolLM2, Llama-style, generic head_dim, MHA
)
def test_native_kernel_matches_reference(dtype, heads, kv_heads, head_dim):
    # lengths straddle the kernel's 32-key blocks; slots out of order with gaps
    lens, slots = [1, 31, 32, 33, 100, 297], [5, 0, 7, 2, 3, 6]
    q, cache_k, cache_v, slots_t, lens_t = _case(dtype, heads, kv_heads, head_dim, lens, slots)
    expected = decode_attention_reference(q, cache_k, cache_v, slots_t, lens_t).float()
    actual = native_decode_attention(q, cache_k, cache_v, slots_t, lens_t)
    assert actual.shape == (len(slots), heads, head_dim)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected, atol=TOLERANCE[dtype], rtol=0)


def test_native_kernel_reads_only_each_sequences_prefix():
    """Garbage past kv_len (a freed slot's stale tokens) must not leak into the output."""
    q, cache_k, cache_v, slots, lens = _case(torch.float32, 4, 2, 64, [10, 20], [0, 1])
    before = native_decode_attention(q, cache_k, cache_v, slots, lens)
    cache_k[:, :, 20:] = 1e4
    cache_v[:, :, 20:] = float("nan")
    torch.testing.assert_close(native_decode_attention(q, cache_k, cache_v, slots, lens), before)


def test_native_kernel_rejects_out_of_range_indices():
    q, cache_k, cache_v, slots, lens = _case(torch.float32, 4, 2, 64, [10, 20], [0, 1])
    with pytest.raises(RuntimeError, match="slot out of range"):
        native_decode_attention(q, cache_k, cache_v, torch.tensor([0, 8]), lens)
    with pytest.raises(RuntimeError, match="kv_len out of range"):
        native_decode_attention(q, cache_k, cache_v, slots, torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match="kv_len out of range"):
        native_decode_attention(q, cache_k, cache_v, slots, torch.tensor([1, 301]))


def test_backend_selection():
    assert select_decode_attention("sdpa", "cpu") is None
    assert select_decode_attention("auto", "cpu") is native_decode_attention
    assert select_decode_attention("auto", "cuda") is None  # the CPU kernel never runs on a GPU
    with pytest.raises(ValueError, match="CPU only"):
        select_decode_attention("native", "cuda")
    with pytest.raises(ValueError, match="not one of auto, native, sdpa"):
        select_decode_attention("flash", "cpu")


def test_without_a_compiler_auto_falls_back_and_native_fails(tmp_path):
    """A machine without a working C++ compiler still serves (SDPA); asking for native says why not."""
    script = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "from engines.kernels.decode_attention import select_decode_attention\n"
        "from engines.kernels.build import KernelBuildError\n"
        "assert select_decode_attention('auto', 'cpu') is None\n"
        "try:\n"
        "    select_decode_attention('native', 'cpu')\n"
        "except KernelBuildError as exc:\n"
        "    print('NATIVE FAILED:', exc)\n"
    )
    env = {**os.environ, "LMI_KERNEL_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "falls back to SDPA" in result.stderr
    assert "NATIVE FAILED: Could not build the native kernel 'decode_attention'" in result.stdout
