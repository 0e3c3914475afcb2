"""The native CPU kernels against their plain-torch references (engines.kernels.ops.TorchOps and
engines.kernels.paged.paged_attention_reference), and the choice between them.

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
from support import ROOT, paged_attention_case

from engines.kernels.build import load_kernel
from engines.kernels.native_attention import native_paged_attention
from engines.kernels.ops import NativeOps, TorchOps, select_ops
from engines.kernels.paged import PagedAttentionMeta, paged_attention_reference

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
"""Against the float32 reference: summation order in float32, one output rounding (and, on the bf16
fast path, probabilities rounded to bf16) otherwise."""
SHAPES = [(9, 3, 64, 16), (8, 2, 128, 32), (4, 4, 64, 64), (8, 1, 128, 16), (6, 1, 80, 32), (4, 4, 32, 16)]
"""(heads, kv_heads, head_dim, block_size): SmolLM2's GQA, Llama-style GQA, MHA, group 8, and the generic
(not compile-time) head_dim path."""


def _lens(block_size: int) -> tuple[list[int], list[int]]:
    """(context_lens, query_lens): decodes and chunks ending on a block boundary, one past it, within
    the first block, and a chunk that crosses a boundary after a cached prefix."""
    contexts = [1, block_size, block_size + 1, 2 * block_size, 2 * block_size + 1, 3 * block_size - 5, 297]
    return contexts, [1, 1, 2, 5, 1, 7, 33]


def _reference(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, meta: PagedAttentionMeta
) -> torch.Tensor:
    """The float32 reference on the same (rounded) inputs."""
    return paged_attention_reference(q.float(), cache_k.float(), cache_v.float(), meta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "h{}-kv{}-d{}-b{}".format(*s))
def test_native_kernel_matches_reference(dtype: torch.dtype, shape: tuple[int, int, int, int]) -> None:
    """Every row no sequence owns is NaN: a kernel that reads past a context (or across sequences, or a
    chunk's later positions) poisons its output."""
    contexts, queries = _lens(shape[3])
    q, cache_k, cache_v, meta = paged_attention_case(dtype, shape, contexts, queries)
    actual = native_paged_attention(q, cache_k, cache_v, meta)
    assert actual.shape == (sum(queries), shape[0], shape[2])
    assert actual.dtype == dtype
    expected = _reference(q, cache_k, cache_v, meta)
    torch.testing.assert_close(actual.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_kernel_reads_only_each_sequences_rows(dtype: torch.dtype) -> None:
    """A freed block's stale rows (huge keys, NaN values) next to or inside a sequence's blocks leave its
    output bit for bit the same; odd lengths exercise the bf16 path's unpaired last key."""
    shape, contexts, queries = (9, 3, 64, 16), [1, 31, 33, 20, 16], [1, 1, 3, 20, 1]
    q, cache_k, cache_v, meta = paged_attention_case(dtype, shape, contexts, queries, fill=0.0)
    unowned = (cache_k == 0).all(-1, keepdim=True)  # random rows are never all zero
    clean = native_paged_attention(q, cache_k, cache_v, meta)
    for stale in (1e4, float("nan")):
        stale_k, stale_v = cache_k.masked_fill(unowned, 1e4), cache_v.masked_fill(unowned, stale)
        torch.testing.assert_close(native_paged_attention(q, stale_k, stale_v, meta), clean, rtol=0, atol=0)


def test_bf16_fast_path_is_compiled_where_the_cpu_has_it() -> None:
    """So these tests do run the AVX-512 BF16 code on a machine that has it (this project's CI does)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    has_bf16 = " avx512_bf16" in flags and " avx512bw" in flags
    assert load_kernel("paged_attention").bf16_fast_path() == has_bf16


def test_native_kernel_validates_its_inputs() -> None:
    kernel = load_kernel("paged_attention").paged_attention
    q, cache_k, cache_v, meta = paged_attention_case(torch.float32, (4, 2, 64, 16), [10, 20], [1, 1])
    tables, token_seq, kv_lens = meta.block_tables, meta.token_seq, meta.token_kv_lens
    num_blocks, scale = cache_k.shape[0], 64**-0.5

    def call(**changed: torch.Tensor) -> torch.Tensor:
        args = {"cache_k": cache_k, "cache_v": cache_v, "tables": tables, "seq": token_seq, "lens": kv_lens}
        args.update(changed)
        return kernel(q, args["cache_k"], args["cache_v"], args["tables"], args["seq"], args["lens"], scale)

    padded = torch.cat([tables, torch.full((2, 1), -1, dtype=torch.int32)], 1)
    torch.testing.assert_close(call(tables=padded), call())  # entries past a context are never read
    for bad in (num_blocks, -1):
        wrong = tables.clone()
        wrong[1, 1] = bad
        with pytest.raises(RuntimeError, match="block id out of range"):
            call(tables=wrong)
    with pytest.raises(RuntimeError, match="kv_len out of range"):
        call(lens=torch.tensor([0, 20]))
    with pytest.raises(RuntimeError, match="kv_len out of range"):
        call(lens=torch.tensor([10, 2 * 16 + 1]))  # past the two blocks in the table
    with pytest.raises(RuntimeError, match="token_seq out of range"):
        call(seq=torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match=r"block_tables: \[S, N\] int32"):
        call(tables=tables.long())
    with pytest.raises(RuntimeError, match="int64 indices"):
        call(lens=kv_lens.int())
    odd_k = torch.zeros(num_blocks, 2, 12, 64)
    with pytest.raises(RuntimeError, match="block_size must be a power of two"):
        call(cache_k=odd_k, cache_v=odd_k.clone())


def test_kernel_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # test_triton_kernels.py sets it for itself
    assert select_ops("torch", "cpu") is TorchOps
    assert select_ops("auto", "cpu", (9, 3, 64)) is NativeOps
    assert select_ops("auto", "cpu", (64, 2, 64)) is TorchOps  # group 32: beyond the kernels' buffers
    with pytest.raises(ValueError, match="cannot run this model: group 32"):
        select_ops("native", "cpu", (64, 2, 64))
    assert select_ops("auto", "cpu") is NativeOps
    assert select_ops("auto", "cuda") is not NativeOps  # the CPU kernels never run on a GPU
    with pytest.raises(ValueError, match="CPU only"):
        select_ops("native", "cuda")
    with pytest.raises(ValueError, match="kernels=triton cannot run on cpu"):
        select_ops("triton", "cpu")
    with pytest.raises(ValueError, match="not one of auto, native, triton, torch"):
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
def test_fused_rope_and_cache_write_match_torch(dtype: torch.dtype) -> None:
    from engines.llama.rope import rope_tables
    from engines.llama.spec import LlamaSpec

    heads, kv_heads, head_dim, tokens, block_size = 9, 3, 64, 11, 16
    spec = LlamaSpec(
        hidden_size=heads * head_dim, intermediate_size=8, num_layers=1, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=8, rms_norm_eps=1e-5, rope_theta=10000.0,
    )  # fmt: skip
    cos, sin = rope_tables(spec, 128, dtype, "cpu")
    generator = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    # a 7-token prompt in block 5, a 2-token chunk at 100 (table [.., 2]), decodes at 7 and 127
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 6, 100, 101, 7, 127])
    blocks = torch.tensor([5, 5, 5, 5, 5, 5, 5, 2, 2, 0, 6])
    offsets = positions % block_size
    caches = {
        name: [torch.zeros(8, kv_heads, block_size, head_dim, dtype=dtype) for _ in range(2)]
        for name in ("t", "n")
    }
    cos, sin = cos[positions], sin[positions]  # each token's rows, as the model gathers them once per step
    expected = TorchOps.rope_and_cache(qkv, cos, sin, offsets, blocks, heads, kv_heads, *caches["t"])
    actual = NativeOps.rope_and_cache(qkv, cos, sin, offsets, blocks, heads, kv_heads, *caches["n"])
    _close_to_reference(actual, expected.contiguous())
    _close_to_reference(caches["n"][0], caches["t"][0])
    torch.testing.assert_close(caches["n"][1], caches["t"][1], rtol=0, atol=0)  # v is copied as is
    assert caches["n"][1][2, :, 4].abs().sum() > 0
    assert caches["n"][1][1].abs().sum() == 0
    with pytest.raises(RuntimeError, match="position out of range"):
        NativeOps.rope_and_cache(qkv, cos, sin, offsets + 1, blocks, heads, kv_heads, *caches["n"])
    with pytest.raises(RuntimeError, match="slot out of range"):
        NativeOps.rope_and_cache(qkv, cos, sin, offsets, blocks + 2, heads, kv_heads, *caches["n"])
    with pytest.raises(RuntimeError, match="one row per token"):
        NativeOps.rope_and_cache(qkv, cos[:-1], sin[:-1], offsets, blocks, heads, kv_heads, *caches["n"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("inter", [1536, 37])  # 16-lane chunks with and without a masked tail
def test_native_silu_mul_matches_torch(dtype: torch.dtype, inter: int) -> None:
    """Its own exp differs from torch's in the last float bit at most: 16-bit results equal torch's but
    for rare one-unit moves; float32 runs torch's kernels and is equal. Specials as torch has them."""
    generator = torch.Generator().manual_seed(3)
    scales = torch.tensor([0.01, 1.0, 8.0, 40.0]).repeat(9)[:33, None]
    wide = torch.randn(33, 2 * inter + 6, generator=generator) * scales
    gate_up = wide.to(dtype)[:, : 2 * inter]  # strided rows, scales from tiny to saturating
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -100.0, 100.0, -20.0, 1e-30]
    gate_up[0, : len(specials)] = torch.tensor(specials).to(dtype)
    actual, expected = NativeOps.silu_mul(gate_up), TorchOps.silu_mul(gate_up)
    assert actual.shape == (33, inter)
    assert actual.dtype == dtype
    same = (actual == expected) | (actual.isnan() & expected.isnan())
    assert same[0, : len(specials)].all(), (actual[0, :9], expected[0, :9])
    if dtype == torch.float32:
        assert same.all()
    else:
        assert (~same).sum() <= max(2, actual.numel() // 4096)
        ulp = torch.finfo(dtype).eps * expected.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((actual.float() - expected.float()).abs()[~same] <= ulp[~same]).all()
    torch.testing.assert_close(NativeOps.silu_mul(gate_up[:0]), TorchOps.silu_mul(gate_up[:0]))


@pytest.mark.parametrize("width", [49152, 37, 1])  # 16-lane chunks with and without a tail, one column
def test_native_argmax_matches_torch(width: int) -> None:
    """Ties keep the first index, a NaN wins over any number (torch's rules), -inf rows pick 0."""
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(11, 2 * width, generator=generator)[:, :width]  # strided rows
    logits[1, width // 2 :] = logits[1].max() + 1  # a tie across chunks and the tail: the first wins
    logits[2] = float("-inf")
    logits[3, -1], logits[3, width // 3] = float("nan"), float("nan")
    logits[4, -1] = float("inf")
    logits[5] = 0.0
    logits[6, width // 2] = 1e30
    expected = TorchOps.argmax(logits)
    torch.testing.assert_close(NativeOps.argmax(logits), expected, rtol=0, atol=0)
    torch.testing.assert_close(NativeOps.argmax(logits[:0]), TorchOps.argmax(logits[:0]), rtol=0, atol=0)
    assert expected[3] == (width // 3 if width > 1 else 0)
    assert expected[6] == width // 2


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
    assert "NATIVE FAILED: Could not build the native kernel 'paged_attention'" in result.stdout
