"""The handful of numbers the native Llama model needs, read once from a transformers config.

Reading the HF config in one place keeps model code free of `getattr` fallbacks and lets the
differences between Llama, Mistral and Qwen2 (biases, rope settings) be decided up front.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
SUPPORTED_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})
SUPPORTED_ROPE_TYPES = frozenset({"default", "linear", "llama3"})


@dataclass(frozen=True)
class LlamaSpec:
    """Shapes and options of a LlamaForCausalLM-style decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope: dict[str, Any] = field(default_factory=dict)
    """The rope parameters as in the config ("rope_type", "factor", ...)."""
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, config: Any) -> LlamaSpec:
        """Read a transformers Llama/Mistral/Qwen2 config (4.x or 5.x layout)."""
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"hidden_act {act!r} is not supported by the native Llama engine")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        is_qwen2 = getattr(config, "model_type", "") == "qwen2"
        rope = rope_parameters(config)
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=float(rope["rope_theta"]),
            rope=rope,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=attention_bias or is_qwen2,  # Qwen2 always has q/k/v biases, never an o bias
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )


def rope_parameters(config: Any) -> dict[str, Any]:
    """Rope settings merged from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4.x)."""
    merged: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
    if getattr(config, "rope_theta", None) is not None:
        merged["rope_theta"] = config.rope_theta
    for source in (getattr(config, "rope_scaling", None), getattr(config, "rope_parameters", None)):
        if isinstance(source, dict):
            merged.update({key: value for key, value in source.items() if value is not None})
    if "type" in merged and merged.get("rope_type", "default") == "default":
        merged["rope_type"] = merged["type"]  # old-style {"type": "linear", ...}
    if merged["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"rope_type {merged['rope_type']!r} is not supported by the native Llama engine "
            f"(supported: {', '.join(sorted(SUPPORTED_ROPE_TYPES))})"
        )
    return merged
