"""Which part of a model each rank holds: heads, KV heads (split or replicated), MLP columns,
vocabulary rows, stage layers; and how a step splits into pipeline micro-batches."""

from __future__ import annotations

import pytest
import torch

from engines.base import EngineLoadError
from engines.llama.batch import ForwardBatch
from engines.llama.spec import LlamaSpec
from engines.parallel.layout import ParallelLayout, ShardPlan, stage_layers
from engines.parallel.shard import COLUMNS, FIRST_RANK, ROWS, VOCAB, WHOLE, split_rule

SPEC = LlamaSpec(
    vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=5, num_heads=8, num_kv_heads=2,
    head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4,
)  # fmt: skip


def plans(tp: int, pp: int = 1) -> list[ShardPlan]:
    return [ShardPlan.build(SPEC, ParallelLayout(tp, pp, rank)) for rank in range(tp * pp)]


def test_ranks_are_stage_major():
    layout = ParallelLayout(2, 3, rank=5)
    assert (layout.stage, layout.tp_rank, layout.last_stage) == (2, 1, True)
    assert layout.stage_ranks(1) == [2, 3]


@pytest.mark.parametrize(("layers", "stages"), [(5, 2), (4, 4), (7, 3), (2, 1)])
def test_stages_cover_every_layer_once_in_order(layers, stages):
    ranges = [stage_layers(layers, stages, s) for s in range(stages)]
    assert ranges[0][0] == 0
    assert ranges[-1][1] == layers
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_kv_heads_split_when_they_divide():
    local = [(p.local.num_heads, p.local.num_kv_heads, p.kv_head_start) for p in plans(2)]
    assert local == [(4, 1, 0), (4, 1, 1)]
    assert not plans(2)[0].replicated_kv


def test_kv_heads_replicated_for_the_query_heads_each_rank_holds():
    # 8 query heads over 4 ranks: rank r holds heads 2r, 2r+1, which read kv head (2r) // 4
    got = [(p.local.num_kv_heads, p.kv_head_start) for p in plans(4)]
    assert got == [(1, 0), (1, 0), (1, 1), (1, 1)]
    assert plans(4)[0].replicated_kv


def test_kv_heads_that_do_not_divide_split_unevenly_with_their_query_heads():
    # SmolLM2-135M: 9 query heads in 3 groups, 2 ranks -> 1 + 2 KV heads, 3 + 6 query heads
    import dataclasses

    spec = dataclasses.replace(SPEC, num_heads=9, num_kv_heads=3, intermediate_size=1536)
    got = [ShardPlan.build(spec, ParallelLayout(2, 1, r)) for r in range(2)]
    assert [(p.q_head_start, p.local.num_heads, p.kv_head_start, p.local.num_kv_heads) for p in got] == [
        (0, 3, 0, 1),
        (3, 6, 1, 2),
    ]
    assert [(p.mlp_start, p.local.intermediate_size) for p in got] == [(0, 768), (768, 768)]
    assert split_rule("model.layers.0.self_attn.o_proj.weight", got[1]) == (COLUMNS, 24, 72)


def test_vocabulary_shards_cover_the_vocabulary_with_padding():
    shards = [(p.vocab_start, p.vocab_shard) for p in plans(2)]
    assert shards == [(0, 51), (51, 51)]  # 102 rows hold 101 tokens: one zero row of padding


def test_split_rules_name_the_megatron_layout():
    plan = plans(2)[1]
    assert split_rule("model.layers.0.self_attn.q_proj.weight", plan) == (ROWS, 32, 64)
    assert split_rule("model.layers.0.self_attn.k_proj.bias", plan) == (ROWS, 8, 16)
    assert split_rule("model.layers.0.self_attn.o_proj.weight", plan) == (COLUMNS, 32, 64)
    assert split_rule("model.layers.0.mlp.up_proj.weight", plan) == (ROWS, 48, 96)
    assert split_rule("model.layers.0.mlp.down_proj.weight", plan) == (COLUMNS, 48, 96)
    assert split_rule("model.layers.0.mlp.down_proj.bias", plan)[0] == FIRST_RANK
    assert split_rule("lm_head.weight", plan) == (VOCAB, 51, 102)
    assert split_rule("model.layers.0.input_layernorm.weight", plan)[0] == WHOLE


def test_stages_hold_their_layers_and_the_ends():
    first, last = plans(1, 2)
    assert (first.layer_start, first.layer_stop, last.layer_start, last.layer_stop) == (0, 3, 3, 5)
    assert first.holds_embedding
    assert not last.holds_embedding


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"num_heads": 6, "num_kv_heads": 2},
            "num_attention_heads=6 is not divisible by tensor_parallel_degree=4",
        ),
        (
            {"num_kv_heads": 3, "num_heads": 12},
            "num_key_value_heads=3 is fewer than tensor_parallel_degree=4",
        ),
        ({"intermediate_size": 3}, "intermediate_size=3 is below tensor_parallel_degree=4"),
    ],
)
def test_degrees_that_do_not_fit_name_the_numbers(change, message):
    import dataclasses

    with pytest.raises(EngineLoadError, match=message):
        ShardPlan.build(dataclasses.replace(SPEC, **change), ParallelLayout(4, 1))
    with pytest.raises(EngineLoadError, match="num_hidden_layers=5 is fewer than pipeline_parallel_degree=6"):
        ShardPlan.build(SPEC, ParallelLayout(1, 6))


def test_micro_batches_are_whole_sequences_in_order_with_balanced_tokens():
    seqs = [([0, 1], list(range(20)), 0), ([2], [7], 5), ([3], [8], 9), ([4, 5], list(range(12)), 3)]
    batch = ForwardBatch.build(seqs, 16)
    parts = batch.split(2)
    assert [p.query_lens for p in parts] == [[20], [1, 1, 12]]
    assert torch.equal(torch.cat([p.token_ids for p in parts]), batch.token_ids)
    assert torch.equal(torch.cat([p.positions for p in parts]), batch.positions)
    assert [len(p.query_lens) for p in batch.split(4)] == [1, 1, 1, 1]
    assert len(ForwardBatch.build(seqs[:1], 16).split(3)) == 1
