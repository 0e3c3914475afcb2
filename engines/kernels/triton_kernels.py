"""The fused engine's GPU kernels in Triton, each matching a plain-torch reference.

Attention follows `engines.kernels.paged` (the paged cache contract and `paged_attention_reference`); the
fused row ops follow `TorchOps` in `engines.kernels.ops`, rounding step by step as it does. Launchers never
read tensor values on the host: grids depend only on shapes and Python ints, so every launch can be
captured in a CUDA graph. With TRITON_INTERPRET=1 set before this module is imported, the kernels run on
CPU tensors (float32 / float16 only: the interpreter mishandles bfloat16), which is how the tests check
them without a GPU.
"""

# Triton's convention: compile-time (tl.constexpr) parameters are written in capitals.
# ruff: noqa: N803, N806

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engines.kernels.paged import PagedAttentionMeta

LOG2E = 1.4426950408889634
NUM_SMS = 132
"""Streaming multiprocessors assumed by `decode_splits` (an H100 SXM); only tunes the split count."""
MIN_KEYS_PER_SPLIT = 256


def _precision(dtype: torch.dtype) -> str:
    """float32 attention stays exact: Triton's default tf32 dot would cost ~1e-3 relative error."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _key_tile(head_dim: int) -> int:
    """Keys per inner-loop tile: 64 fits registers up to head_dim 128, 32 above."""
    return 64 if head_dim <= 128 else 32


@triton.jit
def _load_kv_tile(
    cache,
    table_row,
    positions,
    kv_head,
    dims,
    valid,
    stride_block,
    stride_head,
    stride_row,
    BLOCK_SIZE: tl.constexpr,
):
    """[BLOCK_N, D] rows of one kv head at `positions`, each gathered through the block table."""
    pages = tl.load(table_row + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    rows = pages * stride_block + kv_head * stride_head + (positions % BLOCK_SIZE) * stride_row
    return tl.load(cache + rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _decode_split_kernel(
    q,
    cache_k,
    cache_v,
    block_tables,
    context_lens,
    partial_out,
    partial_lse,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_ch,
    stride_cr,
    stride_tb,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (sequence, kv head, split): every query head of the group against one contiguous key range,
    so each K/V tile is loaded once per group. Writes the normalised partial output and its log-sum-exp
    (base 2); a split past the context writes zeros and -inf, which the combine weighs as nothing."""
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context = tl.load(context_lens + seq)
    per_split = tl.cdiv(tl.cdiv(context, BLOCK_N), NUM_SPLITS) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, context)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows
    q_ptrs = q + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + dims[None, :]
    query = tl.load(q_ptrs, mask=(rows < GROUP)[:, None], other=0.0)
    table_row = block_tables + seq.to(tl.int64) * stride_tb

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for tile in range(start, end, BLOCK_N):
        positions = tile + tl.arange(0, BLOCK_N)
        valid = positions < end
        keys = _load_kv_tile(
            cache_k, table_row, positions, kv_head, dims, valid, stride_cb, stride_ch, stride_cr, BLOCK_SIZE
        )
        scores = tl.dot(query, tl.trans(keys), input_precision=PRECISION) * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        values = _load_kv_tile(
            cache_v, table_row, positions, kv_head, dims, valid, stride_cb, stride_ch, stride_cr, BLOCK_SIZE
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    slot = (seq.to(tl.int64) * GROUP * tl.num_programs(1) + heads) * NUM_SPLITS + split
    row_mask = rows < GROUP
    tl.store(partial_out + slot[:, None] * HEAD_DIM + dims[None, :], out, mask=row_mask[:, None])
    tl.store(partial_lse + slot, m_i + tl.log2(tl.maximum(l_i, 1e-30)), mask=row_mask)


@triton.jit
def _decode_combine_kernel(
    partial_out,
    partial_lse,
    out,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """One (sequence, head): the splits' outputs weighted by exp2(lse - max); all-empty rows give 0."""
    seq, head = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    base = (seq.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS
    lse = tl.load(partial_lse + base + splits, mask=splits < NUM_SPLITS, other=float("-inf"))
    top = tl.max(lse, 0)
    weights = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    parts = tl.load(
        partial_out + (base + splits)[:, None] * HEAD_DIM + dims[None, :],
        mask=(splits < NUM_SPLITS)[:, None],
        other=0.0,
    )
    total = tl.sum(weights, 0)
    result = tl.sum(parts * weights[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    out_ptrs = out + seq.to(tl.int64) * stride_ob + head * stride_oh + dims
    tl.store(out_ptrs, result.to(out.dtype.element_ty))


def decode_splits(max_len: int, batch: int, kv_heads: int, num_sms: int = NUM_SMS) -> int:
    """Key-range splits per (sequence, kv head) for `paged_decode_attention`: a power of two.

    Small batches leave most SMs idle with one program per (sequence, kv head), so the keys are split
    until there are about two programs per SM, but never below MIN_KEYS_PER_SPLIT keys per split (the
    combine would cost more than it saves). Pass max_model_len to fix the count for a captured CUDA graph;
    results do not depend on it (ranges come from each sequence's context inside the kernel)."""
    wanted = triton.cdiv(2 * num_sms, max(1, batch * kv_heads))
    splits = max(1, min(wanted, max_len // MIN_KEYS_PER_SPLIT))
    return 1 << (splits.bit_length() - 1)


def paged_decode_attention(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int,
) -> torch.Tensor:
    """One query token per sequence, q [B, heads, head_dim] -> [B, heads, head_dim] (flash-decoding)."""
    batch, heads, head_dim = q.shape
    _, kv_heads, block_size, _ = cache_k.shape
    if q.stride(2) != 1:
        q = q.contiguous()
    group = heads // kv_heads
    partial_out = torch.empty(batch, heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q,
        cache_k,
        cache_v,
        block_tables,
        context_lens,
        partial_out,
        partial_lse,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        cache_k.stride(0),
        cache_k.stride(1),
        cache_k.stride(2),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=_key_tile(head_dim),
        NUM_SPLITS=num_splits,
        PRECISION=_precision(q.dtype),
    )
    out = torch.empty(batch, heads, head_dim, dtype=q.dtype, device=q.device)
    _decode_combine_kernel[(batch, heads)](
        partial_out,
        partial_lse,
        out,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        NUM_SPLITS=num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits),
    )
    return out


@triton.jit
def _prefill_kernel(
    q,
    cache_k,
    cache_v,
    block_tables,
    query_start,
    context_lens,
    out,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_ch,
    stride_cr,
    stride_tb,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (sequence, head, query tile): causal flash attention of BLOCK_M chunk rows over the cached
    keys, which already hold the chunk; row i sits at position context - query_len + i."""
    seq, head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first = tl.load(query_start + seq)
    query_len = tl.load(query_start + seq + 1) - first
    if tile * BLOCK_M >= query_len:
        return
    context = tl.load(context_lens + seq)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < query_len
    positions = context - query_len + rows
    dims = tl.arange(0, HEAD_DIM)
    tokens = (first + rows).to(tl.int64)
    q_ptrs = q + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :]
    query = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)
    kv_head = head // GROUP
    table_row = block_tables + seq.to(tl.int64) * stride_tb
    end = tl.minimum(context, context - query_len + (tile + 1) * BLOCK_M)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, end, BLOCK_N):
        keys_at = start + tl.arange(0, BLOCK_N)
        valid = keys_at < end
        keys = _load_kv_tile(
            cache_k, table_row, keys_at, kv_head, dims, valid, stride_cb, stride_ch, stride_cr, BLOCK_SIZE
        )
        scores = tl.dot(query, tl.trans(keys), input_precision=PRECISION) * qk_scale
        causal = valid[None, :] & (keys_at[None, :] <= positions[:, None])
        scores = tl.where(causal, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        values = _load_kv_tile(
            cache_v, table_row, keys_at, kv_head, dims, valid, stride_cb, stride_ch, stride_cr, BLOCK_SIZE
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    result = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_ptrs = out + tokens[:, None] * stride_ot + head * stride_oh + dims[None, :]
    tl.store(out_ptrs, result.to(out.dtype.element_ty), mask=row_valid[:, None])


def paged_prefill_attention(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    meta: PagedAttentionMeta,
    scale: float,
) -> torch.Tensor:
    """Packed chunks q [T, heads, head_dim] -> [T, heads, head_dim]: each sequence's chunk attends
    causally over its cached prefix and itself; decode rows (chunks of one) mix in freely."""
    tokens, heads, head_dim = q.shape
    _, kv_heads, block_size, _ = cache_k.shape
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.empty(tokens, heads, head_dim, dtype=q.dtype, device=q.device)
    block_m = min(64, max(16, triton.next_power_of_2(meta.max_query_len)))
    grid = (meta.num_seqs, heads, triton.cdiv(meta.max_query_len, block_m))
    _prefill_kernel[grid](
        q,
        cache_k,
        cache_v,
        meta.block_tables,
        meta.query_start,
        meta.context_lens,
        out,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        cache_k.stride(0),
        cache_k.stride(1),
        cache_k.stride(2),
        meta.block_tables.stride(0),
        GROUP=heads // kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=_key_tile(head_dim),
        PRECISION=_precision(q.dtype),
        num_warps=8 if head_dim > 128 else 4,
    )
    return out


@triton.jit
def _rms_norm_kernel(
    x,
    residual,
    weight,
    out,
    summed,
    stride_x,
    stride_r,
    stride_o,
    stride_s,
    eps,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    """One row: optional h = x + residual (rounded to x's dtype, stored), then TorchOps.rms_norm's rounding:
    normalise in float32, cast to the input dtype, multiply by the weight in the output dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    h = tl.load(x + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = h + tl.load(residual + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(summed + row * stride_s + cols, h, mask=mask)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / N + eps)
    normed = (hf * rstd).to(h.dtype)
    out_type = out.dtype.element_ty
    scaled = tl.load(weight + cols, mask=mask, other=0.0).to(out_type) * normed.to(out_type)
    tl.store(out + row * stride_o + cols, scaled, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A [rows, hidden] view with unit column stride (a copy only when the layout needs one)."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; without a residual, (rms_norm(x), x)."""
    hidden = x.shape[-1]
    rows = _rows(x)
    res = _rows(residual) if residual is not None else rows
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    summed = torch.empty_like(rows) if residual is not None else rows
    _rms_norm_kernel[(rows.shape[0],)](
        rows,
        res,
        weight,
        out,
        summed,
        rows.stride(0),
        res.stride(0),
        out.stride(0),
        summed.stride(0),
        eps,
        N=hidden,
        BLOCK=triton.next_power_of_2(hidden),
        HAS_RESIDUAL=residual is not None,
        num_warps=min(16, triton.next_power_of_2(max(1, hidden // 256))),
    )
    return out.view(x.shape), (summed.view(x.shape) if residual is not None else x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """TorchOps.rms_norm (HF's LlamaRMSNorm rounding)."""
    return add_rms_norm(x, None, weight, eps)[0]


@triton.jit
def _silu_mul_kernel(gate_up, out, stride_in, stride_out, N: tl.constexpr, BLOCK: tl.constexpr):
    """silu in float32 rounded to the input dtype, then times up in that dtype (torch's rounding)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(gate_up + row * stride_in + cols, mask=mask, other=0.0)
    up = tl.load(gate_up + row * stride_in + N + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    activated = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out + row * stride_out + cols, activated * up, mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] -> silu(gate) * up, [..., I]."""
    rows = _rows(gate_up)
    inner = rows.shape[1] // 2
    out = torch.empty(rows.shape[0], inner, dtype=rows.dtype, device=rows.device)
    block = min(1024, triton.next_power_of_2(inner))
    _silu_mul_kernel[(rows.shape[0], triton.cdiv(inner, block))](
        rows, out, rows.stride(0), out.stride(0), N=inner, BLOCK=block
    )
    return out.view(*gate_up.shape[:-1], inner)


@triton.jit
def _rotate(
    x, row, heads_at, halves, cos_lo, cos_hi, sin_lo, sin_hi, mask, HALF: tl.constexpr, dtype: tl.constexpr
):
    """rotate_half rotary of [heads, head_dim] rows at x + row + heads_at, rounded as TorchOps does
    (each product, then the sum, in `dtype`); returns the (low, high) halves."""
    lo = tl.load(x + row + heads_at[:, None] + halves[None, :], mask=mask, other=0.0).to(dtype)
    hi = tl.load(x + row + heads_at[:, None] + HALF + halves[None, :], mask=mask, other=0.0).to(dtype)
    return lo * cos_lo[None, :] - hi * sin_lo[None, :], hi * cos_hi[None, :] + lo * sin_hi[None, :]


@triton.jit
def _rope_cache_kernel(
    qkv,
    cos,
    sin,
    offsets,
    block_ids,
    q_out,
    cache_k,
    cache_v,
    stride_qkv,
    stride_cos,
    stride_sin,
    stride_qo,
    stride_cb,
    stride_ch,
    stride_cr,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    KV_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """One token: rotate its q heads into q_out, rotate its k heads and copy its v heads into the
    cache at (block_ids[t], :, offsets[t])."""
    token = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    halves = tl.arange(0, HALF)
    dtype = q_out.dtype.element_ty
    cos_lo = tl.load(cos + token * stride_cos + halves).to(dtype)
    cos_hi = tl.load(cos + token * stride_cos + HALF + halves).to(dtype)
    sin_lo = tl.load(sin + token * stride_sin + halves).to(dtype)
    sin_hi = tl.load(sin + token * stride_sin + HALF + halves).to(dtype)
    row = token * stride_qkv

    q_heads = tl.arange(0, HEADS_PAD)
    q_mask = (q_heads < HEADS)[:, None]
    lo, hi = _rotate(
        qkv, row, q_heads * HEAD_DIM, halves, cos_lo, cos_hi, sin_lo, sin_hi, q_mask, HALF, dtype
    )
    q_at = q_out + token * stride_qo + q_heads[:, None] * HEAD_DIM + halves[None, :]
    tl.store(q_at, lo, mask=q_mask)
    tl.store(q_at + HALF, hi, mask=q_mask)

    kv = tl.arange(0, KV_PAD)
    kv_mask = (kv < KV_HEADS)[:, None]
    k_at = (HEADS + kv) * HEAD_DIM
    lo, hi = _rotate(qkv, row, k_at, halves, cos_lo, cos_hi, sin_lo, sin_hi, kv_mask, HALF, dtype)
    block = tl.load(block_ids + token).to(tl.int64)
    slot = block * stride_cb + tl.load(offsets + token).to(tl.int64) * stride_cr
    cache_at = slot + kv[:, None] * stride_ch + halves[None, :]
    tl.store(cache_k + cache_at, lo.to(cache_k.dtype.element_ty), mask=kv_mask)
    tl.store(cache_k + cache_at + HALF, hi.to(cache_k.dtype.element_ty), mask=kv_mask)

    dims = tl.arange(0, HEAD_DIM)
    v_at = qkv + row + ((HEADS + KV_HEADS + kv) * HEAD_DIM)[:, None] + dims[None, :]
    v = tl.load(v_at, mask=kv_mask, other=0.0)
    v_cache = cache_v + slot + kv[:, None] * stride_ch + dims[None, :]
    tl.store(v_cache, v.to(cache_v.dtype.element_ty), mask=kv_mask)


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    offsets: torch.Tensor,
    block_ids: torch.Tensor,
    heads: int,
    kv_heads: int,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
) -> torch.Tensor:
    """TorchOps.rope_and_cache on the paged cache: rotate q and k of qkv [T, (heads + 2 kv_heads) *
    head_dim], store k and v at cache[block_ids[t], :, offsets[t]]; returns q [T, heads, head_dim]."""
    tokens, head_dim = qkv.shape[0], cache_k.shape[-1]
    qkv = _rows(qkv)
    cos, sin = _rows(cos), _rows(sin)
    q_out = torch.empty(
        tokens, heads, head_dim, dtype=torch.promote_types(qkv.dtype, cos.dtype), device=qkv.device
    )
    _rope_cache_kernel[(tokens,)](
        qkv,
        cos,
        sin,
        offsets,
        block_ids,
        q_out,
        cache_k,
        cache_v,
        qkv.stride(0),
        cos.stride(0),
        sin.stride(0),
        q_out.stride(0),
        cache_k.stride(0),
        cache_k.stride(1),
        cache_k.stride(2),
        HEADS=heads,
        KV_HEADS=kv_heads,
        HEADS_PAD=triton.next_power_of_2(heads),
        KV_PAD=triton.next_power_of_2(kv_heads),
        HEAD_DIM=head_dim,
    )
    return q_out
