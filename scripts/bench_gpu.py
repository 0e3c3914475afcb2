"""GPU throughput benchmark: copy bandwidth, the bare decode step against the weight-read roofline, and the
real server under closed-loop load, in one bounded run that writes one JSON file.

1. Model: --model-dir DIR, or --build-7b DEST writes a random Llama-2-7B-shaped bf16 checkpoint (32 layers,
   hidden 4096, 32 heads MHA, intermediate 11008, the default model's tokenizer and vocabulary 49152) as
   safetensors shards, once (a complete DEST is reused). --tiny builds a 2-layer, hidden-256 one instead.
2. Copy bandwidth: device-to-device copies of a 1 GiB buffer (CUDA events), counted as bytes read + written
   per second. The floor of one decode step is weight bytes / that rate, the issue's convention
   (13.76 GB / 4.23 TB/s = 3.25 ms); it is also given with the step's KV-cache reads added.
3. Bare step: the model loaded as the server loads it (load_llama, select_ops), every sequence prefilled to
   --context once, then decode steps timed per batch size (eager, and CUDA-graph replays when
   engines.rolling.cuda_graphs.DecodeGraphRunner exists), and one prefill of 8 x --context tokens.
4. Server: ``python -m serving serve`` in its own process group (always killed at the end), then
   ``python -m serving bench`` per --concurrency (streamed OpenAI completions, prompts of 20-200 tokens,
   --new-tokens with ignore_eos) while nvidia-smi samples the GPU's utilisation every 500 ms.

On the GPU machine (see shared/gpu/README.md; the default model's tokenizer files must travel, e.g. in a
git-ignored folder named in carry, since the GGUF package is not installed there):

    python3 scripts/bench_gpu.py --build-7b /dev/shm/llama7b --tokenizer-dir .tok --out-dir $OUT

A CPU check of the whole path: python scripts/bench_gpu.py --tiny --device cpu --batches 1,8 \\
    --concurrency 1,4 --new-tokens 16 --json /tmp/bg.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.bench.stats import percentile  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_overload import descendants  # noqa: E402

SEVEN_B = {"layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 32, "intermediate": 11008}
TINY = {"layers": 2, "hidden": 256, "heads": 4, "kv_heads": 4, "intermediate": 688}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)  # fmt: skip
MARKER = ".bench_gpu.json"
"""Written last into a built model folder: its presence (with the same spec) means the folder is complete."""
BLOCK_SIZE = 16
CONVENTION = "bytes read + written per second of a device-to-device copy (2 x buffer bytes / copy time)"
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def int_list(text: str) -> list[int]:
    values = [int(part) for part in text.replace(" ", ",").split(",") if part]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- model folder


def checkpoint_layout(shape: dict[str, int], vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama tensor names and shapes, in file order."""
    hidden, inter, head_dim = shape["hidden"], shape["intermediate"], shape["hidden"] // shape["heads"]
    kv = shape["kv_heads"] * head_dim
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for index in range(shape["layers"]):
        prefix = f"model.layers.{index}."
        tensors += [
            (prefix + "input_layernorm.weight", (hidden,)),
            (prefix + "self_attn.q_proj.weight", (hidden, hidden)),
            (prefix + "self_attn.k_proj.weight", (kv, hidden)),
            (prefix + "self_attn.v_proj.weight", (kv, hidden)),
            (prefix + "self_attn.o_proj.weight", (hidden, hidden)),
            (prefix + "post_attention_layernorm.weight", (hidden,)),
            (prefix + "mlp.gate_proj.weight", (inter, hidden)),
            (prefix + "mlp.up_proj.weight", (inter, hidden)),
            (prefix + "mlp.down_proj.weight", (hidden, inter)),
        ]
    return tensors + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def tokenizer_source(path: str | None) -> Path:
    if path:
        return Path(path)
    from engines.hf.default_model import ensure_default_model

    try:
        return Path(ensure_default_model())
    except Exception as exc:
        raise SystemExit(
            f"The default model (for its tokenizer files) is unavailable: {exc}. Copy its tokenizer.json, "
            "tokenizer_config.json, config.json and generation_config.json into a folder and pass "
            "--tokenizer-dir."
        ) from exc


def build_model(dest: Path, shape: dict[str, int], tok_dir: Path, device: str, shard_gb: float) -> Path:
    """Random bf16 weights (std 0.02, norms 1) written shard by shard: host memory holds one shard (twice,
    while safetensors serialises it), never the whole model. Built in DEST.partial, renamed when done."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    source = json.loads((tok_dir / "config.json").read_text()) if (tok_dir / "config.json").is_file() else {}
    if "vocab_size" in source:
        vocab = int(source["vocab_size"])
    else:
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    spec = {**shape, "vocab": vocab, "dtype": "bfloat16", "max_position_embeddings": 4096, "version": 1}
    marker = dest / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        say(f"model: reusing {dest}")
        return dest
    if dest.exists() and any(dest.iterdir()) and not marker.is_file():
        raise SystemExit(f"{dest} holds files this script did not write; choose another --build-7b DEST")
    started = time.monotonic()
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=source.get("bos_token_id"),
        eos_token_id=source.get("eos_token_id"), pad_token_id=source.get("pad_token_id"),
        architectures=["LlamaForCausalLM"], dtype="bfloat16",
    )  # fmt: skip
    config.save_pretrained(staging)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, staging / name)
    layout = checkpoint_layout(shape, vocab)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size, limit = 0, int(shard_gb * 1e9)
    for name, dims in layout:
        nbytes = 2 * torch.Size(dims).numel()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    gen_device = device if torch.device(device).type == "cuda" else "cpu"
    generator = torch.Generator(gen_device).manual_seed(0)
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, dims in shard:
            if len(dims) == 1:
                tensors[name] = torch.ones(dims, dtype=torch.bfloat16)
            else:
                weight = torch.empty(dims, dtype=torch.bfloat16, device=gen_device)
                tensors[name] = weight.normal_(0.0, 0.02, generator=generator).cpu()
            weight_map[name] = file
            total += 2 * tensors[name].numel()
        save_file(tensors, str(staging / file), metadata={"format": "pt"})
        del tensors
        say(f"model: wrote {file}")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (staging / MARKER).write_text(json.dumps(spec))
    if dest.exists():
        shutil.rmtree(dest)  # empty, or an earlier build of another spec (it has our marker)
    os.rename(staging, dest)
    say(f"model: built {dest} ({total / 1e9:.2f} GB) in {time.monotonic() - started:.1f} s")
    return dest


def describe_model(model_dir: Path) -> dict[str, Any]:
    """Shape and parameter count, read from config.json and the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    raw = json.loads((model_dir / "config.json").read_text())
    tied = bool(raw.get("tie_word_embeddings", False))
    numel = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                    continue
                numel += torch.Size(handle.get_slice(name).get_shape()).numel()
    heads = raw["num_attention_heads"]
    return {
        "path": str(model_dir),
        "layers": raw["num_hidden_layers"],
        "hidden": raw["hidden_size"],
        "heads": heads,
        "kv_heads": raw.get("num_key_value_heads") or heads,
        "head_dim": raw.get("head_dim") or raw["hidden_size"] // heads,
        "intermediate": raw["intermediate_size"],
        "vocab": raw["vocab_size"],
        "parameters": numel,
    }


# ------------------------------------------------------------------------------------------------- bandwidth


def copy_bandwidth(device: str, mib: int, repeats: int = 20) -> dict[str, Any]:
    """Median device-to-device copy of a `mib` MiB buffer; the rate counts bytes read + written."""
    size = mib * 2**20
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(repeats):
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
    else:
        for _ in range(repeats):
            began = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - began)
    seconds = statistics.median(times)
    del src, dst
    return {
        "buffer_bytes": size,
        "copy_ms_p50": round(seconds * 1e3, 4),
        "copy_ms_min": round(min(times) * 1e3, 4),
        "bytes_per_s": 2 * size / seconds,
        "convention": CONVENTION,
    }


# ------------------------------------------------------------------------------------------------ bare steps


def time_steps(fn: Callable[[], Any], steps: int, warmup: int, device: str) -> list[float]:
    """Seconds of each of `steps` calls, each synchronised, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - began)
    return times


def step_row(
    batch: int, mode: str, times: list[float], weight_bytes: int, kv_bytes: int, bw: float | None
) -> dict:
    """Step latency, and its ratio to the floors: weights alone, and weights + this step's KV-cache reads."""
    p50 = statistics.median(times)
    row: dict[str, Any] = {
        "batch": batch,
        "mode": mode,
        "p50_ms": round(p50 * 1e3, 3),
        "p90_ms": round(percentile(times, 90) * 1e3, 3),
        "tok_s": round(batch / p50, 1),
    }
    if bw:
        floor_w, floor_wkv = weight_bytes / bw, (weight_bytes + kv_bytes) / bw
        row |= {"floor_w_ms": round(floor_w * 1e3, 3), "floor_wkv_ms": round(floor_wkv * 1e3, 3)}
        row |= {"x_floor_w": round(p50 / floor_w, 2), "x_floor_wkv": round(p50 / floor_wkv, 2)}
    return row


def cache_sequences(model: Any, want: int, per_seq: int, device: str, reserve_gib: float) -> int:
    """How many sequences of `per_seq` blocks the cache can hold (all of `want` on CPU)."""
    if torch.device(device).type != "cuda":
        return want
    from engines.llama.kv_cache import PagedKVCache

    spec = model.spec
    block = PagedKVCache.block_bytes(
        spec.num_layers, BLOCK_SIZE, spec.num_kv_heads, spec.head_dim, model.dtype
    )
    torch.cuda.empty_cache()  # blocks cached by the build and bandwidth phases count as free
    free = torch.cuda.mem_get_info(device)[0] - int(reserve_gib * 2**30)
    return max(0, min(want, (free // block - 1) // per_seq))


def bench_steps(
    args: argparse.Namespace, model_dir: Path, device: str, dtype: torch.dtype, result: dict
) -> None:
    """Fills result["steps"]: load, prefill, eager (and graph) decode timings, one timed prefill."""
    from engines.kernels.ops import select_ops
    from engines.llama.batch import ForwardBatch
    from engines.llama.weights import load_llama

    info, context = result["model"], args.context
    out: dict[str, Any] = {"context": context, "block_size": BLOCK_SIZE, "rows": [], "notes": []}
    result["steps"] = out
    ops = select_ops(args.kernels, device, (info["heads"], info["kv_heads"], info["head_dim"]))
    began = time.monotonic()
    model, _ = load_llama(str(model_dir), dtype, device, args.max_model_len, ops=ops)
    sync(device)
    out.update(ops=ops.name, load_s=round(time.monotonic() - began, 1))
    say(f"steps: loaded in {out['load_s']} s, {ops.name} ops")
    spec = model.spec
    kv_token_bytes = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * model.dtype.itemsize
    per_seq = -(-context // BLOCK_SIZE)
    on_cuda = torch.device(device).type == "cuda"
    want = max(args.batches + [args.prefill_seqs] + (args.graph_batches if on_cuda else []))
    seqs = cache_sequences(model, want, per_seq, device, args.mem_reserve_gib)
    if seqs < 1:
        raise RuntimeError("not even one sequence's KV cache fits next to the weights")
    if seqs < want:
        out["notes"].append(f"KV cache fits {seqs} sequences of {context} tokens, not {want}")
    cache = model.make_cache(seqs * per_seq + 1, BLOCK_SIZE)  # the last block: the graphs' padding block
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(seqs)]
    tokens = torch.randint(100, spec.vocab_size, (seqs, context), generator=torch.Generator().manual_seed(0))
    prompts = tokens.tolist()
    began = time.monotonic()
    per_chunk = max(1, args.prefill_chunk_tokens // (context - 1))
    for first in range(0, seqs, per_chunk):
        items = [
            (tables[i], prompts[i][: context - 1], 0) for i in range(first, min(seqs, first + per_chunk))
        ]
        model(ForwardBatch.build(items, BLOCK_SIZE, device), cache)
    sync(device)
    out["prefill_all_s"] = round(time.monotonic() - began, 2)
    say(f"steps: prefilled {seqs} x {context - 1} tokens in {out['prefill_all_s']} s")

    def decode_batch(size: int) -> Any:  # each timed step rewrites position context-1: context stays fixed
        return ForwardBatch.build(
            [(tables[i], [prompts[i][context - 1]], context - 1) for i in range(size)], BLOCK_SIZE, device
        )

    bw = (result.get("bandwidth") or {}).get("bytes_per_s")

    def row_for(size: int, mode: str, times: list[float]) -> dict[str, Any]:
        return step_row(size, mode, times, result["weight_bytes"], size * context * kv_token_bytes, bw)

    for size in args.batches:
        if size > seqs:
            out["rows"].append({"batch": size, "mode": "eager", "skipped": "KV cache does not fit"})
            continue
        try:
            batch = decode_batch(size)
            build_ms = 1e3 * statistics.median(time_steps(lambda s=size: decode_batch(s), 5, 1, device))
            times = time_steps(lambda b=batch: model(b, cache), args.steps, args.warmup_steps, device)
        except torch.cuda.OutOfMemoryError as exc:  # the cache is sized tight on an 80 GB card
            out["rows"].append({"batch": size, "mode": "eager", "skipped": f"out of memory: {exc}"[:300]})
            torch.cuda.empty_cache()
            continue
        out["rows"].append(row_for(size, "eager", times) | {"build_ms": round(build_ms, 3)})
        say(f"steps: batch {size} eager p50 {out['rows'][-1]['p50_ms']} ms")
    prefill_seqs = min(args.prefill_seqs, seqs)
    batch = ForwardBatch.build([(tables[i], prompts[i], 0) for i in range(prefill_seqs)], BLOCK_SIZE, device)
    times = time_steps(lambda: model(batch, cache), 3, 1, device)
    out["prefill"] = {
        "seqs": prefill_seqs,
        "tokens_each": context,
        "p50_ms": round(statistics.median(times) * 1e3, 2),
        "tok_s": round(prefill_seqs * context / statistics.median(times), 1),
    }
    if torch.device(device).type != "cuda":
        out["graphs"] = {"skipped": "CUDA graphs need a CUDA device"}
    elif args.graph_batches:
        graph_steps(args, model, cache, seqs, decode_batch, row_for, out)


def graph_steps(
    args: argparse.Namespace,
    model: Any,
    cache: Any,
    seqs: int,
    decode_batch: Callable[[int], Any],
    row_for: Callable[[int, str, list[float]], dict[str, Any]],
    out: dict[str, Any],
) -> None:
    """Decode replayed through the engine's DecodeGraphRunner, when it exists and the ops allow graphs;
    each row also holds the largest logit difference from the eager step on the same batch."""
    try:
        from engines.rolling.cuda_graphs import DecodeGraphRunner
    except ImportError as exc:
        out["graphs"] = {"skipped": f"engines.rolling.cuda_graphs.DecodeGraphRunner unavailable ({exc})"}
        return
    if out["ops"] != "triton":
        out["graphs"] = {"skipped": f"the engine captures graphs only with triton ops, not {out['ops']}"}
        return
    sizes = [size for size in args.graph_batches if size <= seqs]
    if not sizes:
        out["graphs"] = {"skipped": "no graph batch size fits the KV cache"}
        return
    began = time.monotonic()
    try:
        runner = DecodeGraphRunner(model, cache, max(sizes), args.max_model_len, cache.num_blocks - 1)
        runner.capture()
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        out["graphs"] = {"error": f"capture failed: {exc}"}
        return
    out["graphs"] = {"capture_s": round(time.monotonic() - began, 1), "buckets": runner.buckets}
    device = str(cache.device)
    for size in sizes:
        batch = decode_batch(size)
        eager = model(batch, cache).float()
        graph = runner.run(batch).float()
        times = time_steps(lambda b=batch: runner.run(b), args.steps, args.warmup_steps, device)
        row = row_for(size, "graph", times)
        row["max_abs_logit_diff_vs_eager"] = round((graph - eager).abs().max().item(), 4)
        out["rows"].append(row)
        say(f"steps: batch {size} graph p50 {row['p50_ms']} ms")


# ---------------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m serving serve`` in its own session, so stopping it kills the whole process group."""

    def __init__(self, model_dir: Path, port: int, env: dict[str, str], log_path: Path) -> None:
        self.url, self.log_path = f"http://127.0.0.1:{port}", log_path
        cmd = [sys.executable, "-m", "serving", "serve", "--model-dir", str(model_dir), "--port", str(port)]
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "SERVING_", "HF_MODEL"))
        }
        full_env.update(env, PYTHONUNBUFFERED="1")
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.cmd, self.env = cmd, env
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready in {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM to the group, SIGKILL to what is left of it, then to any descendant outside it (model
        workers run in sessions of their own; they also die with their parent, this is a second net)."""
        tree = process_tree(self.proc.pid)
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
        deadline = time.monotonic() + 10
        for pid in tree[1:]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)


def process_tree(root: int) -> list[int]:
    """`root` and every live process below it."""
    return [root, *descendants(root)]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the live processes among `pids`."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


class GpuSampler:
    """nvidia-smi's utilisation and memory every 500 ms into a file; does nothing without nvidia-smi."""

    def __init__(self, path: Path, device: str) -> None:
        self.path, self.proc = path, None
        index = torch.device(device).index or 0
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        self.gpu = visible[index].strip() if index < len(visible) else str(index)
        self.enabled = torch.device(device).type == "cuda" and shutil.which("nvidia-smi") is not None

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            query = "--query-gpu=timestamp,utilization.gpu,memory.used"
            cmd = ["nvidia-smi", query, "--format=csv,noheader,nounits", "-lms", "500", "-i", self.gpu]
            with self.path.open("w") as fh:
                self.proc = subprocess.Popen(
                    cmd, stdout=fh, stderr=subprocess.DEVNULL, start_new_session=True
                )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def summary(self, since: float | None = None) -> dict[str, Any] | None:
        """Mean/p50 utilisation and peak memory of the samples taken at or after `since` (epoch seconds:
        the load window, not the bench client's start-up), or of all samples if none has a readable time."""
        samples = []
        for line in self.path.read_text().splitlines() if self.enabled and self.path.is_file() else []:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
                continue
            try:
                stamp = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            except ValueError:
                stamp = None
            samples.append((stamp, int(parts[1]), int(parts[2])))
        window = [s for s in samples if since is None or s[0] is None or s[0] >= since] or samples
        if not window:
            return None
        util = [s[1] for s in window]
        return {
            "samples": len(util),
            "util_mean": round(statistics.fmean(util), 1),
            "util_p50": statistics.median(util),
            "mem_used_mib_max": max(s[2] for s in window),
        }


def bench_cmd(url: str, model_dir: Path, concurrency: int, requests: int, new_tokens: int) -> list[str]:
    cmd = [sys.executable, "-m", "serving", "bench", "--url", url, "--api", "openai-completions", "--quiet"]
    cmd += ["--concurrency", str(concurrency), "--num-requests", str(requests), "--warmup", "0"]
    cmd += ["--max-new-tokens", str(new_tokens), "--prompt-len-min", "20", "--prompt-len-max", "200"]
    return cmd + ["--tokenizer", str(model_dir)]


def run_level(
    args: argparse.Namespace, server: Server, model_dir: Path, concurrency: int, device: str
) -> dict:
    """One closed-loop row of ``lmi bench``, with the GPU's utilisation and the server's CPU use meanwhile."""
    requests = max(args.min_requests, args.requests_per_client * concurrency)
    cmd = bench_cmd(server.url, model_dir, concurrency, requests, args.new_tokens)
    cmd += ["--duration", str(args.level_duration), "--timeout", str(args.request_timeout)]
    limit = args.level_duration + args.request_timeout + 120
    pids = process_tree(server.proc.pid)
    cpu_before, began = cpu_seconds(pids), time.monotonic()
    with GpuSampler(Path(args.out_dir) / f"gpu_c{concurrency}.csv", device) as gpu:
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit, check=False)
        except subprocess.TimeoutExpired:
            return {"concurrency": concurrency, "error": f"lmi bench did not finish within {limit:g} s"}
    ended, wall = time.time(), time.monotonic() - began
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        error = f"lmi bench exited {done.returncode}: {done.stderr[-2000:]}"
        return {"concurrency": concurrency, "error": error}
    row = json.loads(lines[-1])["rows"][0]
    load_s = row.get("wall_s") or wall  # the requests' window, without the client's start-up
    row["gpu"] = gpu.summary(since=ended - load_s)
    row["server_cpu_cores"] = round((cpu_seconds(pids) - cpu_before) / load_s, 2)
    return row


def bench_server(args: argparse.Namespace, model_dir: Path, device: str, result: dict[str, Any]) -> None:
    env = {
        "OPTION_DEVICE": device,
        "OPTION_MAX_ROLLING_BATCH_SIZE": str(args.max_batch),
        "OPTION_MAX_MODEL_LEN": str(args.max_model_len),
    }
    if args.dtype != "auto":
        env["OPTION_DTYPE"] = args.dtype
    if args.kernels != "auto":
        env["OPTION_KERNELS"] = args.kernels
    env.update(item.split("=", 1) for item in args.env)
    log_path = Path(args.server_log or Path(args.out_dir) / "server.log")
    began = time.monotonic()
    server = Server(model_dir, args.port or free_port(), env, log_path)
    info: dict[str, Any] = {"cmd": server.cmd, "env": env, "log": str(log_path)}
    result["server"], result["levels"] = info, []
    try:
        server.wait_ready(args.server_timeout)
        info["ready_s"] = round(time.monotonic() - began, 1)
        say(f"server: ready in {info['ready_s']} s")
        warm = bench_cmd(server.url, model_dir, 1, 2, 8) + ["--timeout", str(args.request_timeout)]
        subprocess.run(warm, cwd=ROOT, capture_output=True, timeout=args.request_timeout + 120, check=False)
        for concurrency in args.concurrency:
            say(f"server: concurrency {concurrency}")
            row = run_level(args, server, model_dir, concurrency, device)
            result["levels"].append(row)
            write_json(args.json, result)
            if "error" in row:
                say(f"server: concurrency {concurrency}: {row['error']}")
            else:
                say(f"server: concurrency {concurrency}: {row['output_tokens_per_s']:.1f} tok/s")
    finally:
        server.stop()
        text = log_path.read_text(errors="replace") if log_path.is_file() else ""
        keys = ("Rolling-batch engine", "CUDA graph", "GPU memory", "dtype:", "Device:", "Traceback", "Error")
        info["log_lines"] = [line for line in text.splitlines() if any(k in line for k in keys)][:40]


# ---------------------------------------------------------------------------------------------------- report


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def report(result: dict[str, Any]) -> str:
    env, model = result["env"], result.get("model")
    out = [f"device {env['device']} ({env['device_name']}), torch {env['torch']}, python {env['python']}"]
    if model:
        out.append(
            f"model {model['path']}: {model['layers']} layers, hidden {model['hidden']}, "
            f"{model['heads']}/{model['kv_heads']} heads, vocab {model['vocab']}, {result.get('dtype')}, "
            f"{result.get('weight_bytes', 0) / 1e9:.2f} GB of weights"
        )
    bw = result.get("bandwidth")
    if bw and "error" not in bw:
        out.append(
            f"copy bandwidth {bw['bytes_per_s'] / 1e12:.3f} TB/s ({CONVENTION}; "
            f"{bw['buffer_bytes'] / 2**20:.0f} MiB copied in {bw['copy_ms_p50']:.3f} ms)"
        )
        out.append(
            f"floor per decode step = weight bytes / that rate = {result['floor_ms']:.3f} ms (the issue's "
            "convention; 'w+kv' adds the step's KV-cache reads)"
        )
    steps = result.get("steps", {})
    if steps.get("rows"):
        ops, context = steps.get("ops"), steps["context"]
        out.append(f"\nbare steps, context {context}, {ops} ops (forward only, synchronised; floors in ms):")
        headers = ["batch", "mode", "p50 ms", "p90 ms", "tok/s", "floor w", "floor w+kv", "x w", "x w+kv"]
        headers.append("build ms")
        rows = [
            [str(r["batch"]), r["mode"], "skipped: " + r["skipped"], *[""] * 7]
            if "skipped" in r
            else [
                str(r["batch"]),
                r["mode"],
                fmt(r["p50_ms"], 2),
                fmt(r["p90_ms"], 2),
                fmt(r["tok_s"]),
                fmt(r.get("floor_w_ms"), 2),
                fmt(r.get("floor_wkv_ms"), 2),
                fmt(r.get("x_floor_w"), 2),
                fmt(r.get("x_floor_wkv"), 2),
                fmt(r.get("build_ms"), 2),
            ]  # fmt: skip
            for r in steps["rows"]
        ]
        out.append(table(headers, rows))
        if "prefill" in steps:
            p = steps["prefill"]
            tokens = f"{p['seqs']} x {p['tokens_each']}"
            out.append(f"prefill {tokens} tokens: {p['p50_ms']} ms, {p['tok_s']:.0f} tok/s")
        out += [f"graphs: {steps['graphs']}"] if "graphs" in steps else []
        out += [f"note: {note}" for note in steps.get("notes", [])]
    if "error" in steps:
        out.append(f"bare steps failed: {steps['error']}")
    levels = result.get("levels") or []
    if levels:
        server = result.get("server", {})
        out.append(
            f"\nserver (ready in {server.get('ready_s')} s), closed loop, {result['args']['new_tokens']} new "
            "tokens, prompts 20-200 tokens, streamed OpenAI completions; ms; TPOT = inter-token gap:"
        )
        headers = ["conc", "reqs", "ok", "err", "req/min", "tok/s", "TTFT p50", "TTFT p99", "TPOT p50"]
        headers += ["TPOT p99", "GPU% mean", "GPU% p50", "GPU MiB", "srv CPU"]
        rows = []
        for r in levels:
            if "error" in r:
                rows.append([str(r["concurrency"]), "error: " + r["error"][:80], *[""] * 12])
                continue
            gpu = r.get("gpu") or {}
            rows.append(
                [
                    str(r["concurrency"]), str(r["requests"]), str(r["completed"]), str(r["errors"]),
                    fmt(r["requests_per_min"]), fmt(r["output_tokens_per_s"]), fmt(r["ttft_ms"]["p50"]),
                    fmt(r["ttft_ms"]["p99"]), fmt(r["itl_ms"]["p50"], 2), fmt(r["itl_ms"]["p99"], 2),
                    fmt(gpu.get("util_mean")), fmt(gpu.get("util_p50")), fmt(gpu.get("mem_used_mib_max")),
                    fmt(r["server_cpu_cores"], 2),
                ]
            )  # fmt: skip
        out.append(table(headers, rows))
        bad = [r for r in levels if r.get("errors")]
        out += [f"errors at c={r['concurrency']}: {r['error_kinds']} ({r['first_error']})" for r in bad]
    if "error" in result.get("server", {}):
        out.append(f"server failed: {result['server']['error']}")
    return "\n".join(out)


def write_json(path: str, result: dict[str, Any]) -> None:
    """Rewritten after every phase, so a run cut short still leaves what it measured."""
    Path(path).write_text(json.dumps(result, indent=1, default=str))


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model-dir", help="benchmark this Llama-family model folder")
    source.add_argument("--build-7b", metavar="DEST", help="write (once) and use a random 7B-shaped model")
    parser.add_argument("--tiny", action="store_true", help="build a 2-layer, hidden-256 model (CPU check)")
    parser.add_argument("--tokenizer-dir", help="tokenizer files + config.json to copy (default model's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto)")
    parser.add_argument("--dtype", default="auto", help="option.dtype for both the step bench and the server")
    parser.add_argument("--kernels", default="auto", help="option.kernels (auto)")
    parser.add_argument("--out-dir", default="/tmp/bench_gpu", help="logs, samples, JSON (/tmp/bench_gpu)")
    parser.add_argument("--json", help="result file (default OUT_DIR/bench_gpu.json)")
    parser.add_argument("--server-log", help="server output (default OUT_DIR/server.log)")
    parser.add_argument("--shard-gb", type=float, default=4.0, help="shard size when building (4)")
    parser.add_argument("--bandwidth-mib", type=int, help="copy buffer (1024 on CUDA, 64 on CPU)")
    parser.add_argument(
        "--batches",
        type=int_list,
        default=[1, 8, 32, 64, 128, 256],
        help="decode batches (1,8,32,64,128,256)",
    )
    parser.add_argument("--graph-batches", type=int_list, default=[1, 64], help="graph decode batches (1,64)")
    parser.add_argument("--context", type=int, default=512, help="tokens cached per sequence in a step (512)")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size (20)")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--prefill-seqs", type=int, default=8, help="timed prefill: sequences (8)")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=4096, help="tokens per prefill forward")
    parser.add_argument("--mem-reserve-gib", type=float, default=1.5, help="GPU memory kept free (1.5)")
    parser.add_argument(
        "--concurrency", type=int_list, default=[1, 64, 128, 256], help="load levels (1,64,128,256)"
    )
    parser.add_argument("--new-tokens", type=int, default=512, help="output tokens per request (ignore_eos)")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8, help="requests per level at least (8)")
    parser.add_argument(
        "--level-duration", type=float, default=60.0, help="seconds issuing requests per level"
    )
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--max-batch", type=int, default=256, help="option.max_rolling_batch_size (256)")
    parser.add_argument("--max-model-len", type=int, default=1024, help="option.max_model_len (1024)")
    parser.add_argument("--server-timeout", type=float, default=600.0, help="seconds to wait for /ping")
    parser.add_argument("--port", type=int, default=0, help="server port (a free one)")
    parser.add_argument("--env", nargs="*", default=[], help="extra KEY=VALUE for the server")
    for phase in ("bandwidth", "steps", "server"):
        parser.add_argument(f"--skip-{phase}", action="store_true")
    args = parser.parse_args(argv)
    args.json = args.json or str(Path(args.out_dir) / "bench_gpu.json")
    if args.context + 1 > args.max_model_len:
        parser.error("--max-model-len must exceed --context")
    if args.context < 2:
        parser.error("--context must be at least 2")
    return args


def environment(device: str) -> dict[str, Any]:
    cuda = torch.device(device).type == "cuda"
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
    }


def run_phase(name: str, result: dict[str, Any], fn: Callable[[], None]) -> None:
    """A failing phase is recorded and the next one still runs: device time is too short to lose."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported in the JSON and on stderr, then the run goes on
        import traceback

        traceback.print_exc()
        result.setdefault(name, {})
        result[name]["error"] = repr(exc)[:2000]
        say(f"{name}: failed: {exc!r}")


def run_all(args: argparse.Namespace, device: str, result: dict[str, Any]) -> None:
    from transformers import AutoConfig

    from engines.device import has_native_bf16
    from engines.hf.loading import resolve_dtype

    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        default = Path(args.out_dir) / ("tiny-llama" if args.tiny else "llama-7b-random")
        dest = Path(args.build_7b) if args.build_7b else default
        shape = TINY if args.tiny else SEVEN_B
        model_dir = build_model(dest, shape, tokenizer_source(args.tokenizer_dir), device, args.shard_gb)
    result["model"] = describe_model(model_dir)
    dtype = resolve_dtype(args.dtype, AutoConfig.from_pretrained(model_dir), device, has_native_bf16(device))
    result["dtype"] = str(dtype).removeprefix("torch.")
    result["weight_bytes"] = result["model"]["parameters"] * dtype.itemsize
    write_json(args.json, result)
    if not args.skip_bandwidth:

        def bandwidth() -> None:
            mib = args.bandwidth_mib or (1024 if torch.device(device).type == "cuda" else 64)
            result["bandwidth"] = copy_bandwidth(device, mib)
            result["floor_ms"] = result["weight_bytes"] / result["bandwidth"]["bytes_per_s"] * 1e3
            rate = result["bandwidth"]["bytes_per_s"] / 1e12
            say(f"bandwidth: {rate:.3f} TB/s, floor {result['floor_ms']:.3f} ms")

        run_phase("bandwidth", result, bandwidth)
        write_json(args.json, result)
    if not args.skip_steps:
        run_phase("steps", result, lambda: bench_steps(args, model_dir, device, dtype, result))
        gc.collect()  # the step bench's model, cache and graphs must be gone before the server loads
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        write_json(args.json, result)
    if not args.skip_server:
        run_phase("server", result, lambda: bench_server(args, model_dir, device, result))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks stop the server
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    from engines.device import resolve_device

    device = resolve_device(args.device)
    result: dict[str, Any] = {"args": vars(args), "env": environment(device)}
    try:
        run_all(args, device, result)
    finally:  # also when cut short (SIGTERM, Ctrl-C): keep and show what was measured
        result["total_s"] = round(time.monotonic() - STARTED, 1)
        write_json(args.json, result)
        print(report(result), flush=True)
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
