"""A LlamaForCausalLM-compatible decoder for continuous batching over a `PagedKVCache`.

All projections, norms and MLPs run once over the packed [T, hidden] tokens of every sequence in the
step (prefill chunks and decode tokens alike); only attention looks at per-sequence structure. q/k/v
and gate/up are fused into single matmuls, and logits are computed only for each sequence's last token.
Parameters are allocated uninitialised: `weights.load_llama` fills every one of them, then packs them.
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
    ) -> None:
        super().__init__()
        hidden, inter = spec.hidden_size, spec.intermediate_size
        self.spec, self.ops = spec, ops
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
        normed, h = self.post_norm.add_forward(attended, x)  # h = x + attention
        return h + self.down(self.ops.silu_mul(self.gate_up(normed)))

    def pack(self) -> bool:
        """Pre-pack the four projections for oneDNN (see `Linear.pack`)."""
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
    ) -> None:
        """ops: the hot-path ops (engines.kernels.ops), plain torch by default."""
        super().__init__()
        self.spec, self.dtype, self.max_model_len = spec, dtype, max_model_len
        embed = torch.empty(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device)
        self.embed_tokens = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(spec, dtype, device, ops) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device, ops)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, False, dtype, device)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens
        cos, sin = rope_tables(spec, max_model_len, dtype, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_model_len, head_dim]
        self.register_buffer("rope_sin", sin, persistent=False)

    def make_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        """A paged cache shaped for this model: ``num_blocks`` blocks of ``block_size`` tokens."""
        spec, device = self.spec, self.embed_tokens.device
        return PagedKVCache(
            spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim, self.dtype, device
        )

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, cache: PagedKVCache, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run one step; returns float32 logits [num_seqs, vocab] for each sequence's last new token,
        or for the packed token ``rows`` given (prompt log-probabilities need more than the last)."""
        if max(batch.context_lens) > self.max_model_len:
            raise ValueError(f"A sequence exceeds max_model_len={self.max_model_len}")
        x = functional.embedding(batch.token_ids, self.embed_tokens)  # [T, hidden]
        cos, sin = self.rope_cos[batch.positions], self.rope_sin[batch.positions]  # [T, head_dim], once
        for layer, cache_k, cache_v in zip(self.layers, cache.keys, cache.values, strict=True):
            x = layer(x, batch, cache_k, cache_v, cos, sin)
        last = self.norm(x[batch.last_rows if rows is None else rows])  # [num_seqs, hidden]
        return self.lm_head(last).float()

    def pack(self) -> bool:
        """Pre-pack every projection for oneDNN once weights are loaded; True if all were packed.

        A tied LM head keeps the embedding (lookups need it), so it costs one extra packed copy."""
        packed = [layer.pack() for layer in self.layers]  # every layer, even after a failure
        packed.append(self.lm_head.pack(keep_weight=self.spec.tie_word_embeddings))
        return all(packed)
