"""Ahead-of-time partitioned checkpoints: one safetensors file per rank plus a manifest.

Sharding at start-up makes every rank walk the whole checkpoint (slicing what it needs, converting
dtypes, fusing q/k/v and gate/up); a partition stores each rank's part already fused, in the serving
dtype and contiguous, so a rank reads its one file straight into its parameters. The manifest
(``lmi-partition.json``) records the source, the degrees, the dtype and each file's size and SHA-256,
so a folder partitioned for other degrees, or a truncated file, is refused at start-up with the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engines.base import EngineLoadError
from engines.parallel.layout import ParallelLayout

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


def load_partition(model: Any, directory: Path) -> None:
    """Fill ``model`` (one rank's LlamaModel) from its rank file; only that file is read."""
    from safetensors import safe_open

    manifest = Manifest.read(directory)
    layout = model.plan.layout
    check_layout(manifest, layout, directory)
    partition_dtype(manifest, model.dtype, explicit=True)
    entry = next((f for f in manifest.files if f.rank == layout.rank), None)
    if entry is None:
        raise EngineLoadError(f"{directory / MANIFEST} lists no file for rank {layout.rank}")
    path = directory / entry.file
    size = path.stat().st_size if path.is_file() else -1
    if size != entry.bytes:
        raise EngineLoadError(
            f"{path} is {'missing' if size < 0 else f'{size} bytes'}, the manifest says {entry.bytes} bytes: "
            "the partition is incomplete or corrupt. Fix: copy or partition it again."
        )
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        names = set(handle.keys())
        if manifest.quantize:
            from engines.quant.storage import restore_projections

            names -= restore_projections(model, handle, manifest.quantize)
        params = dict(model.named_parameters())
        params = {name: p for name, p in params.items() if not _in_quantized(model, name)}
        if names != set(params):
            missing, extra = sorted(set(params) - names), sorted(names - set(params))
            raise EngineLoadError(
                f"{path} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for name, param in params.items():
            tensor = handle.get_tensor(name)
            if tensor.shape != param.shape:
                raise EngineLoadError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                )
            param.data.copy_(tensor)


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_partition(
    source: str | Path,
    output: str | Path,
    tensor_parallel: int,
    pipeline_parallel: int = 1,
    dtype: str = "auto",
    quantize: str | None = None,
    group_size: int = 128,
) -> Manifest:
    """Cut ``source`` (config.json + safetensors) into one file per rank under ``output``, one rank at a
    time (peak memory: one rank's part). ``dtype``: fp32/fp16/bf16, auto = the checkpoint's."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from engines.hf.loading import resolve_dtype
    from engines.llama.weights import load_llama

    source, output = Path(source), Path(output)
    if is_partitioned(source):
        raise EngineLoadError(f"{source} is already a partition; partition the original checkpoint")
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
    )
    started = time.perf_counter()
    for rank in range(world):
        layout = ParallelLayout(tensor_parallel, pipeline_parallel, rank)
        model, _ = load_llama(str(source), torch_dtype, "cpu", max_model_len=1, pack=False, layout=layout)
        if quantize:
            from engines.quant.storage import quantized_state

            tensors = quantized_state(model, quantize, group_size)
        else:
            tensors = {name: param.detach().contiguous() for name, param in model.named_parameters()}
        path = output / rank_file_name(rank, world)
        save_file(tensors, str(path))  # no metadata: safetensors writes it in random order (unstable hashes)
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
