"""Engine start-up with tensor_parallel_degree=2: sharding the original checkpoint at load vs reading an
ahead-of-time partition (``lmi partition``), on a random 1.1 B-parameter Llama-architecture model.

Writes the checkpoint (bf16, one safetensors file written tensor by tensor: memory stays at one tensor),
partitions it for tp=2 (timed), then times, from each folder in turn:

- the engine start, what a user waits for once a model worker has imported: ``create_rolling_engine``
  until it returns, in a fresh process as a worker runs it (rank 0 in that process; rank 1 forked from
  the fork server the process started first, engines.parallel.spawn, which loads, joins the group and
  sizes its KV cache), after one untimed start (it builds the native kernels when not cached);
- each rank's weights phase: ``load_llama`` of that rank as a served rank runs it (``pack``: the dense
  kernel serves the weights as loaded, or oneDNN re-lays them out where that kernel does not run),
  in a fresh process (imports untimed, so memory is first touched as in a rank) with the torch threads a
  rank of the group gets here (half the cores). ``pack()`` is reported apart (with oneDNN the reorder
  costs both sources the same and, for a partition, holds the reading of its weights). Rank 0 with
  ``pack=False`` copies every tensor off either source: the read and the copy alone.

``warm``: the files are in the page cache (read just before each figure); ``cold``: their pages were
evicted with posix_fadvise(DONTNEED) just before each figure (no root needed; checked with fincore where
installed), so the files come from the disk (on a VM, possibly from the host's cache). Each figure is
the median of --repeats runs [and their range], the two sources alternating.

    python scripts/bench_partition_load.py                      # ~6 min on 2 cores, 4.3 GiB of disk
    python scripts/bench_partition_load.py --layers 2 --repeats 1   # a quick smoke run
    python scripts/bench_partition_load.py --checkpoint-dtype fp32  # an fp32 original served in bf16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.base import EngineConfig  # noqa: E402
from engines.llama.weights import load_llama  # noqa: E402
from engines.parallel.layout import ParallelLayout  # noqa: E402
from engines.parallel.partition import write_partition  # noqa: E402
from engines.rolling.factory import create_rolling_engine  # noqa: E402


def llama_shapes(args: argparse.Namespace) -> dict[str, list[int]]:
    """HF tensor name -> shape of a Llama checkpoint with untied embeddings."""
    hidden, inter, head_dim = args.hidden, args.intermediate, args.hidden // args.heads
    kv = args.kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": [args.vocab, hidden]}
    for i in range(args.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": [hidden],
            p + "self_attn.q_proj.weight": [hidden, hidden],
            p + "self_attn.k_proj.weight": [kv, hidden],
            p + "self_attn.v_proj.weight": [kv, hidden],
            p + "self_attn.o_proj.weight": [hidden, hidden],
            p + "post_attention_layernorm.weight": [hidden],
            p + "mlp.gate_proj.weight": [inter, hidden],
            p + "mlp.up_proj.weight": [inter, hidden],
            p + "mlp.down_proj.weight": [hidden, inter],
        }
    return shapes | {"model.norm.weight": [hidden], "lm_head.weight": [args.vocab, hidden]}


def write_checkpoint(folder: Path, args: argparse.Namespace) -> int:
    """config.json, a tokenizer and model.safetensors (--checkpoint-dtype, std 0.02, norms 1; fp32 holds
    the bf16 values widened); returns the parameters."""
    fp32 = args.checkpoint_dtype == "fp32"
    folder.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float32" if fp32 else "bfloat16", "bos_token_id": 1,
        "eos_token_id": 2,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_script = Path(__file__).parent / "make_tiny_model.py"
    spec = importlib.util.spec_from_file_location("make_tiny_model", tokenizer_script)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.build_tokenizer("llama").save_pretrained(folder)  # any tokenizer: nothing is generated
    shapes = llama_shapes(args)
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = (4 if fp32 else 2) * int(torch.Size(shape).numel())
        header[name] = {
            "dtype": "F32" if fp32 else "BF16",
            "shape": shape,
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator().manual_seed(0)
    with (folder / "model.safetensors").open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)
            handle.write(
                tensor.float().numpy().tobytes() if fp32 else tensor.view(torch.int16).numpy().tobytes()
            )
        handle.flush()
        os.fsync(handle.fileno())
    return sum(int(torch.Size(shape).numel()) for shape in shapes.values())


def evict(folder: Path) -> str:
    """Drop the folder's files from the page cache; returns what fincore says stays resident."""
    subprocess.run(["sync"], check=False)
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    weights = sorted(str(p) for p in folder.glob("*.safetensors"))
    if not shutil.which("fincore"):
        return "unchecked (no fincore)"
    out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", *weights], capture_output=True, text=True)
    return f"{sum(int(line) for line in out.stdout.split()) / 2**20:.0f} MiB resident"


def warm(folder: Path) -> None:
    """Read the folder's weights into the page cache, after writing back what is dirty: a start timed
    while the just-written checkpoint and partition (4.2 GiB) were still being written back took 2.7-4.2
    s instead of 0.6 s (runtime sharding) on one machine."""
    os.sync()
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as handle:
            while handle.read(1 << 26):
                pass


def engine_seconds(folder: Path) -> dict[str, float]:
    """One engine start in a fresh process (see time_engine)."""
    command = [sys.executable, __file__, "--time-engine", str(folder)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return {"engine start, TP=2 (2 processes)": json.loads(out.stdout.splitlines()[-1])}


def time_engine(folder: Path) -> None:
    """Child of engine_seconds: start the fork server as a model worker does, import what the fork
    server imports (transformers' config and tokenizer classes too, which a start otherwise imports on
    first use: the same seconds for both sources, printed apart), wait for the server's imports (in a
    worker they run beside the worker's own), then print the seconds ``create_rolling_engine`` takes."""
    import logging
    import multiprocessing

    from engines.parallel.spawn import prestart

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # to stderr
    prestart()
    started = time.perf_counter()
    import engines.parallel.preload  # noqa: F401

    print(f"imports before the start: {time.perf_counter() - started:.2f} s", file=sys.stderr)
    ready = multiprocessing.get_context("forkserver").Process(target=time.sleep, args=(0,))
    ready.start()
    ready.join()
    config = EngineConfig(
        model_path=str(folder), tensor_parallel_degree=2, dtype="bf16", max_rolling_batch_size=1,
        max_model_len=256,
    )  # fmt: skip
    started = time.perf_counter()
    engine = create_rolling_engine(config)
    seconds = time.perf_counter() - started
    engine.close()
    print(json.dumps(seconds))


def rank_seconds(folder: Path, rank: int, pack: bool = True) -> dict[str, float]:
    """One rank's load_llama, and its pack() share, in a fresh process."""
    threads = max(1, torch.get_num_threads() // 2)
    command = [sys.executable, __file__, "--time-rank", str(folder), str(rank), "--threads", str(threads)]
    out = subprocess.run(
        command + ([] if pack else ["--no-pack"]), capture_output=True, text=True, check=True
    )
    load, packing = json.loads(out.stdout.splitlines()[-1])
    if not pack:
        return {f"rank {rank} weights unpacked (pack=False)": load}
    return {f"rank {rank} weights (load_llama)": load, f"rank {rank} of which pack()": packing}


def time_rank(folder: Path, rank: int, threads: int, pack: bool) -> None:
    """Child of rank_seconds: print [load_llama seconds, pack() seconds] of one rank."""
    from transformers import AutoConfig

    from engines.llama.model import LlamaModel

    torch.set_num_threads(threads)
    AutoConfig.from_pretrained(folder)  # one-time imports, untimed
    packing, pack_model = [0.0], LlamaModel.pack

    def timed_pack(model: LlamaModel) -> bool:
        started = time.perf_counter()
        try:
            return pack_model(model)
        finally:
            packing[0] += time.perf_counter() - started

    LlamaModel.pack = timed_pack
    started = time.perf_counter()
    load_llama(str(folder), torch.bfloat16, "cpu", 256, pack=pack, layout=ParallelLayout(2, 1, rank))
    print(json.dumps([time.perf_counter() - started, packing[0]]))


def measure(
    what: Callable[[Path], dict[str, float]], folders: dict[str, Path], cache: str, repeats: int
) -> dict[str, dict[str, list[float]]]:
    """figure -> source -> seconds of each run."""
    times: dict[str, dict[str, list[float]]] = {}
    for _ in range(repeats):
        for name, folder in folders.items():
            if cache == "cold":
                state = evict(folder)
            else:
                warm(folder)
                state = "warm"
            for figure, seconds in what(folder).items():
                times.setdefault(figure, {}).setdefault(name, []).append(seconds)
                print(f"  {figure}, {name} ({cache}, {state}): {seconds:.2f} s", flush=True)
    return times


def run(folders: dict[str, Path], caches: list[str], repeats: int) -> list[tuple]:
    """(figure, cache, source -> seconds of each run) rows, after one untimed engine start."""
    warm_up = engine_seconds(folders["partition"])  # builds the native kernels when not cached
    print(f"untimed warm-up engine start: {sum(warm_up.values()):.2f} s", flush=True)
    rows = []
    ranks = [
        partial(rank_seconds, rank=0),
        partial(rank_seconds, rank=1),
        partial(rank_seconds, rank=0, pack=False),
    ]
    for cache in caches:
        for what in (engine_seconds, *ranks):
            rows += [(figure, cache, runs) for figure, runs in measure(what, folders, cache, repeats).items()]
    return rows


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--workdir", help="where the checkpoint and partition go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--caches", nargs="+", choices=("warm", "cold"), default=["warm", "cold"])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22, help="22: 1.12 B parameters at the defaults")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--checkpoint-dtype", choices=("bf16", "fp32"), default="bf16",
        help="the original's dtype (served and partitioned as bf16 either way; fp32 as many checkpoints are)",
    )  # fmt: skip
    parser.add_argument("--time-rank", nargs=2, metavar=("FOLDER", "RANK"), help=argparse.SUPPRESS)
    parser.add_argument("--time-engine", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--no-pack", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_engine:
        time_engine(Path(args.time_engine))
        return
    if args.time_rank:
        time_rank(Path(args.time_rank[0]), int(args.time_rank[1]), args.threads, not args.no_pack)
        return
    root = Path(args.workdir or tempfile.mkdtemp(prefix="lmi-bench-partition-"))
    source, partition = root / "original", root / "partition-tp2"
    try:
        started = time.perf_counter()
        params = write_checkpoint(source, args)
        size = (source / "model.safetensors").stat().st_size
        print(f"checkpoint: {params / 1e9:.3f} B parameters, {size / 2**30:.2f} GiB {args.checkpoint_dtype}, "
              f"written in {time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
        started = time.perf_counter()
        manifest = write_partition(source, partition, 2, 1, "bf16")
        cut = time.perf_counter() - started
        sizes = ", ".join(f"{f.bytes / 2**30:.2f}" for f in manifest.files)
        print(f"lmi partition tp=2: {cut:.1f} s ({sizes} GiB per rank file)", flush=True)
        folders = {"original": source, "partition": partition}
        print_table(run(folders, args.caches, args.repeats), params, cut, args.repeats, args.checkpoint_dtype)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def print_table(rows: list[tuple], params: int, cut: float, repeats: int, stored: str) -> None:
    print(f"\n{params / 1e9:.2f} B-param Llama stored {stored}, served bf16, CPU, median [min-max] of "
          f"{repeats} runs, s; partitioned in {cut:.1f} s")  # fmt: skip
    print(f"| {'what':<34} | cache | {'original':<17} | {'partition':<17} | original / partition |")
    print(f"|{'-' * 36}|-------|{'-' * 19}|{'-' * 19}|----------------------|")
    for figure, cache, runs in rows:
        original, part = runs["original"], runs["partition"]
        cells = [f"{statistics.median(t):.2f} [{min(t):.2f}-{max(t):.2f}]" for t in (original, part)]
        ratio = statistics.median(original) / max(statistics.median(part), 1e-9)
        print(f"| {figure:<34} | {cache:<5} | {cells[0]:<17} | {cells[1]:<17} | {ratio:>20.2f} |")


if __name__ == "__main__":
    main()
