"""Cut one checkpoint tensor to the part a rank holds, reading only that part from the file.

safetensors' ``get_slice`` reads the requested rows or columns straight from the memory-mapped file, so
a rank sharding a checkpoint at start-up touches its own bytes only (plus the strided pages of the
row-parallel matrices); an ahead-of-time partition (engines.parallel.partition) stores each rank's
part contiguous and already fused.
"""

from __future__ import annotations

from typing import Any

import torch

from engines.parallel.layout import ShardPlan

ROWS, COLUMNS, FIRST_RANK, VOCAB, WHOLE = "rows", "columns", "first", "vocab", "whole"


def split_rule(name: str, plan: ShardPlan) -> tuple[str, int, int]:
    """(how, start, stop) for an HF tensor name: rows/columns [start, stop), the vocabulary shard,
    whole (replicated), or first (a row-parallel bias: rank 0 adds it once, the others hold zeros)."""
    local, r, head_dim = plan.local, plan.layout.tp_rank, plan.full.head_dim
    q, kv, inter = local.q_size, local.kv_size, local.intermediate_size
    kv_start = plan.kv_head_start * head_dim
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return VOCAB, plan.vocab_start, plan.vocab_start + plan.vocab_shard
    if ".self_attn.q_proj." in name:
        return ROWS, r * q, (r + 1) * q
    if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
        return ROWS, kv_start, kv_start + kv
    if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
        width = q if "o_proj" in name else inter
        return COLUMNS, r * width, (r + 1) * width
    if name.endswith(("self_attn.o_proj.bias", "mlp.down_proj.bias")):
        return FIRST_RANK, 0, 0
    if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
        return ROWS, r * inter, (r + 1) * inter
    return WHOLE, 0, 0


def read_shard(handle: Any, name: str, plan: ShardPlan) -> torch.Tensor:
    """This rank's part of tensor ``name`` from an open ``safe_open`` handle."""
    how, start, stop = split_rule(name, plan)
    if plan.layout.tensor_parallel == 1 or how == WHOLE:
        return handle.get_tensor(name)
    view = handle.get_slice(name)
    if how == ROWS:
        return view[start:stop]
    if how == COLUMNS:
        return view[:, start:stop]
    if how == FIRST_RANK:
        tensor = view[:]
        return tensor if plan.layout.tp_rank == 0 else torch.zeros_like(tensor)
    rows = view[start : min(stop, view.get_shape()[0])]  # VOCAB: pad the last shard with zero rows
    if rows.shape[0] == stop - start:
        return rows
    padded = rows.new_zeros((stop - start, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    return padded
