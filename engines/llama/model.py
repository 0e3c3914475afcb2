"""A LlamaForCausalLM-compatible decoder for continuous batching over a `SlotKVCache`.

All projections, norms and MLPs run once over the packed [T, hidden] tokens of every sequence in the
step (prefill chunks and decode tokens alike); only attention looks at per-sequence structure. q/k/v
and gate/up are fused into single matmuls, and logits are computed only for each sequence's last token.
Parameters are allocated uninitialised: `weights.load_llama` fills every one of them, then packs them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from engines.kernels.decode_attention import DecodeAttention
from engines.llama.attention import attend, write_kv
from engines.llama.batch import ForwardBatch
from engines.llama.kv_cache import SlotKVCache
from engines.llama.linear import Linear
from engines.llama.rope import apply_rope, rope_tables
from engines.llama.spec import LlamaSpec


class RMSNorm(nn.Module):
    """HF's LlamaRMSNorm: normalise in float32, cast back, then scale (same rounding as HF)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = functional.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP block with fused qkv and gate_up projections."""

    def __init__(
        self,
        spec: LlamaSpec,
        dtype: torch.dtype,
        device: torch.device | str,
        decode_kernel: DecodeAttention | None = None,
    ) -> None:
        super().__init__()
        hidden, inter = spec.hidden_size, spec.intermediate_size
        self.spec, self.decode_kernel = spec, decode_kernel
        self.input_norm = RMSNorm(hidden, spec.rms_norm_eps, dtype, device)
        self.post_norm = RMSNorm(hidden, spec.rms_norm_eps, dtype, device)
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
        """x [T, hidden] -> [T, hidden]; writes this step's K/V into cache_k/cache_v."""
        h = x + self._attention(self.input_norm(x), batch, cache_k, cache_v, cos, sin)
        gate, up = self.gate_up(self.post_norm(h)).chunk(2, dim=-1)  # [T, intermediate] each
        return h + self.down(functional.silu(gate) * up)

    def _attention(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        spec, tokens = self.spec, x.shape[0]
        qkv = self.qkv(x)  # [T, q_size + 2 * kv_size]
        # q and k rotate together: [T, heads + kv_heads, head_dim]
        qk = apply_rope(qkv[:, : spec.q_size + spec.kv_size].view(tokens, -1, spec.head_dim), cos, sin)
        v = qkv[:, spec.q_size + spec.kv_size :].view(tokens, spec.num_kv_heads, spec.head_dim)
        write_kv(cache_k, cache_v, batch, qk[:, spec.num_heads :], v)
        out = attend(qk[:, : spec.num_heads], cache_k, cache_v, batch, self.decode_kernel)
        return self.o_proj(out)  # [T, hidden]

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
        decode_kernel: DecodeAttention | None = None,
    ) -> None:
        """decode_kernel: see engines.kernels.decode_attention; None uses batched SDPA."""
        super().__init__()
        self.spec, self.dtype, self.max_model_len = spec, dtype, max_model_len
        embed = torch.empty(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device)
        self.embed_tokens = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, dtype, device, decode_kernel) for _ in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, False, dtype, device)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens
        cos, sin = rope_tables(spec, max_model_len, dtype, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_model_len, head_dim]
        self.register_buffer("rope_sin", sin, persistent=False)

    def make_cache(self, num_slots: int) -> SlotKVCache:
        """A cache shaped for this model, with `num_slots` sequences of up to max_model_len tokens."""
        spec, device = self.spec, self.embed_tokens.device
        return SlotKVCache(
            spec.num_layers,
            num_slots,
            self.max_model_len,
            spec.num_kv_heads,
            spec.head_dim,
            self.dtype,
            device,
        )

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: SlotKVCache) -> torch.Tensor:
        """Run one step; returns float32 logits [num_seqs, vocab] for each sequence's last new token."""
        if max(batch.context_lens) > self.max_model_len:
            raise ValueError(f"A sequence exceeds max_model_len={self.max_model_len}")
        x = functional.embedding(batch.token_ids, self.embed_tokens)  # [T, hidden]
        cos = self.rope_cos[batch.positions].unsqueeze(1)  # [T, 1, head_dim]
        sin = self.rope_sin[batch.positions].unsqueeze(1)
        for layer, cache_k, cache_v in zip(self.layers, cache.keys, cache.values, strict=True):
            x = layer(x, batch, cache_k, cache_v, cos, sin)
        last = self.norm(x[batch.last_rows])  # [num_seqs, hidden]
        return self.lm_head(last).float()

    def pack(self) -> bool:
        """Pre-pack every projection for oneDNN once weights are loaded; True if all were packed.

        A tied LM head keeps the embedding (lookups need it), so it costs one extra packed copy."""
        packed = [layer.pack() for layer in self.layers]  # every layer, even after a failure
        packed.append(self.lm_head.pack(keep_weight=self.spec.tie_word_embeddings))
        return all(packed)
