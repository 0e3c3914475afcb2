"""Checkpoints whose decoder projections are already quantized, served as they are stored.

An AWQ or GPTQ folder (config.json's ``quantization_config``), or with ``option.quantize=gguf`` the
GGUF file a folder's weights came from: each rank reads its projections' stored parts, cuts its
shard (rows of q/k/v and gate/up, whole groups of o_proj's and down's input columns), fuses q/k/v and
gate/up and computes with QuantizedLinear, as engines.quant.apply does after quantizing. Embeddings,
norms, biases and the LM head load as usual (engines.llama.weights), in the model's dtype.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import torch

from engines.base import EngineLoadError
from engines.parallel.layout import ShardPlan
from engines.parallel.shard import ROWS, split_rule
from engines.quant.apply import HEAD_ACTIVATION_BITS, PROJECTIONS, quantize_head
from engines.quant.awq import AwqFormat
from engines.quant.gptq import GptqFormat
from engines.quant.linear import QuantizedLinear
from engines.quant.parts import Part, for_kernels, fuse, shape, take_columns, take_rows, to_device

log = logging.getLogger("engines.quant")

PARTS = dict(
    zip(
        PROJECTIONS,
        [
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"),
            ("mlp.down_proj",),
        ],
        strict=True,
    )
)
"""Our fused projection -> the checkpoint modules stacked into it, in row order."""
MODULES = tuple(module for modules in PARTS.values() for module in modules)
STORED = ("weight", "qweight", "qzeros", "scales", "g_idx")
"""A projection's tensors other than its bias, in any of the formats."""
FORMATS = {"awq": AwqFormat, "gptq": GptqFormat}


class Source(Protocol):
    """Where the stored projections come from (PackedCheckpoint, engines.quant.gguf.GgufBlocks)."""

    def part(self, module: str) -> Part: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


class PackedCheckpoint:
    """An AWQ / GPTQ safetensors folder: each projection's packed tensors, unpacked on request."""

    def __init__(self, directory: Path, fmt: AwqFormat | GptqFormat) -> None:
        from safetensors import safe_open

        self.fmt = fmt
        self.files = ExitStack()
        self.handles: dict[str, Any] = {}
        for file in sorted(directory.glob("*.safetensors")):
            handle = self.files.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            self.handles.update(dict.fromkeys(handle.keys(), handle))

    def get(self, name: str) -> torch.Tensor | None:
        handle = self.handles.get(name)
        return None if handle is None else handle.get_tensor(name)

    def part(self, module: str) -> Part:
        if f"{module}.qweight" in self.handles:
            return self.fmt.unpack(self.get, module)
        weight = self.get(f"{module}.weight")  # a module the quantizer left alone (modules_to_not_convert)
        if weight is None:
            raise EngineLoadError(f"The {self.fmt.method.upper()} checkpoint lacks {module}.qweight")
        return weight

    def describe(self) -> str:
        return self.fmt.describe()

    def close(self) -> None:
        self.files.close()


def checkpoint_format(directory: Path) -> AwqFormat | GptqFormat | None:
    """The checked quantization of ``directory``'s config.json, or None for a float checkpoint."""
    config = json.loads((directory / "config.json").read_text()).get("quantization_config")
    if not config:
        return None
    method = str(config.get("quant_method", "")).lower()
    if method not in FORMATS:
        raise EngineLoadError(
            f"{directory / 'config.json'} has quantization_config.quant_method={method!r}; the native engine "
            "loads awq (gemm, 4-bit) and gptq (4-bit) checkpoints as they are stored. Fix: serve the "
            "unquantized checkpoint (option.quantize=int8 or int4 quantizes it at start-up)."
        )
    return FORMATS[method].from_config(config)


def open_source(directory: Path, quantize: str | None) -> Source | None:
    """The stored projections of ``directory`` (an AWQ/GPTQ folder, or its GGUF for quantize=gguf);
    None for a float checkpoint that option.quantize, if set, quantizes after loading."""
    fmt = checkpoint_format(directory)
    if fmt is not None:
        if quantize not in (None, fmt.method):
            raise EngineLoadError(
                f"The checkpoint is already {fmt.describe()}; option.quantize={quantize} cannot quantize it "
                "again. Fix: drop option.quantize."
            )
        return PackedCheckpoint(directory, fmt)
    if quantize == "gguf":
        from engines.quant.gguf import GgufBlocks, find_gguf

        return GgufBlocks(find_gguf(directory))
    return None


def is_projection_tensor(name: str) -> bool:
    """A decoder projection's stored weight tensor (not its bias): the source loads those."""
    module, _, leaf = name.rpartition(".")
    return leaf in STORED and module.startswith("model.layers.") and module.endswith(MODULES)


def load_projections(model: Any, source: Source) -> None:
    """Replace every decoder projection of ``model`` (this rank's part) with the stored one."""
    plan: ShardPlan = model.plan
    for index, layer in enumerate(model.layers):
        prefix = f"model.layers.{plan.hf_layer(index)}."
        for name, modules in PARTS.items():
            parts = [rank_part(source, prefix + module, plan) for module in modules]
            install(layer, name, fuse(parts, prefix + name), model, prefix + name)
    log.info("Serving the decoder projections as stored: %s", source.describe())


def load_head(model: Any, source: Source) -> None:
    """The LM head as the source stores it: a GGUF's quantized blocks as they are (one rank), or int8 in
    blocks of 32 from the float weights (quantize_head) for AWQ/GPTQ, whose heads are stored as floats,
    and for a quantized GGUF head under tensor parallelism; a GGUF's float head stays float."""
    read = getattr(source, "head", None)
    if read is None:
        quantize_head(model)
        return
    stored = read()
    if stored is None or model.lm_head is None:
        return
    exact = model.plan.layout.tensor_parallel == 1 and not isinstance(stored, torch.Tensor)
    if exact and shape(stored)[0] == model.lm_head.weight.shape[0]:
        model.lm_head = QuantizedLinear(
            to_device(stored, model.device), None, model.dtype, HEAD_ACTIVATION_BITS
        )
    else:
        quantize_head(model)


def rank_part(source: Source, module: str, plan: ShardPlan) -> Part:
    """This rank's part of one checkpoint projection (engines.parallel.shard's rule for its weight), in
    groups the int4 kernels take."""
    part = for_kernels(source.part(module), module)
    if plan.layout.tensor_parallel == 1:
        return part
    how, start, stop = split_rule(f"{module}.weight", plan)
    if how == ROWS:
        return take_rows(part, slice(start, stop))
    return take_columns(part, start, stop, module)


def install(layer: Any, name: str, part: Part, model: Any, module: str) -> None:
    """``part`` as ``layer``'s projection ``name``: a QuantizedLinear, or the float weight copied in."""
    linear = getattr(layer, name)
    expected = tuple(linear.weight.shape)
    if shape(part) != expected:
        raise EngineLoadError(f"{module}: the stored weight is {shape(part)}, the model expects {expected}")
    if isinstance(part, torch.Tensor):
        linear.weight.data.copy_(part)
        return
    setattr(layer, name, QuantizedLinear(to_device(part, model.device), linear.bias, model.dtype))
