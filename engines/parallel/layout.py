"""Which slice of a Llama-family model each rank holds, decided once from the degrees and the shapes.

Megatron-style tensor parallelism: q/k/v and gate/up are split by output rows (column-parallel),
o_proj and down by input columns (row-parallel, one all-reduce each per layer), the embedding and LM
head by vocabulary rows. KV heads are split when they divide by the degree and replicated (each rank
keeps the one its query heads read) when the degree is a multiple of them. Pipeline parallelism gives
each stage a contiguous run of layers; stage 0 embeds, the last stage normalises and projects.
Ranks are numbered stage-major: global rank = stage x tp + tp_rank, so rank 0 is stage 0's first rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engines.base import EngineLoadError
from engines.llama.spec import LlamaSpec


@dataclass(frozen=True)
class ParallelLayout:
    """The degrees and this process's place in the group."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    rank: int = 0

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel

    @property
    def stage(self) -> int:
        return self.rank // self.tensor_parallel

    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.pipeline_parallel - 1

    def stage_ranks(self, stage: int) -> list[int]:
        """Global ranks of one stage's tensor-parallel group."""
        return [stage * self.tensor_parallel + i for i in range(self.tensor_parallel)]

    def for_rank(self, rank: int) -> ParallelLayout:
        return dataclasses.replace(self, rank=rank)

    def describe(self) -> str:
        tp, pp = self.tensor_parallel, self.pipeline_parallel
        return f"tensor_parallel_degree={tp}, pipeline_parallel_degree={pp}"


@dataclass(frozen=True)
class ShardPlan:
    """What one rank holds of a model: local shapes, where its rows start in the full tensors."""

    layout: ParallelLayout
    full: LlamaSpec
    local: LlamaSpec
    """The spec of this rank's part: its heads, kv heads and MLP width (hidden and vocab stay full)."""
    q_head_start: int
    kv_head_start: int
    mlp_start: int
    vocab_start: int
    vocab_shard: int
    """Rows of the embedding / LM head shard (the last shard is padded with zero rows)."""
    layer_start: int
    layer_stop: int

    @property
    def holds_embedding(self) -> bool:
        return self.layout.first_stage or (self.layout.last_stage and self.full.tie_word_embeddings)

    @property
    def replicated_kv(self) -> bool:
        return self.full.num_kv_heads < self.layout.tensor_parallel

    def hf_layer(self, local_index: int) -> int:
        return self.layer_start + local_index

    @classmethod
    def build(cls, spec: LlamaSpec, layout: ParallelLayout) -> ShardPlan:
        """With at least as many KV heads as ranks, each rank takes a contiguous run of KV heads with
        their query heads (uneven when they do not divide: SmolLM2's 3 KV heads over 2 ranks are 2 + 1);
        with fewer, the query heads split evenly and each rank keeps the one KV head they read."""
        check_degrees(spec, layout)
        tp, r = layout.tensor_parallel, layout.tp_rank
        kv = spec.num_kv_heads
        if kv >= tp:
            kv_start, kv_stop = r * kv // tp, (r + 1) * kv // tp
            group = spec.num_heads // kv
            q_start, heads, kv_heads = kv_start * group, (kv_stop - kv_start) * group, kv_stop - kv_start
        else:  # replicated: rank r's query heads all read kv head r * kv / tp
            heads = spec.num_heads // tp
            q_start, kv_heads, kv_start = r * heads, 1, r * kv // tp
        inter = spec.intermediate_size
        mlp_start, mlp_stop = r * inter // tp, (r + 1) * inter // tp
        start, stop = stage_layers(spec.num_layers, layout.pipeline_parallel, layout.stage)
        local = dataclasses.replace(
            spec,
            num_heads=heads,
            num_kv_heads=kv_heads,
            intermediate_size=mlp_stop - mlp_start,
            num_layers=stop - start,
        )
        vocab_shard = -(-spec.vocab_size // tp)  # equal shards: the logits are all-gathered
        return cls(
            layout, spec, local, q_start, kv_start, mlp_start, r * vocab_shard, vocab_shard, start, stop
        )


def stage_layers(num_layers: int, stages: int, stage: int) -> tuple[int, int]:
    """[start, stop) of a stage's layers: contiguous, earlier stages take the remainder."""
    base, extra = divmod(num_layers, stages)
    start = stage * base + min(stage, extra)
    return start, start + base + (stage < extra)


def check_degrees(spec: LlamaSpec, layout: ParallelLayout) -> None:
    """EngineLoadError naming the numbers when the degrees do not fit this model."""
    tp, pp = layout.tensor_parallel, layout.pipeline_parallel
    if tp < 1 or pp < 1:
        raise EngineLoadError(f"Parallel degrees must be at least 1 ({layout.describe()})")
    problems = []
    kv = spec.num_kv_heads
    if kv < tp and tp % kv:
        problems.append(
            f"num_key_value_heads={kv} is fewer than tensor_parallel_degree={tp} and does not divide it"
        )
    elif kv < tp and spec.num_heads % tp:
        problems.append(
            f"num_attention_heads={spec.num_heads} is not divisible by tensor_parallel_degree={tp}"
        )
    if spec.intermediate_size < tp:
        problems.append(f"intermediate_size={spec.intermediate_size} is below tensor_parallel_degree={tp}")
    if spec.num_layers < pp:
        problems.append(f"num_hidden_layers={spec.num_layers} is fewer than pipeline_parallel_degree={pp}")
    if problems:
        raise EngineLoadError(
            "The parallel degrees do not fit this model: "
            + "; ".join(problems)
            + ". Fix: choose option.tensor_parallel_degree dividing the attention heads and the MLP width, "
            "and option.pipeline_parallel_degree at most the layer count."
        )
