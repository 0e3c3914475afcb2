"""Start the real server as a subprocess on a free port, with bounded waits, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``lmi serve`` in a subprocess; its log goes to a file shown when a test fails."""

    def __init__(self, model_dir: str | Path | None, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="lmi-test-", suffix=".log", delete=False)  # noqa: SIM115
        cmd = [sys.executable, "-m", "serving", "serve", "--port", str(self.port)]
        if model_dir is not None:
            cmd += ["--model-dir", str(model_dir)]
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "SERVING_", "HF_MODEL"))
        }
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    def ping(self) -> requests.Response:
        resp = requests.get(self.url + "/ping", timeout=5)
        resp.content  # noqa: B018 - read the body so the connection is released and closed
        return resp

    def wait_ready(self, timeout_s: float = 120, expect: int = 200) -> requests.Response:
        deadline = time.monotonic() + timeout_s
        last: requests.Response | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                last = self.ping()
                if last.status_code == expect:
                    return last
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready ({last and last.status_code}) in {timeout_s}s:\n{self.tail()}")

    def post(self, path: str = "/invocations", json_body: object = None, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        return requests.post(self.url + path, json=json_body, **kwargs)

    def output(self) -> str:
        """Everything the server printed (access lines included: assertions search all of it)."""
        return Path(self.log.name).read_text(errors="replace")

    def tail(self) -> str:
        """The end of the output, for failure messages."""
        return self.output()[-6000:]

    def stop(self, timeout_s: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        os.unlink(self.log.name)


def tiny_model_script():
    """scripts/make_tiny_model.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "scripts" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generation_models(root: Path) -> dict[str, str]:
    """Seeded random GPT-2, T5 (with a chat template), Llama and BERT classifier checkpoints under
    ``root``. GPT-2 and T5 use wide initialisations so greedy outputs vary from token to token, which
    parity tests between engines need."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    script = tiny_model_script()
    bpe, t5_tokenizer = script.build_tokenizer("llama"), script.build_tokenizer("t5")
    t5_tokenizer.chat_template = script.LLAMA_CHAT_TEMPLATE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gpt2 = GPT2LMHeadModel(
            GPT2Config(
                n_layer=2, n_embd=32, n_head=2, vocab_size=len(bpe), n_positions=128, initializer_range=0.5,
                bos_token_id=bpe.bos_token_id, eos_token_id=bpe.eos_token_id,
            )
        )  # fmt: skip
        t5 = T5ForConditionalGeneration(
            T5Config(
                d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=len(t5_tokenizer),
                initializer_factor=5.0, pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id, decoder_start_token_id=t5_tokenizer.pad_token_id,
            )
        )  # fmt: skip
    paths = {}
    for name, model, tokenizer in (("gpt2", gpt2, bpe), ("t5", t5, t5_tokenizer)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    paths["llama"] = str(script.make_tiny_model("llama", root / "llama", seed=0))
    paths["bert"] = str(script.make_tiny_model("bert-cls", root / "bert", seed=0))
    return paths


def paged_attention_case(
    dtype: Any,
    shape: tuple[int, int, int, int],
    context_lens: list[int],
    query_lens: list[int],
    fill: float = float("nan"),
    seed: int = 0,
) -> tuple[Any, Any, Any, Any]:
    """A paged-attention test case: q (a strided view, as the model slices it from the fused projection),
    caches whose blocks are dealt to the sequences in shuffled order, and ``fill`` in every row no
    sequence owns (a kernel reading past a context poisons its output)."""
    import torch

    from engines.kernels.paged import PagedAttentionMeta

    heads, kv_heads, head_dim, block_size = shape
    generator = torch.Generator().manual_seed(seed)
    needed = [-(-context // block_size) for context in context_lens]
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = [order[sum(needed[:s]) : sum(needed[: s + 1])] for s in range(len(needed))]
    cache_k = torch.full((num_blocks, kv_heads, block_size, head_dim), fill)
    cache_v = torch.full_like(cache_k, fill)
    for table, context in zip(tables, context_lens, strict=True):
        rows = torch.randn(2, context, kv_heads, head_dim, generator=generator)
        blocks = torch.tensor(table).repeat_interleave(block_size)[:context]
        offsets = torch.arange(context) % block_size
        cache_k[blocks, :, offsets], cache_v[blocks, :, offsets] = rows[0], rows[1]
    fused = torch.randn(sum(query_lens), heads + 2 * kv_heads, head_dim, generator=generator)
    meta = PagedAttentionMeta.build(tables, query_lens, context_lens)
    return fused.to(dtype)[:, :heads], cache_k.to(dtype), cache_v.to(dtype), meta


def tiny_qwen2(dest: Path, vocab_size: int | None = None) -> Path:
    """A seeded random Qwen2: q/k/v biases (random, not zero), tied embeddings, 1 KV head, 3 layers;
    the test tokenizer's vocabulary unless ``vocab_size`` (an odd one pads the vocabulary shards)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_model_script().build_tokenizer("llama")
    config = Qwen2Config(
        vocab_size=vocab_size or len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=256, rope_theta=1e6, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
        for name, param in model.named_parameters():
            torch.nn.init.normal_(param, std=0.5 if name.endswith("bias") else 0.3)  # varied greedy outputs
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def tiny_mistral(dest: Path) -> Path:
    """A seeded random Mistral (8 heads, 2 KV heads, 4 layers) with wide weights, no sliding window."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = tiny_model_script().build_tokenizer("llama")
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=None,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = MistralForCausalLM(config)
        for param in model.parameters():
            torch.nn.init.normal_(param, std=0.3)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
