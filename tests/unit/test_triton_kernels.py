"""The Triton kernels against their plain-torch references (paged_attention_reference and TorchOps).

Without CUDA they run on CPU tensors in Triton's interpreter, in float32 and float16 only (the interpreter
garbles bfloat16); the `cuda`-marked test repeats them on a GPU in bfloat16 and float16. TRITON_INTERPRET
must be set before the kernels module is imported: triton.jit reads it when decorating.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engines.kernels import triton_kernels as tk  # noqa: E402
from engines.kernels.ops import TorchOps  # noqa: E402
from engines.kernels.paged import PagedAttentionMeta, paged_attention_reference  # noqa: E402
from engines.kernels.triton_ops import TritonOps, triton_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [(8, 2, 64, 16), (4, 4, 128, 32), (8, 1, 64, 32), (6, 2, 128, 16)]
"""(heads, kv_heads, head_dim, block_size): GQA group 4, MHA, group 8, group 3 (not a power of two)."""
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _paged_case(shape, dtype, context_lens, query_lens, device=DEVICE, seed=0):
    """q for the packed chunks, caches with shuffled block tables, and NaN in every slot no sequence owns
    (a kernel that reads past a context poisons its output)."""
    heads, kv_heads, head_dim, block_size = shape
    generator = torch.Generator().manual_seed(seed)
    needed = [-(-context // block_size) for context in context_lens]
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = [order[sum(needed[:s]) : sum(needed[: s + 1])] for s in range(len(needed))]
    cache_k = torch.full((num_blocks, kv_heads, block_size, head_dim), float("nan"))
    cache_v = torch.full_like(cache_k, float("nan"))
    for table, context in zip(tables, context_lens, strict=True):
        for position in range(context):
            block, offset = table[position // block_size], position % block_size
            cache_k[block, :, offset] = torch.randn(kv_heads, head_dim, generator=generator)
            cache_v[block, :, offset] = torch.randn(kv_heads, head_dim, generator=generator)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=generator)
    meta = PagedAttentionMeta.build(tables, query_lens, context_lens, device)
    return q.to(device, dtype), cache_k.to(device, dtype), cache_v.to(device, dtype), meta


def _assert_close(actual, expected):
    tol = TOLERANCE[expected.dtype]
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def _block_contexts(block_size):
    """Contexts ending exactly on a block boundary, one past it, a single token, and a ragged one."""
    return [block_size, block_size + 1, 1, 2 * block_size, 2 * block_size + 1, 3 * block_size - 5]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_attention_matches_reference(shape, num_splits):
    """8 splits exceed every sequence's blocks here: the empty ones must weigh nothing."""
    contexts = _block_contexts(shape[3])
    q, cache_k, cache_v, meta = _paged_case(shape, torch.float32, contexts, [1] * len(contexts))
    scale = shape[2] ** -0.5
    actual = tk.paged_decode_attention(
        q, cache_k, cache_v, meta.block_tables, meta.context_lens, scale, num_splits
    )
    _assert_close(actual, paged_attention_reference(q, cache_k, cache_v, meta, scale))


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_decode_attention_float16(shape):
    contexts = _block_contexts(shape[3])
    q, cache_k, cache_v, meta = _paged_case(shape, torch.float16, contexts, [1] * len(contexts))
    actual = tk.paged_decode_attention(q, cache_k, cache_v, meta.block_tables, meta.context_lens, 0.1, 2)
    _assert_close(actual, paged_attention_reference(q, cache_k, cache_v, meta, 0.1))


PREFILL_CASES = {
    "no_prefix": ([20, 7, 33], [20, 7, 33]),
    "cached_prefix": ([40, 50, 17], [9, 34, 1]),
    "mixed_decodes": ([17, 12, 33, 1, 70], [1, 12, 1, 1, 30]),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_attention_matches_reference(shape, case):
    contexts, query_lens = PREFILL_CASES[case]
    q, cache_k, cache_v, meta = _paged_case(shape, torch.float32, contexts, query_lens)
    scale = shape[2] ** -0.5
    actual = tk.paged_prefill_attention(q, cache_k, cache_v, meta, scale)
    _assert_close(actual, paged_attention_reference(q, cache_k, cache_v, meta, scale))


def test_prefill_attention_float16_long_chunk():
    """A chunk longer than one 64-row query tile, over a cached prefix."""
    q, cache_k, cache_v, meta = _paged_case(SHAPES[0], torch.float16, [90, 5], [75, 5])
    actual = tk.paged_prefill_attention(q, cache_k, cache_v, meta, 0.125)
    _assert_close(actual, paged_attention_reference(q, cache_k, cache_v, meta, 0.125))


@pytest.mark.parametrize(("contexts", "query_lens"), [([33, 5, 16], [1, 1, 1]), ([33, 5], [4, 1])])
def test_triton_ops_attention_dispatches(contexts, query_lens):
    """q as a strided view, the way the engine slices it from a fused projection."""
    q, cache_k, cache_v, meta = _paged_case(SHAPES[0], torch.float32, contexts, query_lens)
    q = torch.cat((q, q), dim=1)[:, 3:11]
    actual = TritonOps.attention(q, cache_k, cache_v, meta)  # TorchOps.attention's call: default scale
    _assert_close(actual, paged_attention_reference(q, cache_k, cache_v, meta))


def test_decode_splits_fill_the_gpu_but_keep_splits_long():
    assert tk.decode_splits(4096, 1, 8) == 16  # 264 programs wanted, 16 splits of 256 keys allowed
    assert tk.decode_splits(100, 1, 8) == 1
    assert tk.decode_splits(32768, 64, 8) == 1
    assert tk.decode_splits(32768, 4, 8) == 8
    assert tk.decode_splits(700, 3, 2) == 2  # floor of 2.7: a power of two


@pytest.mark.parametrize("shape", [(4, 2, 256, 16), (4, 1, 32, 16)])
def test_attention_other_head_dims(shape):
    """head_dim 256 takes the 32-key tile; 32 the smallest tl.dot operand."""
    contexts, query_lens = [40, 16, 9], [11, 1, 9]
    q, cache_k, cache_v, meta = _paged_case(shape, torch.float32, contexts, query_lens)
    expected = paged_attention_reference(q, cache_k, cache_v, meta, 0.1)
    _assert_close(tk.paged_prefill_attention(q, cache_k, cache_v, meta, 0.1), expected)
    decodes = PagedAttentionMeta.build(meta.block_tables.tolist(), [1, 1, 1], contexts)
    last = q[meta.query_start[1:].long() - 1]
    actual = tk.paged_decode_attention(
        last, cache_k, cache_v, decodes.block_tables, decodes.context_lens, 0.1, 2
    )
    _assert_close(actual, expected[meta.query_start[1:].long() - 1])


def _hidden(dtype, rows, hidden, device=DEVICE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, hidden, generator=generator).to(device, dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [64, 200])
def test_rms_norms_match_torch_ops(dtype, hidden):
    x, residual, weight = _hidden(dtype, 5, hidden)
    weight = weight[0]
    _assert_close(TritonOps.rms_norm(x, weight, 1e-6), TorchOps.rms_norm(x, weight, 1e-6))
    normed, summed = TritonOps.add_rms_norm(x, residual, weight, 1e-5)
    expected_normed, expected_summed = TorchOps.add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(summed, expected_summed, atol=0, rtol=0)
    _assert_close(normed, expected_normed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inner", [72, 1500])
def test_silu_mul_matches_torch_ops(dtype, inner):
    gate_up = _hidden(dtype, 3, 2 * inner)[0]
    _assert_close(TritonOps.silu_mul(gate_up), TorchOps.silu_mul(gate_up))


def _rope_case(dtype, heads, kv_heads, head_dim, block_size=16, tokens=7, device=DEVICE):
    generator = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator)
    positions = torch.randint(0, 500, (tokens,), generator=generator)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    slots = torch.randperm(6 * block_size, generator=generator)[:tokens]
    cache = torch.randn(6, kv_heads, block_size, head_dim, generator=generator)
    tensors = (qkv, emb.cos(), emb.sin(), slots % block_size, slots // block_size)
    return [t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in tensors], cache.to(
        device, dtype
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 64), (6, 6, 128), (8, 1, 32)])
def test_rope_and_cache_matches_torch_ops(dtype, heads, kv_heads, head_dim):
    (qkv, cos, sin, offsets, block_ids), cache = _rope_case(dtype, heads, kv_heads, head_dim)
    expected_k, expected_v = cache.clone(), cache.clone() + 1
    actual_k, actual_v = expected_k.clone(), expected_v.clone()
    args = (qkv, cos, sin, offsets, block_ids, heads, kv_heads)
    expected_q = TorchOps.rope_and_cache(*args, expected_k, expected_v)
    actual_q = TritonOps.rope_and_cache(*args, actual_k, actual_v)
    _assert_close(actual_q, expected_q)
    _assert_close(actual_k, expected_k)
    torch.testing.assert_close(actual_v, expected_v, atol=0, rtol=0)


def test_triton_available_here():
    assert triton_available(DEVICE) is None
    assert "CUDA" in triton_available("meta")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_on_cuda(dtype):
    """The same checks on the GPU in the half types the engine serves."""
    for shape in SHAPES:
        contexts = _block_contexts(shape[3])
        q, cache_k, cache_v, meta = _paged_case(shape, dtype, contexts, [1] * len(contexts), "cuda")
        expected = paged_attention_reference(q, cache_k, cache_v, meta, 0.1)
        for splits in (1, 3, 8):
            decoded = tk.paged_decode_attention(
                q, cache_k, cache_v, meta.block_tables, meta.context_lens, 0.1, splits
            )
            _assert_close(decoded, expected)
        for contexts, query_lens in PREFILL_CASES.values():
            q, cache_k, cache_v, meta = _paged_case(shape, dtype, contexts, query_lens, "cuda")
            expected = paged_attention_reference(q, cache_k, cache_v, meta, 0.1)
            _assert_close(tk.paged_prefill_attention(q, cache_k, cache_v, meta, 0.1), expected)
    x, residual, weight = _hidden(dtype, 5, 200, "cuda")
    _assert_close(
        TritonOps.add_rms_norm(x, residual, weight[0], 1e-5)[0],
        TorchOps.add_rms_norm(x, residual, weight[0], 1e-5)[0],
    )
    _assert_close(TritonOps.silu_mul(x), TorchOps.silu_mul(x))
    (qkv, cos, sin, offsets, block_ids), cache = _rope_case(dtype, 8, 2, 128, device="cuda")
    expected_k, actual_k = cache.clone(), cache.clone()
    expected_v, actual_v = cache.clone(), cache.clone()
    args = (qkv, cos, sin, offsets, block_ids, 8, 2)
    _assert_close(
        TritonOps.rope_and_cache(*args, actual_k, actual_v),
        TorchOps.rope_and_cache(*args, expected_k, expected_v),
    )
    _assert_close(actual_k, expected_k)
