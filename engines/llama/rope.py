"""Rotary position embeddings: cos/sin tables computed once up to max_model_len, then only indexed.

The frequencies follow transformers' `modeling_rope_utils` (default, linear and llama3 variants) and
are computed in float32 before casting, as HF does, so results match HF bit-for-bit in fp32.
"""

from __future__ import annotations

import math

import torch

from engines.llama.spec import LlamaSpec


def inverse_frequencies(spec: LlamaSpec) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies for the spec's rope type."""
    dim = spec.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (spec.rope_theta**exponents)
    rope_type = spec.rope.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / float(spec.rope["factor"])
    if rope_type == "llama3":
        return _llama3_scaling(inv_freq, spec.rope)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    """Llama 3.1 long-context scaling: low frequencies divided by `factor`, a smooth ramp between."""
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(
    spec: LlamaSpec, max_len: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [max_len, head_dim] in `dtype` (the two halves repeat, as HF's `cat((f, f))`)."""
    inv_freq = inverse_frequencies(spec)
    positions = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # [max_len, head_dim // 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, head_dim]
    return emb.cos().to(dtype=dtype, device=device), emb.sin().to(dtype=dtype, device=device)
