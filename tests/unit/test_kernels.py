"""The native CPU kernels against their plain-torch references (engines.kernels.ops.TorchOps and
decode_attention_reference), and the choice between them.

The kernels are compiled on first use (cached under LMI_KERNEL_CACHE or the user cache dir), so the
first run of this file pays the ~40 s build once for the whole suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import ROOT

from engines.kernels.decode_attention import decode_attention_reference, native_decode_attention
from engines.kernels.ops import NativeOps, TorchOps, select_ops

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kernel_reads_only_each_sequences_prefix(dtype):
    """Garbage past each kv_len (a freed slot's stale tokens) must not leak into the output; odd lengths
    exercise the bf16 path's unpaired last key and its partly empty 16-key groups."""
    lens = [1, 31, 33, 20]
    q, cache_k, cache_v, slots, lens_t = _case(dtype, 9, 3, 64, lens, [0, 1, 2, 3])
    before = native_decode_attention(q, cache_k, cache_v, slots, lens_t)
    for slot, length in enumerate(lens):
        cache_k[slot, :, length:] = 1e4
        cache_v[slot, :, length:] = float("nan")
    torch.testing.assert_close(
        native_decode_attention(q, cache_k, cache_v, slots, lens_t), before, rtol=0, atol=0
    )


def test_bf16_fast_path_is_compiled_where_the_cpu_has_it():
    """So these tests do run the AVX-512 BF16 code on a machine that has it (this project's CI does)."""
    from engines.kernels.build import load_kernel

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    has_bf16 = " avx512_bf16" in flags and " avx512bw" in flags
    assert load_kernel("decode_attention").bf16_fast_path() == has_bf16


def test_native_kernel_rejects_out_of_range_indices():
    q, cache_k, cache_v, slots, lens = _case(torch.float32, 4, 2, 64, [10, 20], [0, 1])
    with pytest.raises(RuntimeError, match="slot out of range"):
        native_decode_attention(q, cache_k, cache_v, torch.tensor([0, 8]), lens)
    with pytest.raises(RuntimeError, match="kv_len out of range"):
        native_decode_attention(q, cache_k, cache_v, slots, torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match="kv_len out of range"):
        native_decode_attention(q, cache_k, cache_v, slots, torch.tensor([1, 301]))


def test_kernel_selection():
    assert select_ops("torch", "cpu") is TorchOps
    assert select_ops("auto", "cpu", (9, 3, 64)) is NativeOps
    assert select_ops("auto", "cpu", (64, 2, 64)) is TorchOps  # group 32: beyond the kernels' buffers
    with pytest.raises(ValueError, match="cannot run this model: group 32"):
        select_ops("native", "cpu", (64, 2, 64))
    assert select_ops("auto", "cpu") is NativeOps
    assert select_ops("auto", "cuda") is TorchOps  # the CPU kernels never run on a GPU
    assert TorchOps.decode_attention is None  # the engine's batched SDPA
    with pytest.raises(ValueError, match="CPU only"):
        select_ops("native", "cuda")
    with pytest.raises(ValueError, match="not one of auto, native, torch"):
        select_ops("flash", "cpu")


def _close_to_reference(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-equal in float32 up to summation order; in bf16/fp16 at most one rounding step apart."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        return
    step = torch.finfo(actual.dtype).eps  # relative size of one rounding step
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2 * step, atol=1e-3)
    assert (actual == expected).float().mean() > 0.99  # nearly all elements round identically


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [576, 100])  # 100: the RMS sum's tail after 16-lane chunks
def test_fused_norms_match_torch(dtype, hidden):
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(37, 2 * hidden, generator=generator).to(dtype)
    x = wide[:, :hidden]  # strided rows, as a slice of a bigger activation
    residual = torch.randn(37, hidden, generator=generator).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=generator)).to(dtype)
    _close_to_reference(NativeOps.rms_norm(x, weight, 1e-5), TorchOps.rms_norm(x, weight, 1e-5))
    for native, reference in zip(
        NativeOps.add_rms_norm(x, residual, weight, 1e-5),
        TorchOps.add_rms_norm(x, residual, weight, 1e-5),
        strict=True,
    ):
        _close_to_reference(native, reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_rope_and_cache_write_match_torch(dtype):
    from engines.llama.rope import rope_tables
    from engines.llama.spec import LlamaSpec

    heads, kv_heads, head_dim, tokens = 9, 3, 64, 11
    spec = LlamaSpec(
        hidden_size=heads * head_dim, intermediate_size=8, num_layers=1, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=8, rms_norm_eps=1e-5, rope_theta=10000.0,
    )  # fmt: skip
    cos, sin = rope_tables(spec, 128, dtype, "cpu")
    generator = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 6, 100, 101, 7, 127])
    slots = torch.tensor([0, 0, 0, 0, 0, 0, 0, 3, 3, 1, 2])
    caches = {
        name: [torch.zeros(4, kv_heads, 128, head_dim, dtype=dtype) for _ in range(2)] for name in ("t", "n")
    }
    cos, sin = cos[positions], sin[positions]  # each token's rows, as the model gathers them once per step
    expected = TorchOps.rope_and_cache(qkv, cos, sin, positions, slots, heads, kv_heads, *caches["t"])
    actual = NativeOps.rope_and_cache(qkv, cos, sin, positions, slots, heads, kv_heads, *caches["n"])
    _close_to_reference(actual, expected.contiguous())
    _close_to_reference(caches["n"][0], caches["t"][0])
    torch.testing.assert_close(caches["n"][1], caches["t"][1], rtol=0, atol=0)  # v is copied as is
    with pytest.raises(RuntimeError, match="position out of range"):
        NativeOps.rope_and_cache(qkv, cos, sin, positions + 1, slots, heads, kv_heads, *caches["n"])
    with pytest.raises(RuntimeError, match="one row per token"):
        NativeOps.rope_and_cache(qkv, cos[:-1], sin[:-1], positions, slots, heads, kv_heads, *caches["n"])


@pytest.mark.parametrize("broken", ["compiler", "cache-folder"])
def test_without_a_build_auto_falls_back_and_native_fails(tmp_path, broken):
    """No working C++ compiler, or an unwritable kernel cache: the server still serves (plain torch);
    asking for native says why not."""
    script = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "from engines.kernels.ops import TorchOps, select_ops\n"
        "from engines.kernels.build import KernelBuildError\n"
        "assert select_ops('auto', 'cpu') is TorchOps\n"
        "try:\n"
        "    select_ops('native', 'cpu')\n"
        "except KernelBuildError as exc:\n"
        "    print('NATIVE FAILED:', exc)\n"
    )
    env = {**os.environ, "LMI_KERNEL_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}
    if broken == "cache-folder":
        (tmp_path / "file").write_text("not a folder")
        env = {**os.environ, "LMI_KERNEL_CACHE": str(tmp_path / "file" / "kernels")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "using the plain-torch ops instead" in result.stderr
    assert "NATIVE FAILED: Could not build the native kernel 'decode_attention'" in result.stdout
