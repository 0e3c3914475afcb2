"""The query-tiled native prefill kernel (csrc/paged_attention.cpp: paged_prefill_attention) against
engines.kernels.paged.paged_attention_reference, and NativeOps.attention's routing to it.

The kernel is compiled on first use (cached under LMI_KERNEL_CACHE or the user cache dir).
"""

from __future__ import annotations

import pytest
import torch
from support import paged_attention_case

from engines.kernels import ops as ops_module
from engines.kernels.build import load_kernel
from engines.kernels.native_attention import native_paged_attention, native_prefill_attention
from engines.kernels.ops import NativeOps
from engines.kernels.paged import PagedAttentionMeta, paged_attention_reference

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
"""atol = rtol against the float32 reference on the same rounded inputs: summation order in float32,
one output rounding, and on the bf16 fast path probabilities rounded to bf16."""
SHAPES = [(9, 3, 64, 16), (8, 2, 128, 32), (4, 4, 64, 32), (16, 4, 128, 16), (6, 1, 80, 16), (16, 1, 64, 32)]
"""(heads, kv_heads, head_dim, block_size): SmolLM2's GQA (group 3), group 4, MHA, group 4 with head_dim
128, and the portable kernel's generic head_dim (80) and a 16-head group (3-token tiles)."""


def _lens(block_size: int) -> tuple[list[int], list[int]]:
    """(context_lens, query_lens), one sequence each: whole prompts ending on a block boundary and one
    past it, chunks after a cached prefix (ending on a boundary, and across several), 1-token chunks at
    position 0 and after a prefix, and chunks whose last query tile ends mid-tile (37 = 16 + 16 + 5
    tokens for group 3) or that span many key blocks."""
    b = block_size
    return [b, 2 * b + 1, 3 * b, 2 * b + 41, 1, 77, 100, 300], [b, 2 * b + 1, 20, 40, 1, 1, 37, 150]


def _reference(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, meta: PagedAttentionMeta):
    """The float32 reference on the same (rounded) inputs."""
    return paged_attention_reference(q.float(), cache_k.float(), cache_v.float(), meta)


@pytest.mark.parametrize("min_tile_tokens", [1, 17], ids=["all-tiled", "short-by-token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "h{}-kv{}-d{}-b{}".format(*s))
def test_prefill_kernel_matches_reference(
    dtype: torch.dtype, shape: tuple[int, int, int, int], min_tile_tokens: int
) -> None:
    """Every sequence in one call; with 17, chunks of up to 16 tokens (decodes) go token by token. Rows
    no sequence owns are NaN: reading one (past a context, across sequences, or past a tile's last
    position) poisons the output."""
    contexts, queries = _lens(shape[3])
    q, cache_k, cache_v, meta = paged_attention_case(dtype, shape, contexts, queries)
    actual = native_prefill_attention(q, cache_k, cache_v, meta, min_tile_tokens)
    assert actual.shape == (sum(queries), shape[0], shape[2])
    assert actual.dtype == dtype
    expected = _reference(q, cache_k, cache_v, meta)
    torch.testing.assert_close(actual.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefill_kernel_reads_only_each_tiles_keys(dtype: torch.dtype) -> None:
    """A freed block's stale rows (huge keys, NaN values) next to or inside the sequences' blocks leave
    the output bit for bit the same."""
    contexts, queries = [50, 16, 33], [50, 3, 20]
    q, cache_k, cache_v, meta = paged_attention_case(dtype, (9, 3, 64, 16), contexts, queries, fill=0.0)
    unowned = (cache_k == 0).all(-1, keepdim=True)  # random rows are never all zero
    clean = native_prefill_attention(q, cache_k, cache_v, meta)
    stale_k, stale_v = cache_k.masked_fill(unowned, 1e4), cache_v.masked_fill(unowned, float("nan"))
    torch.testing.assert_close(native_prefill_attention(q, stale_k, stale_v, meta), clean, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_short_chunks_match_the_per_token_kernel_exactly(dtype: torch.dtype) -> None:
    """Chunks under min_tile_tokens run the per-token kernel's own code: the same bits as
    native_paged_attention, next to tiled chunks in the same call."""
    contexts, queries = _lens(16)
    q, cache_k, cache_v, meta = paged_attention_case(dtype, (9, 3, 64, 16), contexts, queries)
    mixed = native_prefill_attention(q, cache_k, cache_v, meta, min_tile_tokens=30)
    per_token = native_paged_attention(q, cache_k, cache_v, meta)
    short = torch.tensor(queries).repeat_interleave(torch.tensor(queries)) < 30
    torch.testing.assert_close(mixed[short], per_token[short], rtol=0, atol=0)
    everything = native_prefill_attention(q, cache_k, cache_v, meta, min_tile_tokens=10**6)
    torch.testing.assert_close(everything, per_token, rtol=0, atol=0)


def test_prefill_kernel_with_no_tokens_for_a_sequence() -> None:
    """A sequence with an empty chunk (query_start repeats) is skipped; the others are unaffected."""
    q, cache_k, cache_v, meta = paged_attention_case(torch.float32, (4, 2, 64, 16), [20, 30], [20, 5])
    empty = PagedAttentionMeta(
        block_tables=meta.block_tables[[0, 0, 1]],
        query_start=torch.tensor([0, 20, 20, 25], dtype=torch.int32),
        context_lens=torch.tensor([20, 7, 30], dtype=torch.int32),
        token_seq=meta.token_seq,
        token_kv_lens=meta.token_kv_lens,
        max_query_len=20,
        max_context_len=30,
    )
    expected = native_prefill_attention(q, cache_k, cache_v, meta)
    torch.testing.assert_close(native_prefill_attention(q, cache_k, cache_v, empty), expected, rtol=0, atol=0)


def test_prefill_kernel_validates_its_inputs() -> None:
    kernel = load_kernel("paged_attention").paged_prefill_attention
    q, cache_k, cache_v, meta = paged_attention_case(torch.float32, (4, 2, 64, 16), [10, 20], [4, 3])
    tables, starts, contexts = meta.block_tables, meta.query_start, meta.context_lens
    num_blocks = cache_k.shape[0]

    def call(**changed: torch.Tensor) -> torch.Tensor:
        args = {"q": q, "k": cache_k, "v": cache_v, "tables": tables, "starts": starts, "contexts": contexts}
        args.update(changed)
        return kernel(*args.values(), 64**-0.5)

    padded = torch.cat([tables, torch.full((2, 1), -1, dtype=torch.int32)], 1)
    torch.testing.assert_close(call(tables=padded), call())  # entries past a context are never read
    for bad in (num_blocks, -1):
        wrong = tables.clone()
        wrong[1, 1] = bad
        with pytest.raises(RuntimeError, match="block id out of range"):
            call(tables=wrong)
    for lens in ([10, 2 * 16 + 1], [3, 20]):  # past the two blocks in the table; shorter than the chunk
        with pytest.raises(RuntimeError, match="context_len out of range"):
            call(contexts=torch.tensor(lens, dtype=torch.int32))
    for bad_starts in ([1, 4, 7], [0, 4, 6], [0, 8, 7]):
        with pytest.raises(RuntimeError, match="query_start"):
            call(starts=torch.tensor(bad_starts, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"query_start \[S \+ 1\] and context_lens \[S\]"):
        call(contexts=contexts[:1])
    with pytest.raises(RuntimeError, match="must be int32"):
        call(starts=starts.long())
    with pytest.raises(RuntimeError, match=r"block_tables: \[S, N\] int32"):
        call(tables=tables.long())
    with pytest.raises(RuntimeError, match="share a dtype"):
        call(q=q.double())
    odd_k = torch.zeros(num_blocks, 2, 12, 64)
    with pytest.raises(RuntimeError, match="block_size must be a power of two"):
        call(k=odd_k, v=odd_k.clone())
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        call(q=torch.zeros(7, 5, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_ops_attention_on_a_mixed_batch(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decodes, short chunks and long chunks (with and without a cached prefix) in one step: the long
    ones take the tiled kernel, the rest the per-token kernel's code in the same call."""
    contexts = [40, 64, 9, 200, 17, 150, 1]
    queries = [1, 64, 5, 100, 16, 1, 1]
    q, cache_k, cache_v, meta = paged_attention_case(dtype, (9, 3, 64, 16), contexts, queries)
    expected = _reference(q, cache_k, cache_v, meta)
    actual = NativeOps.attention(q, cache_k, cache_v, meta)
    torch.testing.assert_close(actual.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    short = torch.tensor(queries).repeat_interleave(torch.tensor(queries)) <= ops_module.LONG_PREFILL_TOKENS
    per_token = native_paged_attention(q, cache_k, cache_v, meta)
    torch.testing.assert_close(actual[short], per_token[short], rtol=0, atol=0)
    monkeypatch.setattr(ops_module, "LONG_PREFILL_TOKENS", 100)  # no chunk longer: all per token
    torch.testing.assert_close(NativeOps.attention(q, cache_k, cache_v, meta), per_token, rtol=0, atol=0)
