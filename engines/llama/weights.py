"""Load a Llama/Mistral/Qwen2 safetensors checkpoint straight into `LlamaModel`'s fused parameters.

No transformers model is built: each tensor is read with `safe_open` and copied (converting dtype)
into its slice of the fused qkv / gate_up matrices, so peak memory is the model plus one tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engines.base import EngineLoadError
from engines.device import release_freed_memory
from engines.kernels.ops import TorchOps
from engines.llama.model import LlamaModel
from engines.llama.spec import SUPPORTED_ARCHITECTURES, SUPPORTED_MODEL_TYPES, LlamaSpec
from engines.parallel.comm import ParallelComm
from engines.parallel.layout import ParallelLayout, ShardPlan
from engines.parallel.shard import read_shard

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Old checkpoints saved these buffers; they are recomputed, never loaded."""


def load_llama(
    model_path: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    max_model_len: int = 2048,
    pack: bool = True,
    ops: type[TorchOps] = TorchOps,
    layout: ParallelLayout | None = None,
    comm: ParallelComm | None = None,
    quantize: str | None = None,
    group_size: int = 128,
) -> tuple[LlamaModel, Any]:
    """Model and the HF config; NotImplementedError if unsupported. (The KV cache is sized after
    loading, from the memory the weights left: `LlamaModel.make_cache`.)

    `pack` prepares the projections' CPU fast path (the dense kernel or oneDNN; see `linear.Linear.pack`);
    `ops` are the hot-path ops: plain torch, or the native CPU kernels (engines.kernels.ops); `layout`
    picks the part a rank of a parallel group loads (engines.parallel), reading only its slices;
    `quantize` (int8/int4) replaces the decoder projections with quantized ones (engines.quant); AWQ and
    GPTQ checkpoints, and `quantize="gguf"`, load them as stored (engines.quant.prequantized)."""
    directory = Path(model_path)
    check_supported(json.loads((directory / "config.json").read_text()), max_model_len)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    spec = LlamaSpec.from_hf(hf_config)
    plan = ShardPlan.build(spec, layout or ParallelLayout())
    model = LlamaModel(spec, dtype, device, max_model_len, ops, plan, comm)
    from engines.parallel.partition import Manifest, is_partitioned, load_partition
    from engines.quant.prequantized import is_projection_tensor, load_head, load_projections, open_source

    source = open_source(directory, quantize)  # AWQ/GPTQ checkpoints; the GGUF's blocks for quantize=gguf
    if source is not None:
        with closing(source):
            load_weights(model, directory, skip=is_projection_tensor)
            load_projections(model, source)
            load_head(model, source)
        quantize = None
    elif is_partitioned(directory):
        stored = Manifest.read(directory).quantize
        if stored and quantize and quantize != stored:
            raise EngineLoadError(
                f"{directory} holds {stored} weights; option.quantize={quantize} cannot re-quantize them. "
                f"Fix: drop option.quantize (or set it to {stored}), or quantize the original checkpoint."
            )
        quantize = None if stored else quantize
        later = bool(quantize or stored)  # projections quantized below, or an LM head to quantize
        load_partition(model, directory, pack=pack and not later)  # serves or packs from the file's own pages
        pack = pack and later
    else:
        load_weights(model, directory)
    if quantize:
        from engines.quant.apply import quantize_model

        quantize_model(model, quantize, group_size)
    from engines.quant.apply import has_quantized_projections, quantize_head

    if source is None and has_quantized_projections(model):
        quantize_head(model)  # the prequantized sources placed theirs
    if pack:
        model.pack()
    model.eval()
    model.pin_attributes()
    if model.device.type == "cpu":
        release_freed_memory()
    return model, hf_config


def check_supported(raw_config: dict[str, Any], max_model_len: int) -> None:
    """Raise NotImplementedError naming the architecture unless this engine computes it exactly."""
    architectures = raw_config.get("architectures") or []
    model_type = raw_config.get("model_type")
    name = architectures[0] if architectures else model_type
    if model_type not in SUPPORTED_MODEL_TYPES or not set(architectures) <= SUPPORTED_ARCHITECTURES:
        raise NotImplementedError(
            f"Architecture {name!r} (model_type {model_type!r}) is not supported by the native Llama engine; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    window = raw_config.get("sliding_window")
    uses_window = raw_config.get("use_sliding_window", model_type == "mistral")
    if uses_window and window is not None and window < max_model_len:
        raise NotImplementedError(
            f"{name} uses sliding-window attention (window {window} < max_model_len {max_model_len}), "
            "which the native Llama engine does not implement; lower max_model_len to at most the window"
        )


def load_weights(
    model: LlamaModel, directory: Path, skip: Callable[[str], bool] = lambda name: False
) -> None:
    """Fill every parameter of `model` from the `*.safetensors` files (all shards) in `directory`;
    tensors `skip` names are left to another loader (stored quantized projections)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors files in {directory}")
    targets = {name: target for name, target in weight_targets(model).items() if not skip(name)}
    plan: ShardPlan = model.plan
    pending = set(targets)
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if skip(name) or name.endswith(IGNORED_SUFFIXES):
                    continue
                if name == "lm_head.weight" and name not in targets:
                    continue  # a tied checkpoint may still store lm_head; the embedding is used
                if name not in targets and held_elsewhere(name, plan):
                    continue  # another pipeline stage's layer, embedding or head
                if name not in targets:
                    raise ValueError(
                        f"Unexpected tensor {name!r} in {file.name}: not a supported Llama layout"
                    )
                _copy_into(targets[name], read_shard(handle, name, plan), name)
                pending.discard(name)
    if pending:
        raise ValueError(f"Checkpoint {directory} lacks {len(pending)} tensors, e.g. {sorted(pending)[:3]}")


def _copy_into(target: tuple[torch.Tensor, int], tensor: torch.Tensor, name: str) -> None:
    destination, offset = target
    rows = destination.narrow(0, offset, tensor.shape[0])
    if rows.shape != tensor.shape:
        raise ValueError(f"Tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(rows.shape)}")
    rows.copy_(tensor)  # converts dtype and moves to the parameter's device


def weight_targets(model: LlamaModel) -> dict[str, tuple[torch.Tensor, int]]:
    """HF tensor name -> (our parameter, first row): fused matrices take several HF tensors each."""
    spec, plan = model.spec, model.plan
    targets: dict[str, tuple[torch.Tensor, int]] = {}
    if model.embed_tokens is not None:
        targets["model.embed_tokens.weight"] = (model.embed_tokens.data, 0)
    if model.norm is not None:
        targets["model.norm.weight"] = (model.norm.weight.data, 0)
    if model.lm_head is not None and not spec.tie_word_embeddings:
        targets["lm_head.weight"] = (model.lm_head.weight.data, 0)
    for index, layer in enumerate(model.layers):
        prefix = f"model.layers.{plan.hf_layer(index)}."
        parts = {
            "input_layernorm.weight": (layer.input_norm.weight, 0),
            "post_attention_layernorm.weight": (layer.post_norm.weight, 0),
            "self_attn.q_proj.weight": (layer.qkv.weight, 0),
            "self_attn.k_proj.weight": (layer.qkv.weight, spec.q_size),
            "self_attn.v_proj.weight": (layer.qkv.weight, spec.q_size + spec.kv_size),
            "self_attn.q_proj.bias": (layer.qkv.bias, 0),
            "self_attn.k_proj.bias": (layer.qkv.bias, spec.q_size),
            "self_attn.v_proj.bias": (layer.qkv.bias, spec.q_size + spec.kv_size),
            "self_attn.o_proj.weight": (layer.o_proj.weight, 0),
            "self_attn.o_proj.bias": (layer.o_proj.bias, 0),
            "mlp.gate_proj.weight": (layer.gate_up.weight, 0),
            "mlp.up_proj.weight": (layer.gate_up.weight, spec.intermediate_size),
            "mlp.gate_proj.bias": (layer.gate_up.bias, 0),
            "mlp.up_proj.bias": (layer.gate_up.bias, spec.intermediate_size),
            "mlp.down_proj.weight": (layer.down.weight, 0),
            "mlp.down_proj.bias": (layer.down.bias, 0),
        }
        targets.update(
            {prefix + key: (param.data, row) for key, (param, row) in parts.items() if param is not None}
        )
    return targets


def held_elsewhere(name: str, plan: ShardPlan) -> bool:
    """A tensor of the full model that another pipeline stage loads (never a misspelt name)."""
    parts = name.split(".")
    if name.startswith("model.layers.") and parts[2].isdigit():
        return (
            not plan.layer_start <= int(parts[2]) < plan.layer_stop and int(parts[2]) < plan.full.num_layers
        )
    return name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
