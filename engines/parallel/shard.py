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
    local, head_dim = plan.local, plan.full.head_dim
    q_start, q_stop = plan.q_head_start * head_dim, plan.q_head_start * head_dim + local.q_size
    kv_start, kv_stop = plan.kv_head_start * head_dim, plan.kv_head_start * head_dim + local.kv_size
    mlp_start, mlp_stop = plan.mlp_start, plan.mlp_start + local.intermediate_size
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return VOCAB, plan.vocab_start, plan.vocab_start + plan.vocab_shard
    if ".self_attn.q_proj." in name:
        return ROWS, q_start, q_stop
    if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
        return ROWS, kv_start, kv_stop
    if name.endswith("self_attn.o_proj.weight"):
        return COLUMNS, q_start, q_stop
    if name.endswith("mlp.down_proj.weight"):
        return COLUMNS, mlp_start, mlp_stop
    if name.endswith(("self_attn.o_proj.bias", "mlp.down_proj.bias")):
        return FIRST_RANK, 0, 0
    if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
        return ROWS, mlp_start, mlp_stop
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
