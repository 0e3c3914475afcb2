"""Quantized projections in a checkpoint (``lmi quantize``, ``lmi partition --quantize``): a portable
form, not the kernels' packed layout (which belongs to one torch build).

Per decoder projection ``layers.{i}.{proj}``: ``.qweight`` (int8 [n, k], or int4 two per byte [n, k/2]:
low nibble the even column), ``.scale`` and, for int4, ``.minimum`` ([n, k/group]: the group size is
their width); ``.bias`` stays as it is.
"""

from __future__ import annotations

from typing import Any

import torch

from engines.base import EngineLoadError
from engines.quant.apply import PROJECTIONS
from engines.quant.linear import QuantizedLinear
from engines.quant.methods import Int4Weight, Int8Weight, group_size_for, quantize_int4, quantize_int8


def projection_names(model: Any) -> list[str]:
    return [f"layers.{i}.{name}" for i in range(len(model.layers)) for name in PROJECTIONS]


def quantized_state(model: Any, method: str, group_size: int) -> dict[str, torch.Tensor]:
    """The model's parameters with every projection weight replaced by its quantized tensors."""
    state = {name: param.detach().contiguous() for name, param in model.named_parameters()}
    for prefix in projection_names(model):
        weight = state.pop(f"{prefix}.weight")
        if method == "int8":
            quantized = quantize_int8(weight)
            state[f"{prefix}.qweight"], state[f"{prefix}.scale"] = quantized.q, quantized.scale
            continue
        try:
            quantized = quantize_int4(weight, group_size_for(weight.shape[1], group_size))
        except ValueError as exc:
            raise EngineLoadError(str(exc)) from exc
        q = quantized.q
        state[f"{prefix}.qweight"] = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
        state[f"{prefix}.scale"], state[f"{prefix}.minimum"] = quantized.scale, quantized.minimum
    return state


def restore_projections(model: Any, handle: Any, method: str) -> set[str]:
    """Replace the model's projections with QuantizedLinear built from ``handle`` (an open safe_open);
    returns the tensor names used."""
    used: set[str] = set()
    names = set(handle.keys())
    for prefix in projection_names(model):
        layer_index, name = prefix.split(".")[1], prefix.split(".")[2]
        keys = [f"{prefix}.qweight", f"{prefix}.scale"] + ([f"{prefix}.minimum"] if method == "int4" else [])
        missing = [key for key in keys if key not in names]
        if missing:
            raise EngineLoadError(f"The quantized checkpoint lacks {missing[0]} ({method})")
        tensors = [handle.get_tensor(key) for key in keys]
        if method == "int8":
            weight: Int8Weight | Int4Weight = Int8Weight(tensors[0], tensors[1].float())
        else:
            packed, scale, minimum = tensors
            q = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
            weight = Int4Weight(q, scale.float(), minimum.float(), q.shape[1] // scale.shape[1])
        bias_key = f"{prefix}.bias"
        bias = handle.get_tensor(bias_key) if bias_key in names else None
        layer = model.layers[int(layer_index)]
        old = getattr(layer, name)
        if weight.q.shape[0] != old.weight.shape[0] or weight.q.shape[1] != old.weight.shape[1]:
            raise EngineLoadError(f"{prefix}: quantized shape {tuple(weight.q.shape)} does not fit the model")
        setattr(layer, name, QuantizedLinear(weight, bias, model.dtype))
        used.update(keys + ([bias_key] if bias is not None else []))
    return used
