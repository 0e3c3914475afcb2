"""The native Llama engine against transformers over a paged KV cache: logits, greedy decoding, chunked
prefill, shuffled block tables, dtypes, refusals.

Tiny seeded random models (a Llama from scripts/make_tiny_model.py and tests/support.py's Qwen2 with
q/k/v biases and tied embeddings) keep these exact and fast; the bundled SmolLM2 adds a real-model check.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from support import tiny_qwen2

from engines.device import cpu_bf16_flags
from engines.kernels import ops as ops_module
from engines.kernels.ops import NativeOps, TorchOps
from engines.kernels.paged import PagedAttentionMeta, paged_attention_reference
from engines.llama.batch import ForwardBatch
from engines.llama.kv_cache import PagedKVCache
from engines.llama.linear import Linear, dense_kernel, mkldnn_packing_available
from engines.llama.model import LlamaModel
from engines.llama.rope import inverse_frequencies
from engines.llama.spec import LlamaSpec
from engines.llama.weights import load_llama

MAKE_TINY = Path(__file__).resolve().parents[2] / "scripts" / "make_tiny_model.py"
KERNELS = {"torch": TorchOps, "native": NativeOps}
BLOCK_SIZES = [16, 1]
"""A typical page, and one token per block (every position its own block)."""


def _make_tiny_llama(dest: Path) -> Path:
    spec = importlib.util.spec_from_file_location("make_tiny_model", MAKE_TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny_model("llama", dest, seed=0)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """(model folder, HF reference model in fp32)."""
    from transformers import AutoModelForCausalLM

    dest = tmp_path_factory.mktemp(request.param)
    path = _make_tiny_llama(dest) if request.param == "llama" else tiny_qwen2(dest, vocab_size=320)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _load(
    path: Path, backend: str = "torch", dtype: torch.dtype = torch.float32, **kwargs: object
) -> tuple[LlamaModel, object]:
    """(model, HF config) with max_model_len 64 and the ops of ``backend``."""
    return load_llama(str(path), dtype, "cpu", max_model_len=64, ops=KERNELS[backend], **kwargs)


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def _tables(lengths: list[int], block_size: int, seed: int = 0) -> tuple[list[list[int]], int]:
    """Disjoint block tables for sequences of ``lengths`` tokens, dealt from a shuffled pool with a spare
    block (out of order and with gaps, as a long-running cache's are), and the pool's size."""
    needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(needed) + 1
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[sum(needed[:s]) : sum(needed[: s + 1])] for s in range(len(needed))], num_blocks


def _hf_greedy(hf_model: object, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
            max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def _hf_last_logits(hf_model: object, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([prompt])).logits[0, -1]


@dataclass
class Running:
    """One sequence of the Greedy driver."""

    tokens: list[int]
    prompt_len: int
    chunk: int | None
    """Most prompt tokens fed per step (None: the whole prompt at once)."""
    table: list[int] = field(default_factory=list)
    cached: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)
    """The logits each generated token was picked from."""

    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


class Greedy:
    """A minimal continuous-batching driver: every step packs prompt chunks and decodes into one forward.

    Sequences take blocks from a shuffled pool as they grow (so tables are out of order) and give them
    back when removed; a given-back block is the next one taken, stale rows and all."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, seed: int = 0) -> None:
        self.model, self.cache = model, cache
        generator = torch.Generator().manual_seed(seed)
        self.pool = torch.randperm(cache.num_blocks, generator=generator).tolist()
        self.seqs: dict[str, Running] = {}

    def add(self, name: str, prompt: list[int], chunk: int | None = None) -> None:
        self.seqs[name] = Running(list(prompt), len(prompt), chunk)

    def remove(self, name: str) -> None:
        self.pool.extend(reversed(self.seqs.pop(name).table))

    def step(self) -> None:
        size, entries, ends = self.cache.block_size, [], []
        for seq in self.seqs.values():
            end = len(seq.tokens) if seq.chunk is None else min(len(seq.tokens), seq.cached + seq.chunk)
            seq.table += [self.pool.pop() for _ in range(-(-end // size) - len(seq.table))]
            entries.append((seq.table, seq.tokens[seq.cached : end], seq.cached))
            ends.append(end)
        logits = self.model(ForwardBatch.build(entries, size), self.cache)
        for seq, end, row in zip(self.seqs.values(), ends, logits, strict=True):
            seq.cached = end
            if end == len(seq.tokens):  # the chunk reached the last token: the next one is predicted
                seq.logits.append(row)
                seq.tokens.append(int(row.argmax()))

    def generated(self, name: str) -> list[int]:
        return self.seqs[name].generated()


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_packed_prefill_matches_hf_logits(tiny: tuple[Path, object], backend: str, block_size: int) -> None:
    """Four prompts in one forward, in shuffled blocks; every packed row (the prompt log-probability
    path) matches HF's logits at its position, and by default only each prompt's last row comes back."""
    path, hf_model = tiny
    model, config = _load(path, backend)
    prompts = _prompts(config.vocab_size, [5, 1, 17, 9])
    tables, num_blocks = _tables([len(p) for p in prompts], block_size)
    cache = model.make_cache(num_blocks, block_size)
    batch = ForwardBatch.build([(t, p, 0) for t, p in zip(tables, prompts, strict=True)], block_size)
    logits = model(batch, cache)
    assert logits.dtype == torch.float32
    assert logits.shape == (4, config.vocab_size)
    every_row = model(batch, cache, torch.arange(batch.token_ids.numel()))
    start = 0
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            expected = hf_model(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(logits[row], expected[-1], atol=1e-4, rtol=0)
            rows = every_row[start : start + len(prompt)]
            torch.testing.assert_close(rows, expected, atol=1e-4, rtol=0)
            start += len(prompt)


@pytest.mark.parametrize("fast_path", ["dense-kernel", "onednn"])
def test_unpacked_weights_give_the_same_logits(
    tiny: tuple[Path, object], fast_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plain F.linear fallback computes the same model as the CPU fast paths: the dense kernel
    (decode-sized batches) and oneDNN's packed weights."""
    if fast_path == "onednn":
        monkeypatch.setenv("LMI_DENSE_KERNEL", "0")
    elif "avx512_bf16" not in cpu_bf16_flags():
        pytest.skip("the dense kernel needs AVX-512 BF16")
    else:
        assert dense_kernel(torch.float32) is not None, "the dense kernel did not build"
    path, _ = tiny
    packed, config = _load(path)
    plain, _ = _load(path, pack=False)
    assert plain.layers[0].qkv.packed is None
    assert plain.layers[0].qkv.dense is None
    if fast_path == "onednn":
        assert (packed.layers[0].qkv.packed is not None) == mkldnn_packing_available()
    else:
        assert packed.layers[0].qkv.dense is not None
        assert packed.layers[0].qkv.packed is None
    prompts = [*_prompts(config.vocab_size, [6]), [5, 6]]
    tables, num_blocks = _tables([6, 2], 4)
    batch = ForwardBatch.build([(t, p, 0) for t, p in zip(tables, prompts, strict=True)], 4)
    torch.testing.assert_close(
        packed(batch, packed.make_cache(num_blocks, 4)),
        plain(batch, plain.make_cache(num_blocks, 4)),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_chunked_prefill_matches_the_whole_prompt(
    tiny: tuple[Path, object], backend: str, block_size: int
) -> None:
    """The same prompt fed whole, in chunks of 3 and in chunks of 7 (each chunk attending the cached
    ones, next to the others' decodes) gives the same first logits and greedy tokens as HF."""
    path, hf_model = tiny
    model, config = _load(path, backend)
    (prompt,) = _prompts(config.vocab_size, [20], seed=3)
    driver = Greedy(model, model.make_cache(-(-3 * 30 // block_size) + 3, block_size))
    for chunk in (None, 3, 7):
        driver.add(str(chunk), prompt, chunk)
    for _ in range(12):
        driver.step()
    expected = _hf_greedy(hf_model, prompt, 12)
    first = _hf_last_logits(hf_model, prompt)
    # 20 prompt tokens take 7 steps in chunks of 3 and 3 in chunks of 7; the last one samples
    for name, generated in (("None", 12), ("3", 6), ("7", 10)):
        seq = driver.seqs[name]
        assert seq.generated() == expected[:generated]
        torch.testing.assert_close(seq.logits[0], first, atol=1e-4, rtol=0)
        torch.testing.assert_close(seq.logits[0], driver.seqs["None"].logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_staggered_greedy_decoding_matches_hf_generate(
    tiny: tuple[Path, object], backend: str, block_size: int
) -> None:
    path, hf_model = tiny
    model, config = _load(path, backend)
    prompts = _prompts(config.vocab_size, [7, 3, 12, 5], seed=1)
    driver = Greedy(model, model.make_cache(-(-4 * 30 // block_size) + 4, block_size))
    driver.add("a", prompts[0])
    driver.add("b", prompts[1])
    for _ in range(4):
        driver.step()
    driver.add("c", prompts[2], chunk=5)  # joins late: its chunks share forwards with two decodes
    for _ in range(4):
        driver.step()
    generated_b = driver.generated("b")
    driver.remove("b")  # leaves: its blocks go back and "d" takes them
    driver.add("d", prompts[3])
    for _ in range(6):
        driver.step()
    assert driver.generated("a") == _hf_greedy(hf_model, prompts[0], 14)
    assert generated_b == _hf_greedy(hf_model, prompts[1], 8)
    assert driver.generated("c") == _hf_greedy(hf_model, prompts[2], 8)  # 3 prefill steps, 7 decodes
    assert driver.generated("d") == _hf_greedy(hf_model, prompts[3], 6)


def test_native_routes_long_prefill_chunks_to_the_tiled_kernel(
    tiny: tuple[Path, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a low threshold, the 12- and 20-token chunks take SDPA while the other rows of the same
    step stay on the kernel: the outputs must still match HF token for token."""
    monkeypatch.setattr(ops_module, "LONG_PREFILL_TOKENS", 8)
    path, hf_model = tiny
    model, config = _load(path, "native")
    prompts = _prompts(config.vocab_size, [7, 20, 12], seed=5)
    driver = Greedy(model, model.make_cache(12, 8))
    driver.add("short", prompts[0])
    driver.add("long", prompts[1])  # long: SDPA, next to a short prefill on the kernel
    for _ in range(3):
        driver.step()
    driver.add("joins", prompts[2])  # long chunk joining two decoding sequences
    for _ in range(6):
        driver.step()
    assert driver.generated("short") == _hf_greedy(hf_model, prompts[0], 9)
    assert driver.generated("long") == _hf_greedy(hf_model, prompts[1], 9)
    assert driver.generated("joins") == _hf_greedy(hf_model, prompts[2], 6)


@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_freed_blocks_are_reused_without_stale_cache(tiny: tuple[Path, object], backend: str) -> None:
    path, hf_model = tiny
    model, config = _load(path, backend)
    long_prompt, short_prompt, other = _prompts(config.vocab_size, [30, 4, 6], seed=2)
    driver = Greedy(model, model.make_cache(8, 8))
    driver.add("long", long_prompt)
    driver.add("other", other)
    for _ in range(6):
        driver.step()
    stale = driver.seqs["long"].table
    driver.remove("long")
    driver.add("short", short_prompt)  # takes the long sequence's first block, stale rows past it
    for _ in range(6):
        driver.step()
    assert driver.seqs["short"].table[0] == stale[0]
    assert driver.generated("short") == _hf_greedy(hf_model, short_prompt, 6)
    assert driver.generated("other") == _hf_greedy(hf_model, other, 12)


@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_bf16_agrees_with_fp32(tiny: tuple[Path, object], backend: str) -> None:
    """bf16 rounding may flip near-ties, so each bf16 top-1 must only be among fp32's top 5."""
    path, _ = tiny
    fp32, config = _load(path)
    bf16, _ = _load(path, backend, torch.bfloat16)
    cache16 = bf16.make_cache(8, 4)
    assert bf16.embed_tokens.dtype == torch.bfloat16
    assert cache16.keys[0].dtype == torch.bfloat16
    driver = Greedy(fp32, fp32.make_cache(8, 4))
    prompts = _prompts(config.vocab_size, [9, 4], seed=4)
    driver.add("a", prompts[0])
    driver.add("b", prompts[1])
    for _ in range(5):
        driver.step()
    # Teacher-force bf16 on fp32's tokens (each step recomputes from position 0) and compare predictions.
    sequences = [driver.seqs[name].tokens for name in ("a", "b")]
    tables, _ = _tables([len(s) for s in sequences], 4, seed=1)
    for step in range(6):
        batch = ForwardBatch.build(
            [(tables[i], sequences[i][: len(prompts[i]) + step], 0) for i in (0, 1)], 4
        )
        top5 = fp32(batch, driver.cache).topk(5, dim=-1).indices
        predicted = bf16(batch, cache16).argmax(-1)
        assert all(predicted[row] in top5[row] for row in range(2))


@pytest.mark.parametrize("case", ["mixed", "mixed-long", "decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_ops_attention_matches_paged_reference(
    backend: str, dtype: torch.dtype, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ops class's attention over one step, against plain attention per sequence: decode rows and
    prefill chunks after cached prefixes (mixed; with -long the 16-token chunk takes NativeOps' SDPA
    route), or decodes only (TorchOps' one batched SDPA call), in shuffled blocks."""
    monkeypatch.setattr(ops_module, "LONG_PREFILL_TOKENS", 8 if case == "mixed-long" else 384)
    heads, kv_heads, dim, block_size = 6, 2, 8, 4
    contexts = [9, 3, 12, 7, 16, 1]
    queries = [1] * 6 if case == "decode" else [1, 3, 1, 4, 16, 1]
    tables, num_blocks = _tables(contexts, block_size, seed=2)
    generator = torch.Generator().manual_seed(0)
    # rows no sequence owns hold huge stale keys (a freed block's): reading one would swamp the output
    cache_k = torch.full((num_blocks, kv_heads, block_size, dim), 1e3)
    cache_v = torch.full_like(cache_k, -1e3)
    for table, context in zip(tables, contexts, strict=True):
        for position in range(context):
            where = (table[position // block_size], slice(None), position % block_size)
            cache_k[where] = torch.randn(kv_heads, dim, generator=generator)
            cache_v[where] = torch.randn(kv_heads, dim, generator=generator)
    cache_k, cache_v = cache_k.to(dtype), cache_v.to(dtype)
    q = torch.randn(sum(queries), heads, dim, generator=generator).to(dtype)
    meta = PagedAttentionMeta.build(tables, queries, contexts)
    assert meta.decode_only == (case == "decode")
    actual = KERNELS[backend].attention(q, cache_k, cache_v, meta)
    assert actual.dtype == dtype
    expected = paged_attention_reference(q.float(), cache_k.float(), cache_v.float(), meta)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(actual.float(), expected, atol=tolerance, rtol=0)


def test_unsupported_architectures_raise(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel"):
        load_llama(str(tmp_path))
    mistral = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 128}
    (tmp_path / "config.json").write_text(json.dumps(mistral))
    with pytest.raises(NotImplementedError, match="sliding-window"):
        load_llama(str(tmp_path), max_model_len=512)


def test_unsupported_rope_type_raises() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(NotImplementedError, match="yarn"):
        LlamaSpec.from_hf(config)


def test_llama3_rope_frequencies_match_hf() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}  # fmt: skip
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=rope)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    torch.testing.assert_close(inverse_frequencies(LlamaSpec.from_hf(config)), expected)


def test_forward_batch_and_model_refuse_what_the_cache_cannot_hold(tiny: tuple[Path, object]) -> None:
    with pytest.raises(ValueError, match="1 blocks of 16 cannot hold 17 tokens"):
        ForwardBatch.build([([0], list(range(17)), 0)], 16)
    with pytest.raises(ValueError, match="1 blocks of 4 cannot hold 5 tokens"):
        ForwardBatch.build([([0, 1], [1, 2], 0), ([2], [3], 4)], 4)  # a decode after 4 cached tokens
    with pytest.raises(ValueError, match="non-empty"):
        ForwardBatch.build([], 16)
    model, _ = _load(tiny[0])
    batch = ForwardBatch.build([([0, 1, 2, 3, 4], [7], 64)], 16)  # position 64: the 65th token
    with pytest.raises(ValueError, match="exceeds max_model_len=64"):
        model(batch, model.make_cache(5, 16))


def test_paged_cache_shapes_and_sizes() -> None:
    cache = PagedKVCache(2, 5, 16, 3, 8, torch.bfloat16, "cpu")
    assert cache.keys[0].shape == (5, 3, 16, 8)
    assert len(cache.keys) == len(cache.values) == 2
    assert cache.keys[1].dtype == torch.bfloat16
    assert not cache.values[0].any()  # zeros: kernels may load (and mask) rows past a context
    per_block = 2 * 2 * 3 * 16 * 8 * 2  # K and V, layers, kv heads, rows, head_dim, bytes
    assert PagedKVCache.block_bytes(2, 16, 3, 8, torch.bfloat16) == per_block
    assert PagedKVCache.block_bytes(2, 16, 3, 8, torch.float32) == 2 * per_block
    assert cache.bytes_per_block() == per_block
    assert cache.total_bytes() == 5 * per_block
    cache.keys[0][3] = 1.0
    cache.copy_blocks([(3, 1)])
    assert cache.keys[0][1].eq(1).all()
    assert not cache.keys[0][2].any()


def test_make_cache_fits_the_model(tiny: tuple[Path, object]) -> None:
    model, _ = _load(tiny[0], dtype=torch.bfloat16)
    cache = model.make_cache(7, 32)
    spec = model.spec
    assert (cache.num_layers, cache.num_blocks, cache.block_size) == (spec.num_layers, 7, 32)
    assert cache.keys[0].shape == (7, spec.num_kv_heads, 32, spec.head_dim)
    assert cache.keys[0].dtype == torch.bfloat16


@pytest.fixture(scope="module")
def default_model_path() -> str:
    from engines.base import EngineLoadError
    from engines.hf.default_model import ensure_default_model

    try:
        return ensure_default_model()
    except EngineLoadError as exc:
        pytest.skip(str(exc))


def test_default_model_greedy_matches_hf(default_model_path: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    hf_model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    model, _ = load_llama(default_model_path, torch.float32, "cpu", 128, ops=NativeOps)
    texts = ["The capital of France is", "Write a short poem about the sea. Here it is:"]
    driver = Greedy(model, model.make_cache(8, 16))
    for index, text in enumerate(texts):
        driver.add(text, tokenizer(text)["input_ids"], chunk=5 if index else None)  # the second in chunks
    for _ in range(18):
        driver.step()
    for text in texts:
        assert driver.generated(text)[:16] == _hf_greedy(hf_model, tokenizer(text)["input_ids"], 16)


@pytest.mark.skipif(not mkldnn_packing_available(), reason="oneDNN packing ops missing")
def test_packing_is_checked_once_per_shape_and_a_failed_check_is_kept(monkeypatch) -> None:
    """The F.linear comparison runs for the first weight of each (shape, dtype, bias); a shape whose
    packed weight disagreed is never packed again (its layers keep the plain weight and F.linear)."""
    from engines.llama import linear as linear_module

    monkeypatch.setenv("LMI_DENSE_KERNEL", "0")  # oneDNN's packing, where the dense kernel does not run

    monkeypatch.setattr(linear_module, "_PACK_VERIFIED", {})
    checked, verdict = [], {(16, 8): True, (8, 16): False}
    real = Linear._matches

    def counted(self: Linear, packed: torch.Tensor) -> bool:
        checked.append(tuple(self.weight.shape))
        return real(self, packed) and verdict[tuple(self.weight.shape)]

    monkeypatch.setattr(Linear, "_matches", counted)
    layers = [Linear(8, 16, False, torch.float32, "cpu") for _ in range(3)]
    layers += [Linear(16, 8, False, torch.float32, "cpu") for _ in range(2)]
    for layer in layers:
        torch.nn.init.normal_(layer.weight)
    x = torch.randn(4, 8)
    expected = [torch.nn.functional.linear(x, layer.weight) for layer in layers[:3]]
    assert [layer.pack() for layer in layers] == [True, True, True, False, False]
    assert checked == [(16, 8), (8, 16)]
    assert all(layer.weight is not None and layer.packed is None for layer in layers[3:])
    for layer, want in zip(layers[:3], expected, strict=True):
        torch.testing.assert_close(layer(x), want)  # the unchecked ones compute F.linear too


def test_pinned_attributes_follow_reassignment(tiny: tuple[Path, object]) -> None:
    """Loading pins submodules and parameters as plain attributes (the step loop's fast reads); assigning
    one again, as quantization does, must still reach both the attribute and the registration."""
    path, _ = tiny
    model, _ = _load(path)
    layer = model.layers[0]
    assert layer.__dict__["qkv"] is layer._modules["qkv"]
    assert layer.input_norm.__dict__["weight"] is layer.input_norm._parameters["weight"]
    names = sorted(model.state_dict())
    replacement = torch.nn.Identity()
    layer.qkv = replacement
    assert layer.qkv is replacement
    assert layer._modules["qkv"] is replacement
    weight = torch.nn.Parameter(torch.ones_like(layer.input_norm.weight), requires_grad=False)
    layer.input_norm.weight = weight
    assert layer.input_norm.weight is weight
    assert sorted(model.state_dict()) == [n for n in names if not n.startswith("layers.0.qkv.")]
