"""Ahead-of-time partitioned checkpoints: one safetensors file per rank plus a manifest.

Sharding at start-up makes every rank walk the whole checkpoint (slicing what it needs, converting
dtypes, fusing q/k/v and gate/up); a partition stores each rank's part already fused, in the serving
dtype, contiguous and in the order the rank loads it (the tensors it copies, then the projection weights
in packing order). A rank maps its one file, has the kernel read it ahead from the start, and serves
the projection weights from the file's pages (the dense kernel) or has oneDNN pack them straight from
there. The manifest
(``lmi-partition.json``) records the source, the degrees, the dtype and each file's size and SHA-256,
so a folder partitioned for other degrees, or a truncated file, is refused at start-up with the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engines.base import EngineLoadError
from engines.parallel.layout import ParallelLayout
from engines.parallel.rank_file import (
    file_sha256,
    populate,
    read_ahead,
    read_header,
    save_in_order,
    view_tensor,
)

log = logging.getLogger("engines.parallel")

MANIFEST = "lmi-partition.json"
FORMAT_VERSION = 1
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "serving.properties",
)
"""Everything beside the weights that serving the partition needs (those the source has)."""


@dataclass
class RankFile:
    rank: int
    file: str
    bytes: int
    sha256: str


@dataclass
class Manifest:
    tensor_parallel_degree: int
    pipeline_parallel_degree: int
    dtype: str
    source: str
    source_sha256: str
    """Hash of the source's config and safetensors headers: which checkpoint this was cut from."""
    files: list[RankFile] = field(default_factory=list)
    format: int = FORMAT_VERSION
    quantize: str | None = None
    """int8 / int4: the decoder projections are stored quantized (engines.quant.storage)."""
    group_size: int | None = None
    calibration_sha256: str | None = None
    """The calibration text's hash when activation-aware scaling was applied (engines.quant.awq_scaling)."""

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        try:
            raw = json.loads((directory / MANIFEST).read_text())
            raw["files"] = [RankFile(**item) for item in raw["files"]]
            manifest = cls(**raw)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise EngineLoadError(f"{directory / MANIFEST} is not a valid partition manifest: {exc}") from exc
        if manifest.format != FORMAT_VERSION:
            raise EngineLoadError(
                f"{directory / MANIFEST} has format {manifest.format}; this build reads {FORMAT_VERSION}"
            )
        return manifest

    def write(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(asdict(self), indent=2) + "\n")


def rank_file_name(rank: int, world: int) -> str:
    return f"rank-{rank:03d}-of-{world:03d}.safetensors"


def is_partitioned(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def partition_degrees(directory: str | Path) -> tuple[int, int] | None:
    """(tensor, pipeline) degrees a folder was partitioned for, or None for a plain checkpoint."""
    if not is_partitioned(directory):
        return None
    manifest = Manifest.read(Path(directory))
    return manifest.tensor_parallel_degree, manifest.pipeline_parallel_degree


def check_layout(manifest: Manifest, layout: ParallelLayout, directory: Path) -> None:
    """EngineLoadError when the requested degrees differ from the partition's."""
    have = (manifest.tensor_parallel_degree, manifest.pipeline_parallel_degree)
    want = (layout.tensor_parallel, layout.pipeline_parallel)
    if have != want:
        raise EngineLoadError(
            f"{directory} is partitioned for tensor_parallel_degree={have[0]}, pipeline_parallel_degree="
            f"{have[1]}, but this server runs {layout.describe()}. Fix: set the degrees to the partition's, "
            f"or partition again: lmi partition --model-dir {manifest.source} --tensor-parallel-degree "
            f"{want[0]} --pipeline-parallel-degree {want[1]} --output DIR"
        )


def partition_dtype(manifest: Manifest, requested: Any, explicit: bool) -> Any:
    """The dtype to serve a partition in: the requested one when the partition holds it exactly (the
    same dtype, or fp32 to convert down); option.dtype=auto falls back to the partition's; an explicit
    dtype the stored weights cannot give (bf16 weights served as fp32) is refused."""
    import torch

    stored = getattr(torch, manifest.dtype)
    if requested == stored or stored == torch.float32:
        return requested
    if not explicit:
        return stored
    name = str(requested).removeprefix("torch.")
    raise EngineLoadError(
        f"The partition stores {manifest.dtype} weights; option.dtype={name} would serve rounded weights "
        f"as if they were {name}. Fix: set option.dtype={manifest.dtype} (or auto), or partition again "
        f"with --dtype {name}."
    )


def load_partition(model: Any, directory: Path, pack: bool = False) -> None:
    """Fill ``model`` (one rank's LlamaModel) from its rank file; only that file is read.

    The file is mapped copy-on-write and a thread has the kernel read it ahead from its start, so the
    disk works while this rank computes. With ``pack`` on a CPU the projection weights are not copied:
    where the dense kernel runs (engines/llama/linear.py) they are served from the mapped pages, made
    resident before this returns; elsewhere they alias the pages until ``model.pack()`` reorders them
    into oneDNN's blocked copies. Everything else (and a weight pack declines) is copied. A served
    mapping keeps the file's pages shared with the page cache (no second copy in memory) and survives
    the file being deleted or replaced by a rename (as ``lmi partition`` and downloads write), not it
    being overwritten in place: the rank then serves the new bytes, or faults (SIGBUS) on pages a
    truncation removed and its group restarts."""
    manifest = Manifest.read(directory)
    layout = model.plan.layout
    check_layout(manifest, layout, directory)
    partition_dtype(manifest, model.dtype, explicit=True)
    path = _rank_path(manifest, layout.rank, directory)
    with path.open("rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        read_ahead(os.dup(file.fileno()), len(mapped))
    tensors = read_header(mapped, path)
    names = set(tensors)
    if manifest.quantize:
        from safetensors import safe_open

        from engines.quant.storage import restore_projections

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names -= restore_projections(model, handle, manifest.quantize)
    params = {name: p for name, p in model.named_parameters() if not _in_quantized(model, name)}
    if names != set(params):
        missing, extra = sorted(set(params) - names), sorted(names - set(params))
        raise EngineLoadError(
            f"{path} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    aliased = _fill(params, mapped, tensors, _prepared_weights(model) if pack else {}, path)
    if pack:
        model.pack()
    served = []
    for linear, (start, end) in aliased.items():
        if linear.dense is not None:
            served.append((start, end))  # the dense kernel reads the mapped pages as they are
        elif linear.weight is not None:  # pack declined this one: own a copy rather than the file's pages
            linear.weight.data = linear.weight.data.clone()
    if served:  # one run of bytes: the projection weights are stored last (load_order)
        populate(mapped, min(start for start, _ in served), max(end for _, end in served))
    # No close(): the mapping goes with its last view (torch.frombuffer holds a reference), on return at
    # the latest; closing it under a live view would unmap that view's memory.


def _rank_path(manifest: Manifest, rank: int, directory: Path) -> Path:
    """This rank's file, after checking that it has the size the manifest recorded."""
    entry = next((f for f in manifest.files if f.rank == rank), None)
    if entry is None:
        raise EngineLoadError(f"{directory / MANIFEST} lists no file for rank {rank}")
    path = directory / entry.file
    size = path.stat().st_size if path.is_file() else -1
    if size != entry.bytes:
        raise EngineLoadError(
            f"{path} is {'missing' if size < 0 else f'{size} bytes'}, the manifest says {entry.bytes} bytes: "
            "the partition is incomplete or corrupt. Fix: copy or partition it again."
        )
    return path


def _prepared_weights(model: Any) -> dict[str, Any]:
    """Parameter name -> its Linear, for the weights ``model.pack()`` prepares: served from the file's
    pages by the dense kernel, or replaced by oneDNN's packed copies (none off the CPU, or where
    neither runs)."""
    from engines.llama.linear import Linear, dense_kernel, mkldnn_packing_available

    if model.device.type != "cpu" or (dense_kernel(model.dtype) is None and not mkldnn_packing_available()):
        return {}
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, Linear)}


def _fill(
    params: dict[str, Any], mapped: mmap.mmap, tensors: dict, packed: dict[str, Any], path: Path
) -> dict[Any, tuple[int, int]]:
    """Copy each stored tensor into its parameter, or let the ``packed`` ones alias the mapping when
    they need no conversion; returns the Linear layers whose weight aliases it, with its bytes' span."""
    aliased = {}
    for name, param in params.items():
        stored = view_tensor(mapped, *tensors[name], f"{path}: {name}")
        if stored.shape != param.shape:
            raise EngineLoadError(
                f"{path}: {name} has shape {tuple(stored.shape)}, expected {tuple(param.shape)}"
            )
        if name in packed and stored.dtype == param.dtype:
            param.data = stored
            aliased[packed[name]] = (tensors[name][2], tensors[name][3])
        else:
            param.data.copy_(stored)  # converts dtype (an fp32 partition served in bf16) and moves
    return aliased


def _in_quantized(model: Any, name: str) -> bool:
    """A parameter of a projection restored quantized (its bias came with it)."""
    from engines.quant.linear import QuantizedLinear

    module_name = name.rpartition(".")[0]
    return bool(module_name) and isinstance(model.get_submodule(module_name), QuantizedLinear)


def source_hash(source: Path) -> str:
    """SHA-256 over config.json and every safetensors file's name, size and header (cheap, not the data)."""
    digest = hashlib.sha256((source / "config.json").read_bytes())
    for file in sorted(source.glob("*.safetensors")):
        with file.open("rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            digest.update(file.name.encode() + file.stat().st_size.to_bytes(8, "little"))
            digest.update(handle.read(min(header_len, 100_000_000)))
    return digest.hexdigest()


def load_order(model: Any) -> list[str]:
    """Parameter names in the order a rank's load reads them: the tensors it copies (embedding, norms,
    biases) first, then the projection weights in the order ``model.pack()`` reorders them."""
    from engines.llama.linear import Linear

    names = [name for name, _ in model.named_parameters()]
    weights = [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Linear)]
    weights = [name for name in weights if name in names]  # a tied LM head's is the embedding
    return [name for name in names if name not in weights] + weights


def write_partition(
    source: str | Path,
    output: str | Path,
    tensor_parallel: int,
    pipeline_parallel: int = 1,
    dtype: str = "auto",
    quantize: str | None = None,
    group_size: int | None = None,
    calibration: str | Path | None = None,
) -> Manifest:
    """Cut ``source`` (config.json + safetensors) into one file per rank under ``output``, one rank at a
    time (peak memory: one rank's part). ``dtype``: fp32/fp16/bf16, auto = the checkpoint's.
    ``group_size``: int4's, None for the default (engines.quant.apply.int4_group_size).
    ``calibration``: a text file for activation-aware scaling before quantizing (one rank only)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from engines.hf.loading import resolve_dtype
    from engines.llama.weights import load_llama

    source, output = Path(source), Path(output)
    if is_partitioned(source):
        raise EngineLoadError(f"{source} is already a partition; partition the original checkpoint")
    from engines.quant.prequantized import checkpoint_format

    if checkpoint_format(source) is not None or quantize == "gguf":
        raise EngineLoadError(
            f"{source} holds stored quantized projections (AWQ/GPTQ, or quantize=gguf); a partition cannot "
            "carry them yet. Fix: serve the folder with option.tensor_parallel_degree (each rank reads only "
            "its slices), or partition the float checkpoint with --quantize int8|int4."
        )
    windows = _calibration(source, calibration, quantize, tensor_parallel * pipeline_parallel)
    if quantize == "int4":
        from engines.quant.apply import int4_group_size

        group_size = int4_group_size(source, group_size)
    torch_dtype = resolve_dtype(
        dtype, AutoConfig.from_pretrained(source), "cpu", False
    )  # auto: the checkpoint's
    output.mkdir(parents=True, exist_ok=True)
    world = tensor_parallel * pipeline_parallel
    manifest = Manifest(
        tensor_parallel,
        pipeline_parallel,
        str(torch_dtype).removeprefix("torch."),
        str(source),
        source_hash(source),
        quantize=quantize,
        group_size=group_size if quantize == "int4" else None,
        calibration_sha256=file_sha256(Path(calibration)) if calibration else None,
    )
    started = time.perf_counter()
    for rank in range(world):
        layout = ParallelLayout(tensor_parallel, pipeline_parallel, rank)
        length = max(map(len, windows), default=1)  # calibration runs the model on its windows
        model, _ = load_llama(str(source), torch_dtype, "cpu", length, pack=False, layout=layout)
        path = output / rank_file_name(rank, world)
        partial = path.with_name(path.name + ".partial")
        if windows:
            from engines.quant.awq_scaling import scale_for_quantization

            scale_for_quantization(model, windows, quantize, group_size)
        if quantize:
            from engines.quant.storage import quantized_state

            tensors = quantized_state(model, quantize, group_size)
            save_file(tensors, str(partial))  # no metadata: written in random order (unstable hashes)
        else:
            params = dict(model.named_parameters())
            tensors = {name: params[name].detach().contiguous() for name in load_order(model)}
            save_in_order(tensors, partial)
        os.replace(partial, path)  # a new file: never rewrite one in place that a server may be mapping
        manifest.files.append(RankFile(rank, path.name, path.stat().st_size, file_sha256(path)))
        del model, tensors
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, output / name)
    manifest.write(output)
    log.info(
        "Partitioned %s into %d ranks under %s in %.1f s",
        source,
        world,
        output,
        time.perf_counter() - started,
    )
    return manifest


def _calibration(source: Path, calibration: str | Path | None, quantize: str | None, world: int) -> list:
    """The calibration text's token windows (empty without one), or EngineLoadError saying what is wrong."""
    if calibration is None:
        return []
    if not quantize or world != 1:
        raise EngineLoadError(
            "A calibration text scales a model for quantization on one rank: use it with lmi quantize "
            "(or --quantize with degrees 1), then partition the quantized checkpoint's source as usual."
        )
    from transformers import AutoTokenizer

    from engines.quant.awq_scaling import calibration_windows

    try:
        text = Path(calibration).read_text(encoding="utf-8")
        return calibration_windows(AutoTokenizer.from_pretrained(source), text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EngineLoadError(f"Calibration text {calibration}: {exc}") from exc
