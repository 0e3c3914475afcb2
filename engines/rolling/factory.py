"""Build a RollingEngine from an EngineConfig: native Llama weights, tokenizer, a sized paged KV cache."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from engines.base import EngineConfig, EngineLoadError
from engines.device import configure_threads, has_native_bf16, resolve_device
from engines.rolling.engine import RollingEngine
from engines.rolling.memory import cache_blocks
from engines.sequence import eos_token_ids

log = logging.getLogger("engines.rolling")

DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_BLOCK_SIZE = {"cuda": 16, "cpu": 64}
"""Tokens per KV-cache block by device type. On this project's 2-core CPU a 64-sequence decode step
took 10 % less time with 64 than with 16 (the attention kernel reads longer contiguous runs); GPUs keep
vLLM's 16, the finer prefix-cache grain."""


def supports_rolling(model_path: str) -> str | None:
    """None when the native engine can run this checkpoint, else the reason it cannot."""
    from engines.llama.weights import check_supported

    config_file = Path(model_path) / "config.json"
    if not config_file.is_file() or not list(Path(model_path).glob("*.safetensors")):
        return "the native engine loads config.json + *.safetensors only"
    try:
        check_supported(json.loads(config_file.read_text()), DEFAULT_MAX_MODEL_LEN)
    except NotImplementedError as exc:
        return str(exc)
    return None


def _attention_shape(raw: dict) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) from a config.json."""
    heads = raw["num_attention_heads"]
    return heads, raw.get("num_key_value_heads") or heads, raw.get("head_dim") or raw["hidden_size"] // heads


def create_rolling_engine(config: EngineConfig) -> RollingEngine:
    """Load the model (this process is rank 0 of its group when the degrees ask for several ranks)."""
    from transformers import AutoTokenizer, GenerationConfig

    started = time.perf_counter()
    config = save_partition(resolve_degrees(config))
    world = config.tensor_parallel_degree * config.pipeline_parallel_degree
    followers = None
    if world > 1:
        config = distributed_config(config)
        followers, threads = _start_local_followers(config)
    else:
        threads = None
    try:
        model, cache, comm = load_rank(config, 0, threads)
    except BaseException:
        if followers is not None:
            followers.stop_watching()
            for process in followers.processes:
                process.kill()
        raise
    graphs = None
    if world > 1:
        from engines.parallel.group import LeaderCache, LeaderModel

        model, cache = LeaderModel(model, comm), LeaderCache(cache, comm)
    elif _use_graphs(config, model):
        graphs = _capture_graphs(model, cache, config, model.max_model_len)
    tokenizer = AutoTokenizer.from_pretrained(config.model_path)
    try:
        generation = GenerationConfig.from_pretrained(config.model_path)
    except OSError:
        generation = None
    _log_loaded(config, model, cache, time.perf_counter() - started)
    engine = RollingEngine(
        model,
        cache,
        tokenizer,
        eos_token_ids(tokenizer, model.hf_config, generation),
        model.max_model_len,
        config.max_rolling_batch_size,
        config.max_rolling_batch_prefill_tokens,
        config.enable_prefix_caching,
        graphs,
        reserved_blocks=int(_use_graphs(config, model) and world == 1),
        overlap=config.async_scheduling and world == 1,
    )
    if world > 1:
        from engines.parallel.group import Group

        engine.group = Group(model.comm, followers)
    return engine


def group_size(config: EngineConfig) -> int:
    """option.quantize_group_size when it is set, else the source's own 4-bit grid or 128 (see
    engines.quant.apply.int4_group_size); only int4 reads it."""
    from engines.quant.apply import DEFAULT_GROUP_SIZE, int4_group_size

    if config.quantize != "int4":
        return config.quantize_group_size or DEFAULT_GROUP_SIZE
    return int4_group_size(config.model_path, config.quantize_group_size)


def _use_graphs(config: EngineConfig, model: Any) -> bool:
    world = config.tensor_parallel_degree * config.pipeline_parallel_degree
    return (
        model.device.type == "cuda" and not config.enforce_eager and model.ops_name == "triton" and world == 1
    )


def load_rank(config: EngineConfig, rank: int, threads: int | None = None) -> tuple[Any, Any, Any]:
    """(model, KV cache, comm) of one rank: join the group, load this rank's part, size the cache
    (every rank agrees on the smallest count), and return. Rank 0 and engines.parallel.follower."""
    from transformers import AutoConfig

    from engines.hf.loading import resolve_dtype
    from engines.kernels.ops import select_ops
    from engines.llama.spec import LlamaSpec
    from engines.llama.weights import load_llama
    from engines.parallel.comm import ParallelComm, Rendezvous, init_comm
    from engines.parallel.layout import ParallelLayout, ShardPlan

    layout = ParallelLayout(config.tensor_parallel_degree, config.pipeline_parallel_degree, rank)
    device = _rank_device(config, layout)
    if config.block_size is None:
        config = dataclasses.replace(config, block_size=DEFAULT_BLOCK_SIZE.get(torch.device(device).type, 16))
    if threads is not None:
        torch.set_num_threads(threads)
    else:
        configure_threads(config.num_threads, config.workers)
    raw = json.loads((Path(config.model_path) / "config.json").read_text())
    limit = int(raw.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN)
    max_model_len = config.max_model_len or min(limit, DEFAULT_MAX_MODEL_LEN)
    stored = AutoConfig.from_pretrained(config.model_path)
    plan = ShardPlan.build(LlamaSpec.from_hf(stored), layout)  # degrees checked before anyone loads
    dtype = resolve_dtype(config.dtype, stored, device, has_native_bf16(device))
    from engines.parallel.partition import Manifest, is_partitioned, partition_dtype

    if is_partitioned(config.model_path):
        manifest = Manifest.read(Path(config.model_path))
        dtype = partition_dtype(manifest, dtype, explicit=config.dtype.strip().lower() != "auto")
    try:
        local = plan.local
        ops = select_ops(config.kernels, device, (local.num_heads, local.num_kv_heads, local.head_dim))
    except (ValueError, RuntimeError) as exc:
        raise EngineLoadError(str(exc)) from exc
    comm = ParallelComm(layout)  # joined after loading: this rank loads while the others start
    store = None
    if layout.world_size > 1:
        rendezvous = Rendezvous(config.master_addr or "127.0.0.1", int(config.master_port or 0))
        if rank == 0:  # listening before anyone needs it (Rendezvous.store)
            store = rendezvous.store(rank, layout.world_size)
    started = time.perf_counter()
    model, hf_config = load_llama(
        config.model_path,
        dtype,
        device,
        max_model_len,
        ops=ops,
        layout=layout,
        comm=comm,
        quantize=config.quantize,
        group_size=group_size(config),
    )
    if layout.world_size > 1:
        log.info("Rank %d loaded its weights in %.2f s", rank, time.perf_counter() - started)
        per_node = layout.world_size // config.nnodes
        same_node = per_node % layout.tensor_parallel == 0  # each TP group lies on one machine
        joined = init_comm(layout, rendezvous, torch.device(device), shared_memory=same_node, store=store)
        comm.tp_group, comm.shm = joined.tp_group, joined.shm
    model.hf_config, model.ops_name = hf_config, ops.name
    blocks = cache_blocks(model, config, max_model_len)
    if comm is not None:
        blocks = comm.min_over_ranks(blocks, model.device)
    graphs = _use_graphs(config, model)
    cache = model.make_cache(blocks + graphs, config.block_size)  # + the graphs' padding block
    return model, cache, model.comm


def resolve_degrees(config: EngineConfig) -> EngineConfig:
    """tensor_parallel_degree ``max`` (0) -> every visible GPU of every node over the stages (1 on CPU);
    then check the degrees against the model before any rank starts."""
    from transformers import AutoConfig

    from engines.llama.spec import LlamaSpec
    from engines.parallel.layout import ParallelLayout, check_degrees

    if config.tensor_parallel_degree == 0:
        on_gpu = torch.device(resolve_device(config.device)).type == "cuda"
        gpus = torch.cuda.device_count() * config.nnodes if on_gpu else 0
        tp = max(1, gpus // config.pipeline_parallel_degree)
        log.info(
            "option.tensor_parallel_degree=max: %d (%d GPUs visible over %d nodes)", tp, gpus, config.nnodes
        )
        config = dataclasses.replace(config, tensor_parallel_degree=tp)
    if config.tensor_parallel_degree * config.pipeline_parallel_degree > 1:
        spec = LlamaSpec.from_hf(AutoConfig.from_pretrained(config.model_path))
        layout = ParallelLayout(config.tensor_parallel_degree, config.pipeline_parallel_degree)
        check_degrees(spec, layout)
        from engines.parallel.partition import Manifest, check_layout, is_partitioned

        if is_partitioned(config.model_path):
            check_layout(Manifest.read(Path(config.model_path)), layout, Path(config.model_path))
    return config


def save_partition(config: EngineConfig) -> EngineConfig:
    """option.save_mp_checkpoint_path (DJL's name): partition the model there for these degrees once,
    then serve from the partition (a start that finds a matching one reuses it)."""
    from engines.parallel.partition import Manifest, is_partitioned, source_hash, write_partition

    target = config.save_mp_checkpoint_path
    if not target or is_partitioned(config.model_path):
        return config
    degrees = (config.tensor_parallel_degree, config.pipeline_parallel_degree)
    if is_partitioned(target):
        manifest = Manifest.read(Path(target))
        same_source = manifest.source_sha256 == source_hash(Path(config.model_path))
        same_degrees = (manifest.tensor_parallel_degree, manifest.pipeline_parallel_degree) == degrees
        explicit = config.dtype.strip().lower() != "auto"
        from engines.hf.loading import resolve_dtype

        wanted = str(resolve_dtype(config.dtype, None)).removeprefix("torch.") if explicit else manifest.dtype
        if same_source and same_degrees and wanted == manifest.dtype:
            log.info("Serving the partition of this model already in %s", target)
            return dataclasses.replace(config, model_path=target)
        log.info("%s holds a partition of another model or for other degrees: partitioning again", target)
    write_partition(config.model_path, target, *degrees, dtype=config.dtype)
    return dataclasses.replace(config, model_path=target)


def _rank_device(config: EngineConfig, layout: Any) -> str:
    """This rank's device: the CPU, or the GPU after option.device's index by its local rank."""
    device = resolve_device(config.device)
    if torch.device(device).type != "cuda" or layout.world_size == 1:
        return device
    per_node = layout.world_size // config.nnodes
    local = layout.rank % per_node
    base = (torch.device(device).index or 0) + config.worker_index * per_node
    if base + per_node > torch.cuda.device_count():
        raise EngineLoadError(
            f"Model worker {config.worker_index}'s group ({layout.describe()}) needs {per_node} GPUs from "
            f"cuda:{base}, but {torch.cuda.device_count()} are visible. Fix: lower the degrees or minWorkers "
            "(each worker's group takes its own GPUs), or check CUDA_VISIBLE_DEVICES."
        )
    torch.cuda.set_device(base + local)
    return f"cuda:{base + local}"


def distributed_config(config: EngineConfig) -> EngineConfig:
    """Check the node split and fix the rendezvous (a free local port when none is given)."""
    world = config.tensor_parallel_degree * config.pipeline_parallel_degree
    if config.nnodes < 1 or world % config.nnodes:
        raise EngineLoadError(
            f"{world} ranks (tensor_parallel_degree={config.tensor_parallel_degree} x "
            f"pipeline_parallel_degree={config.pipeline_parallel_degree}) cannot be split evenly over "
            f"{config.nnodes} nodes. Fix: make the rank count a multiple of the node count."
        )
    if config.master_port is None:
        if config.nnodes > 1:
            raise EngineLoadError(
                "A multi-node group needs MASTER_ADDR and MASTER_PORT (torchrun's conventions)"
            )
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = dataclasses.replace(config, master_addr="127.0.0.1", master_port=port)
    return config


def _start_local_followers(config: EngineConfig) -> tuple[Any, int]:
    """Node 0's follower ranks (1 .. per-node - 1), and the torch threads each rank gets here."""
    from engines.parallel.comm import Rendezvous
    from engines.parallel.group import start_followers

    world = config.tensor_parallel_degree * config.pipeline_parallel_degree
    per_node = world // config.nnodes
    threads = rank_threads(config, per_node)
    rendezvous = Rendezvous(config.master_addr or "127.0.0.1", int(config.master_port))
    return start_followers(config, list(range(1, per_node)), rendezvous, threads), threads


def rank_threads(config: EngineConfig, ranks_here: int) -> int:
    """option.num_threads per rank, else the cores split between every rank of every worker here."""
    if config.num_threads is not None:
        return config.num_threads
    cores = torch.get_num_threads()
    return max(1, cores // max(1, ranks_here * config.workers))


def _log_loaded(config: EngineConfig, model: Any, cache: Any, seconds: float) -> None:
    blocks, size, max_model_len = cache.num_blocks, config.block_size or cache.block_size, model.max_model_len
    world = config.tensor_parallel_degree * config.pipeline_parallel_degree
    log.info(
        "Rolling-batch engine: %s in %s on %s, %s kernels, %s, KV cache %d blocks x %d tokens = %d tokens = "
        "%.0f MiB per rank (%.1f sequences of max_model_len %d), prefix caching %s, loaded in %.1f s",
        model.hf_config.architectures[0] if model.hf_config.architectures else "?",
        model.dtype,
        model.device,
        model.ops_name,
        f"{world} ranks ({model.plan.layout.describe()})" if world > 1 else "1 rank",
        blocks,
        size,
        blocks * size,
        cache.total_bytes() / 2**20,
        blocks * size / max_model_len,
        max_model_len,
        "on" if config.enable_prefix_caching else "off",
        seconds,
    )


def _capture_graphs(model: Any, cache: Any, config: EngineConfig, max_model_len: int) -> Any:
    """The decode CUDA graphs, or None (eager decode, with a warning) when capture fails."""
    from engines.rolling.cuda_graphs import DecodeGraphRunner

    runner = DecodeGraphRunner(
        model, cache, config.max_rolling_batch_size, max_model_len, cache.num_blocks - 1
    )
    try:
        runner.capture()
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        log.warning("CUDA graph capture failed (%s); decode steps run eagerly", exc)
        return None
    return runner
