"""Quantize a loaded native model's decoder projections in place (``option.quantize``).

q/k/v, o, gate/up and down of every layer become QuantizedLinear; the embedding and the norms keep the
model's dtype. The LM head becomes int8 too (``quantize_head``): it is the largest single matrix read per
decoded token (SmolLM2's is 40 % of the model); see there for which form.
Runs after loading and sharding (each rank quantizes its own slice) and before the remaining
projections get their CPU fast path (`LlamaModel.pack`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from engines.base import EngineLoadError
from engines.quant.linear import QuantizedLinear
from engines.quant.methods import (
    METHODS,
    Fp8Weight,
    Int8Weight,
    group_size_for,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    quantize_int8_blocks,
)

log = logging.getLogger("engines.quant")

PROJECTIONS = ("qkv", "o_proj", "gate_up", "down")


def check_method(method: str, device: torch.device) -> None:
    """EngineLoadError for a method this build cannot run on ``device``."""
    if method not in METHODS:
        raise EngineLoadError(f"option.quantize={method!r} is not one of {', '.join(METHODS)}")
    if method == "fp8" and device.type != "cuda":
        raise EngineLoadError(
            "option.quantize=fp8 needs a GPU with fp8 matmuls (Hopper or Ada); this model runs on the CPU. "
            "Fix: use option.quantize=int8 or int4 on CPUs."
        )
    if method == "fp8" and torch.cuda.get_device_capability(device) < (8, 9):
        raise EngineLoadError(
            f"option.quantize=fp8 needs fp8 tensor cores (compute capability 8.9 or later: Ada, Hopper); "
            f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}. "
            "Fix: use option.quantize=int8 or int4."
        )


DEFAULT_GROUP_SIZE = 128


def int4_group_size(model_path: str | Path, requested: int | None) -> int:
    """The int4 group size for ``model_path``: the one requested, else the 4-bit grid of the GGUF the
    weights were converted from (groups of 32: the default model ships as Q4_1), else 128.

    Regrouping a 4-bit grid of 32 into groups of 64 or 128 loses what the file holds: on the default
    model groups of 64 give a next-token KL of 0.36 against bf16, groups of 32 reproduce its blocks."""
    if requested is not None:
        return requested
    from engines.quant.gguf import four_bit_grid

    grid = four_bit_grid(Path(model_path))
    if grid is not None:
        log.info("int4 in groups of %d: the 4-bit blocks of the GGUF these weights came from", grid)
        return grid
    return DEFAULT_GROUP_SIZE


def quantize_model(model: Any, method: str, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, int]:
    """Replace every decoder projection of ``model``; returns {"before": bytes, "after": bytes}."""
    check_method(method, model.device)
    before = after = 0
    groups: set[int] = set()
    for layer in model.layers:
        for name in PROJECTIONS:
            linear = getattr(layer, name)
            weight = linear.weight.detach()
            before += weight.numel() * weight.element_size()
            if method == "int8":
                quantized = quantize_int8(weight)
            elif method == "fp8":
                quantized = fp8_weight(weight)
            else:
                try:
                    group = group_size_for(weight.shape[1], group_size)
                except ValueError as exc:
                    raise EngineLoadError(str(exc)) from exc
                groups.add(group)
                quantized = quantize_int4(weight, group)
            replacement = QuantizedLinear(quantized, linear.bias, model.dtype)
            after += replacement.weight_bytes()
            setattr(layer, name, replacement)
    if groups and groups != {group_size}:
        log.info(
            "int4 group sizes %s (option.quantize_group_size=%d does not divide every width)",
            sorted(groups),
            group_size,
        )
    log.info(
        "Quantized the decoder projections to %s: %.1f MiB -> %.1f MiB", method, before / 2**20, after / 2**20
    )
    return {"before": before, "after": after}


def fp8_weight(weight: torch.Tensor) -> Fp8Weight:
    """The projection in fp8; EngineLoadError for a width not in multiples of 16 (fp8 matmuls need it)."""
    if weight.shape[0] % 16 or weight.shape[1] % 16:
        raise EngineLoadError(
            f"option.quantize=fp8 needs widths in multiples of 16; a projection is {tuple(weight.shape)}. "
            "Fix: use option.quantize=int8."
        )
    return quantize_fp8(weight)


HEAD_ACTIVATION_BITS = 16
"""The LM head's activations go through the native kernel as int16, not int8: the head's outputs are
compared near ties, and 16 bits are finer than the bf16 activations themselves.

An int8 head alone, whatever its activations, is not enough for EIGHT_BIT models: on the default model
it took int8's top-1 agreement with bf16 from 95.2 % to 94.4 % with 8-bit activations and to 94.8 %
with 16-bit ones (lmi eval, 610 positions), under the 95 % bar either way. They get a RescoredHead
where the native kernel runs, and keep the float head elsewhere."""
EIGHT_BIT = {"int8", "fp8"}


def projection_methods(model: Any) -> set[str]:
    """The methods of the model's quantized decoder projections (empty when none is)."""
    found = (getattr(layer, name) for layer in model.layers for name in PROJECTIONS)
    return {module.method for module in found if isinstance(module, QuantizedLinear)}


def has_quantized_projections(model: Any) -> bool:
    return bool(projection_methods(model))


def rescoring_runs(weight: torch.Tensor) -> bool:
    """Whether a RescoredHead would run on the native kernel's tiles for this head weight: a CPU
    tensor, a kernel that builds, AVX-512 VNNI, and no other kernel forced by LMI_QUANT_KERNEL."""
    from engines.quant import kernels
    from engines.quant.linear import KERNEL_ENV

    if weight.device.type != "cpu" or os.environ.get(KERNEL_ENV, "auto").strip().lower() not in (
        "",
        "auto",
        "native",
    ):
        return False
    try:
        return bool(kernels.native_module().has_vnni())
    except Exception:  # noqa: BLE001 - KernelBuildError or a loader error: no native kernel here
        return False


def quantize_head(model: Any) -> None:
    """The LM head (this rank's vocabulary shard) as int8, when the model has one and its width takes
    blocks of 32. On CPUs with the native kernel an 8-bit model's head, and any tied head, becomes a
    RescoredHead (int8 logits, the top candidates rescored from the float weights, which a tied
    embedding keeps for lookups anyway); an untied head of a 4-bit model becomes int8 in blocks of 32
    with 16-bit activations. An 8-bit model elsewhere keeps its float head (HEAD_ACTIVATION_BITS)."""
    from engines.quant.head import RescoredHead

    head = model.lm_head
    if head is None or isinstance(head, (QuantizedLinear, RescoredHead)) or head.weight is None:
        return
    weight = head.weight.detach()
    if weight.shape[1] % 32:
        return
    eight_bit = projection_methods(model) <= EIGHT_BIT
    if (eight_bit or model.full_spec.tie_word_embeddings) and rescoring_runs(weight):
        rescored = RescoredHead(weight, head.bias, model.dtype)
        if rescored.approximate.tiles:
            model.lm_head = rescored
            log.info(
                "LM head as int8 (%.1f MiB), its top %d tokens a row rescored from the float weights",
                rescored.weight_bytes() / 2**20,
                rescored.candidates,
            )
            return
    if eight_bit:
        return  # see HEAD_ACTIVATION_BITS
    quantized: Int8Weight = quantize_int8_blocks(weight, 32)
    model.lm_head = QuantizedLinear(quantized, head.bias, model.dtype, HEAD_ACTIVATION_BITS)
    log.info("LM head as int8 in blocks of 32: %.1f MiB", model.lm_head.weight_bytes() / 2**20)
