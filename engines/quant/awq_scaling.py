"""Activation-aware scaling before quantization (the idea of AWQ, Lin et al. 2023), for ``lmi quantize
--calibration FILE``.

A few input channels of each projection carry much larger activations than the rest, and the weights
they multiply matter most. Multiplying those weight columns by s > 1 before quantizing (so they round
more finely) and dividing the activations by s keeps the float function and shrinks the quantization
error. The division is folded into what produces the activations, so nothing changes at serving time:
q/k/v and gate/up take it in the RMSNorm weight before them, down takes it in the rows of up (its
input is silu(gate) * up), and o_proj in the rows of v when every head has its own KV head (with
grouped KV heads a v row feeds several o_proj columns, so o_proj is left as it is).

Per projection, s = mean|x|^alpha over the calibration activations (normalised to a geometric mean
of 1), with alpha chosen from a grid to minimise || X Q(W s)^T / s - X W^T ||^2; alpha = 0 is plain
quantization, so the scaled model is never worse on the calibration rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from engines.quant.methods import Int4Weight, Int8Weight, group_size_for, quantize_int4, quantize_int8

log = logging.getLogger("engines.quant")

ALPHAS = tuple(i / 20 for i in range(21))
MAX_ROWS = 2048
"""Calibration rows per projection kept for the loss (sampled with a fixed seed)."""
WINDOW = 256
"""Tokens per calibration forward pass."""


def calibration_windows(tokenizer: Any, text: str, max_tokens: int = 4096) -> list[list[int]]:
    """The text's first ``max_tokens`` tokens in windows of WINDOW (ValueError when too short)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    if len(ids) < 16:
        raise ValueError(f"the calibration text has {len(ids)} tokens; give at least a paragraph (256+)")
    return [ids[start : start + WINDOW] for start in range(0, len(ids), WINDOW) if len(ids) - start >= 2]


@torch.no_grad()
def collect_inputs(model: Any, windows: list[list[int]]) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, projection) -> float32 [rows, in] inputs of qkv, o_proj, gate_up and down on ``windows``."""
    from engines.evaluate.quality import position_log_probs

    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    for index, layer in enumerate(model.layers):
        for name in ("qkv", "o_proj", "gate_up", "down"):

            def keep(_module: Any, args: tuple, key: tuple[int, str] = (index, name)) -> None:
                seen.setdefault(key, []).append(args[0].detach().float().reshape(-1, args[0].shape[-1]))

            hooks.append(getattr(layer, name).register_forward_pre_hook(keep))
    try:
        for ids in windows:
            position_log_probs(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    generator = torch.Generator().manual_seed(0)
    inputs = {}
    for key, parts in seen.items():
        rows = torch.cat(parts)
        if rows.shape[0] > MAX_ROWS:
            rows = rows[torch.randperm(rows.shape[0], generator=generator)[:MAX_ROWS]]
        inputs[key] = rows
    return inputs


def quantizer(method: str, group_size: int) -> Callable[[torch.Tensor], Int8Weight | Int4Weight]:
    """The quantization the checkpoint will store (engines.quant.storage), as a function of the weight."""
    if method == "int8":
        return quantize_int8
    return lambda weight: quantize_int4(weight, group_size_for(weight.shape[1], group_size))


def best_scales(
    weight: torch.Tensor, inputs: torch.Tensor, quantize: Callable[[torch.Tensor], Any]
) -> tuple[torch.Tensor, float, float]:
    """(s [in], the loss with s, the loss of plain quantization) for ``weight`` [out, in]."""
    w = weight.float()
    reference = inputs @ w.T
    mean = inputs.abs().mean(dim=0).clamp(min=1e-6)
    best: tuple[float, torch.Tensor] | None = None
    plain = 0.0
    for alpha in ALPHAS:
        s = mean.pow(alpha)
        s = s / s.log().mean().exp()  # geometric mean 1: the weights' overall range stays put
        effective = quantize(w * s).dequantize() / s
        loss = (inputs @ effective.T - reference).pow(2).mean().item()
        plain = loss if alpha == 0 else plain
        if best is None or loss < best[0]:
            best = (loss, s)
    assert best is not None
    return best[1], best[0], plain


@torch.no_grad()
def scale_for_quantization(model: Any, windows: list[list[int]], method: str, group_size: int) -> dict:
    """Scale ``model``'s projections in place for ``method`` (the float function is unchanged up to
    rounding); returns {"projections": scaled, "loss_ratio": mean loss with / without scaling}."""
    inputs = collect_inputs(model, windows)
    quantize = quantizer(method, group_size)
    ratios = []
    for index, layer in enumerate(model.layers):
        for name in foldable(layer):
            s, loss, plain = best_scales(getattr(layer, name).weight, inputs[(index, name)], quantize)
            fold_scales(layer, name, s)
            ratios.append(loss / plain if plain > 0 else 1.0)
    ratio = sum(ratios) / max(len(ratios), 1)
    log.info("Activation-aware scaling: %d projections, quantization loss x%.3f", len(ratios), ratio)
    return {"projections": len(ratios), "loss_ratio": ratio}


def foldable(layer: Any) -> tuple[str, ...]:
    """The projections whose input scaling can be folded into what feeds them (see the module's doc)."""
    spec = layer.spec
    return ("qkv", "gate_up", "down") + (("o_proj",) if spec.num_heads == spec.num_kv_heads else ())


@torch.no_grad()
def fold_scales(layer: Any, name: str, s: torch.Tensor) -> None:
    """Multiply projection ``name``'s input columns by ``s`` and divide its input by ``s`` upstream."""
    linear, spec = getattr(layer, name), layer.spec
    linear.weight.mul_(s.to(linear.weight.dtype)[None, :])
    if name == "qkv":
        _divide(layer.input_norm.weight, s)
    elif name == "gate_up":
        _divide(layer.post_norm.weight, s)
    elif name == "down":
        _divide_rows(layer.gate_up, spec.intermediate_size, s)  # up's rows follow gate's
    elif name == "o_proj" and spec.num_heads == spec.num_kv_heads:
        _divide_rows(layer.qkv, spec.q_size + spec.kv_size, s)  # v's rows follow q's and k's
    else:
        raise ValueError(f"cannot fold scales into the input of {name}")


def _divide(weight: torch.Tensor, s: torch.Tensor) -> None:
    weight.div_(s.to(weight.dtype))


def _divide_rows(linear: Any, start: int, s: torch.Tensor) -> None:
    """Rows start..start+len(s) of ``linear`` (and its bias) divided by s: its outputs there shrink by s."""
    rows = slice(start, start + s.shape[0])
    linear.weight[rows].div_(s.to(linear.weight.dtype)[:, None])
    if linear.bias is not None:
        linear.bias[rows].div_(s.to(linear.bias.dtype))
