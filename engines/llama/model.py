"""A LlamaForCausalLM-compatible decoder for continuous batching over a `PagedKVCache`.

All projections, norms and MLPs run once over the packed [T, hidden] tokens of every sequence in the
step (prefill chunks and decode tokens alike); only attention looks at per-sequence structure. q/k/v
and gate/up are fused into single matmuls, and logits are computed only for each sequence's last token.
Parameters are allocated uninitialised: `weights.load_llama` fills every one of them, then packs them.

Under tensor / pipeline parallelism (engines.parallel) each rank builds the part its `ShardPlan` names:
its heads and MLP columns (one all-reduce after o_proj and after down), its vocabulary rows, its stage's
layers; a step's sequences then cross the stages in micro-batches so that the stages overlap.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from engines.kernels.ops import TorchOps
from engines.llama.batch import ForwardBatch
from engines.llama.kv_cache import PagedKVCache
from engines.llama.linear import Linear
from engines.llama.rope import rope_tables
from engines.llama.spec import LlamaSpec
from engines.parallel.comm import ParallelComm
from engines.parallel.layout import ParallelLayout, ShardPlan


class RMSNorm(nn.Module):
    """HF's LlamaRMSNorm (the rounding is defined in engines.kernels.ops.TorchOps.rms_norm)."""

    def __init__(
        self, size: int, eps: float, dtype: torch.dtype, device: torch.device | str, ops: type[TorchOps]
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device), requires_grad=False)
        self.eps, self.ops = eps, ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) in one pass where the ops fuse it."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP block with fused qkv and gate_up projections."""

    def __init__(
        self,
        spec: LlamaSpec,
        dtype: torch.dtype,
        device: torch.device | str,
        ops: type[TorchOps] = TorchOps,
        comm: ParallelComm | None = None,
    ) -> None:
        """spec: this rank's part (its heads and MLP width); comm: all-reduces the row-parallel outputs."""
        super().__init__()
        hidden, inter = spec.hidden_size, spec.intermediate_size
        self.spec, self.ops, self.comm = spec, ops, comm or ParallelComm()
        self.input_norm = RMSNorm(hidden, spec.rms_norm_eps, dtype, device, ops)
        self.post_norm = RMSNorm(hidden, spec.rms_norm_eps, dtype, device, ops)
        self.qkv = Linear(hidden, spec.q_size + 2 * spec.kv_size, spec.qkv_bias, dtype, device)
        self.o_proj = Linear(spec.q_size, hidden, spec.o_bias, dtype, device)
        self.gate_up = Linear(hidden, 2 * inter, spec.mlp_bias, dtype, device)
        self.down = Linear(inter, hidden, spec.mlp_bias, dtype, device)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; writes this step's K/V into cache_k/cache_v.

        cos/sin [T, head_dim] are each token's rows of the rope tables, gathered once per step."""
        spec = self.spec
        qkv = self.qkv(self.input_norm(x))  # [T, q_size + 2 * kv_size]
        q = self.ops.rope_and_cache(
            qkv,
            cos,
            sin,
            batch.token_offsets,
            batch.token_blocks,
            spec.num_heads,
            spec.num_kv_heads,
            cache_k,
            cache_v,
        )  # [T, heads, head_dim]; k and v are in the cache now
        attended = self.o_proj(self.ops.attention(q, cache_k, cache_v, batch.meta).flatten(1))
        normed, h = self.post_norm.add_forward(self.comm.all_reduce(attended), x)  # h = x + attention
        return h + self.comm.all_reduce(self.down(self.ops.silu_mul(self.gate_up(normed))))

    def pack(self) -> bool:
        """Prepare the four projections' CPU fast path (see `Linear.pack`)."""
        packed = [self.qkv.pack(), self.o_proj.pack(), self.gate_up.pack(), self.down.pack()]
        return all(packed)


class LlamaModel(nn.Module):
    """Embeddings, decoder layers, final norm and LM head; `forward` serves one continuous-batching step."""

    def __init__(
        self,
        spec: LlamaSpec,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_model_len: int = 2048,
        ops: type[TorchOps] = TorchOps,
        plan: ShardPlan | None = None,
        comm: ParallelComm | None = None,
    ) -> None:
        """ops: the hot-path ops (engines.kernels.ops), plain torch by default; plan/comm: the part of the
        model this rank holds and its group (default: the whole model in one process)."""
        super().__init__()
        self.plan = plan or ShardPlan.build(spec, ParallelLayout())
        self.comm = comm or ParallelComm(self.plan.layout)
        self.full_spec, local = spec, self.plan.local
        self.spec, self.dtype, self.max_model_len = local, dtype, max_model_len
        self.device, self.ops = torch.device(device), ops
        self.embed_tokens: nn.Parameter | None = None
        self.norm: RMSNorm | None = None
        self.lm_head: Linear | None = None
        if self.plan.holds_embedding:
            embed = torch.empty(self.plan.vocab_shard, spec.hidden_size, dtype=dtype, device=device)
            self.embed_tokens = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(
            DecoderLayer(local, dtype, device, ops, self.comm) for _ in range(local.num_layers)
        )
        if self.plan.layout.last_stage:
            self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device, ops)
            self.lm_head = Linear(spec.hidden_size, self.plan.vocab_shard, False, dtype, device)
            if spec.tie_word_embeddings:
                self.lm_head.weight = self.embed_tokens
        cos, sin = rope_tables(spec, max_model_len, dtype, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_model_len, head_dim]
        self.register_buffer("rope_sin", sin, persistent=False)

    def make_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        """A paged cache shaped for this model: ``num_blocks`` blocks of ``block_size`` tokens."""
        spec, device = self.spec, self.device
        return PagedKVCache(
            spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim, self.dtype, device
        )

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, cache: PagedKVCache, rows: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Run one step; returns float32 logits [num_seqs, vocab] for each sequence's last new token,
        or for the packed token ``rows`` given (prompt log-probabilities need more than the last).

        Every rank of a parallel group calls this with the same batch; rank 0 gets the logits, the
        others None (or their copy)."""
        if max(batch.context_lens) > self.max_model_len:
            raise ValueError(f"A sequence exceeds max_model_len={self.max_model_len}")
        layout, comm = self.plan.layout, self.comm
        stages = layout.pipeline_parallel
        outputs, sends = [], []
        for micro in batch.split(stages) if stages > 1 else [batch]:
            if layout.first_stage:
                x = self.embed(micro.token_ids)  # [T, hidden]
            else:
                shape = (micro.token_ids.shape[0], self.full_spec.hidden_size)
                x = comm.recv(shape, self.dtype, self.device, layout.rank - layout.tensor_parallel)
            cos, sin = self.rope_cos[micro.positions], self.rope_sin[micro.positions]  # [T, head_dim], once
            for layer, cache_k, cache_v in zip(self.layers, cache.keys, cache.values, strict=True):
                x = layer(x, micro, cache_k, cache_v, cos, sin)
            if layout.last_stage:
                outputs.append(x)
            else:
                sends.append(comm.send(x, layout.rank + layout.tensor_parallel))
        for work in sends:
            work.wait()
        picked = batch.last_rows if rows is None else rows
        if not layout.last_stage:
            if layout.rank != 0:
                return None
            source = layout.stage_ranks(stages - 1)[0]
            return comm.recv((picked.shape[0], self.full_spec.vocab_size), torch.float32, self.device, source)
        x = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        logits = self.project(self.norm(x[picked]))  # [num_seqs, vocab]
        if stages > 1 and layout.tp_rank == 0:
            comm.send(logits, 0).wait()
        return logits

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[T] ids -> [T, hidden]; a vocabulary shard looks up its own rows and the group sums."""
        if self.plan.layout.tensor_parallel == 1:
            return functional.embedding(token_ids, self.embed_tokens)
        local = token_ids - self.plan.vocab_start
        outside = (local < 0) | (local >= self.plan.vocab_shard)
        x = functional.embedding(local.masked_fill(outside, 0), self.embed_tokens)
        return self.comm.all_reduce(x.masked_fill_(outside[:, None], 0))

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> float32 logits [n, vocab], gathering the vocabulary shards."""
        logits = self.comm.all_gather_last(self.lm_head(hidden).float())
        return logits[:, : self.full_spec.vocab_size] if self.plan.layout.tensor_parallel > 1 else logits

    def pin_attributes(self) -> None:
        """Copy every submodule and parameter into its owner's instance ``__dict__`` as well, once the
        model is final: reading ``self.qkv`` in the step loop then is a plain attribute read, not
        nn.Module.__getattr__'s fallback after a failed lookup (about 0.6 us each, 0.2 ms of a 4.4 ms
        int4 decode step on 2 cores). Registration is unchanged (state_dict, .parameters()), and
        nn.Module.__setattr__ drops the copy when an attribute is assigned again; ``del`` of a parameter
        or ``_apply`` replacing Parameter objects (torch's overwrite-on-conversion flag, off by default)
        would leave a stale copy, and nothing does either after loading."""
        for module in self.modules():
            module.__dict__.update(module._modules)
            module.__dict__.update((name, p) for name, p in module._parameters.items() if p is not None)

    def pack(self) -> bool:
        """Prepare every projection's CPU fast path once weights are loaded (the dense kernel, else
        oneDNN's packed copies); True if all have one.

        A tied LM head keeps the embedding (lookups need it): with oneDNN it costs one extra packed copy."""
        packed = [layer.pack() for layer in self.layers]  # every layer, even after a failure
        if self.lm_head is not None:
            packed.append(self.lm_head.pack(keep_weight=self.full_spec.tie_word_embeddings))
        return all(packed)
