"""The native Llama engine against transformers: logits, greedy decoding, slots, dtypes, refusals.

Tiny seeded random models (a Llama from scripts/make_tiny_model.py and a Qwen2 with q/k/v biases and
tied embeddings built here) keep these exact and fast; the bundled SmolLM2 adds a real-model check.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from engines.kernels.ops import NativeOps, TorchOps
from engines.llama.attention import attend
from engines.llama.batch import ForwardBatch
from engines.llama.kv_cache import SlotKVCache
from engines.llama.linear import mkldnn_packing_available
from engines.llama.model import LlamaModel
from engines.llama.rope import inverse_frequencies
from engines.llama.spec import LlamaSpec
from engines.llama.weights import load_llama

MAKE_TINY = Path(__file__).resolve().parents[2] / "scripts" / "make_tiny_model.py"


def _make_tiny_llama(dest: Path) -> Path:
    spec = importlib.util.spec_from_file_location("make_tiny_model", MAKE_TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny_model("llama", dest, seed=0)


def _make_tiny_qwen2(dest: Path) -> Path:
    """Qwen2 with random (not zero-initialised) q/k/v biases, tied embeddings and a large rope theta."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=256, rope_theta=1e6, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(param, std=0.5)
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """(model folder, HF reference model in fp32)."""
    from transformers import AutoModelForCausalLM

    dest = tmp_path_factory.mktemp(request.param)
    path = _make_tiny_llama(dest) if request.param == "llama" else _make_tiny_qwen2(dest)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def _hf_greedy(hf_model: object, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
            max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


class Greedy:
    """A minimal continuous-batching driver: every step packs prefills and decodes into one forward."""

    def __init__(self, model: LlamaModel, cache: SlotKVCache) -> None:
        self.model, self.cache = model, cache
        self.seqs: dict[int, tuple[list[int], int]] = {}  # slot -> (all tokens, prompt length)
        self.cached: dict[int, int] = {}

    def add(self, slot: int, prompt: list[int]) -> None:
        self.seqs[slot], self.cached[slot] = (list(prompt), len(prompt)), 0

    def step(self) -> None:
        entries = []
        for slot, (tokens, _) in self.seqs.items():
            entries.append((slot, tokens[self.cached[slot] :], self.cached[slot]))
            self.cached[slot] = len(tokens)
        logits = self.model(ForwardBatch.build(entries), self.cache)
        for (slot, _, _), token in zip(entries, logits.argmax(-1).tolist(), strict=True):
            self.seqs[slot][0].append(token)

    def generated(self, slot: int) -> list[int]:
        tokens, prompt_len = self.seqs[slot]
        return tokens[prompt_len:]


KERNELS = {"torch": TorchOps, "native": NativeOps}


@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_packed_prefill_matches_hf_logits(tiny: tuple[Path, object], backend: str) -> None:
    path, hf_model = tiny
    model, cache, config = load_llama(
        str(path), torch.float32, "cpu", num_slots=4, max_model_len=64, ops=KERNELS[backend]
    )
    prompts = _prompts(config.vocab_size, [5, 1, 17, 9])
    batch = ForwardBatch.build([(slot, p, 0) for slot, p in zip([2, 0, 3, 1], prompts, strict=True)])
    logits = model(batch, cache)
    assert logits.dtype == torch.float32
    assert logits.shape == (4, config.vocab_size)
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            expected = hf_model(torch.tensor([prompt])).logits[0, -1]
            torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=0)


def test_unpacked_weights_give_the_same_logits(tiny: tuple[Path, object]) -> None:
    """The plain F.linear fallback (no oneDNN packing) computes the same model."""
    path, _ = tiny
    packed, packed_cache, config = load_llama(str(path), torch.float32, "cpu", num_slots=2, max_model_len=64)
    plain, plain_cache, _ = load_llama(
        str(path), torch.float32, "cpu", num_slots=2, max_model_len=64, pack=False
    )
    assert plain.layers[0].qkv.packed is None
    assert (packed.layers[0].qkv.packed is not None) == mkldnn_packing_available()
    batch = ForwardBatch.build([(0, p, 0) for p in _prompts(config.vocab_size, [6])] + [(1, [5, 6], 0)])
    torch.testing.assert_close(packed(batch, packed_cache), plain(batch, plain_cache), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_chunked_prefill_continues_a_prefix(tiny: tuple[Path, object], backend: str) -> None:
    path, hf_model = tiny
    model, cache, config = load_llama(
        str(path), torch.float32, "cpu", num_slots=2, max_model_len=64, ops=KERNELS[backend]
    )
    (prompt,) = _prompts(config.vocab_size, [20], seed=3)
    model(ForwardBatch.build([(1, prompt[:8], 0)]), cache)
    logits = model(ForwardBatch.build([(1, prompt[8:], 8)]), cache)
    with torch.inference_mode():
        torch.testing.assert_close(
            logits[0], hf_model(torch.tensor([prompt])).logits[0, -1], atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_staggered_greedy_decoding_matches_hf_generate(tiny: tuple[Path, object], backend: str) -> None:
    path, hf_model = tiny
    model, cache, config = load_llama(
        str(path), torch.float32, "cpu", num_slots=6, max_model_len=64, ops=KERNELS[backend]
    )
    prompts = _prompts(config.vocab_size, [7, 3, 12], seed=1)
    driver = Greedy(model, cache)
    driver.add(5, prompts[0])  # non-contiguous slots, not in slot order
    driver.add(1, prompts[1])
    for _ in range(4):
        driver.step()
    driver.add(3, prompts[2])  # joins late: its prefill shares a forward with two decodes
    for _ in range(10):
        driver.step()
    assert driver.generated(5) == _hf_greedy(hf_model, prompts[0], 14)
    assert driver.generated(1) == _hf_greedy(hf_model, prompts[1], 14)
    assert driver.generated(3) == _hf_greedy(hf_model, prompts[2], 10)


def test_native_routes_long_prefill_chunks_to_sdpa(
    tiny: tuple[Path, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a low threshold, the 12- and 20-token chunks take SDPA while the other rows of the same
    step stay on the kernel: the outputs must still match HF token for token."""
    import engines.llama.attention as attention

    monkeypatch.setattr(attention, "LONG_PREFILL_TOKENS", 8)
    path, hf_model = tiny
    model, cache, config = load_llama(str(path), torch.float32, "cpu", 6, 64, ops=NativeOps)
    prompts = _prompts(config.vocab_size, [7, 20, 12], seed=5)
    driver = Greedy(model, cache)
    driver.add(0, prompts[0])
    driver.add(2, prompts[1])  # long: SDPA, next to a short prefill on the kernel
    for _ in range(3):
        driver.step()
    driver.add(4, prompts[2])  # long chunk joining two decoding sequences
    for _ in range(6):
        driver.step()
    assert driver.generated(0) == _hf_greedy(hf_model, prompts[0], 9)
    assert driver.generated(2) == _hf_greedy(hf_model, prompts[1], 9)
    assert driver.generated(4) == _hf_greedy(hf_model, prompts[2], 6)


@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_freed_slot_is_reused_without_stale_cache(tiny: tuple[Path, object], backend: str) -> None:
    path, hf_model = tiny
    model, cache, config = load_llama(
        str(path), torch.float32, "cpu", num_slots=3, max_model_len=64, ops=KERNELS[backend]
    )
    long_prompt, short_prompt, other = _prompts(config.vocab_size, [30, 4, 6], seed=2)
    first, second = cache.allocate(), cache.allocate()
    driver = Greedy(model, cache)
    driver.add(first, long_prompt)
    driver.add(second, other)
    for _ in range(6):
        driver.step()
    cache.free(first)
    del driver.seqs[first]
    reused = cache.allocate()
    assert reused == first
    driver.add(reused, short_prompt)  # shorter than the stale 36 tokens left in this slot
    for _ in range(6):
        driver.step()
    assert driver.generated(reused) == _hf_greedy(hf_model, short_prompt, 6)
    assert driver.generated(second) == _hf_greedy(hf_model, other, 12)


@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_bf16_agrees_with_fp32(tiny: tuple[Path, object], backend: str) -> None:
    """bf16 rounding may flip near-ties, so each bf16 top-1 must only be among fp32's top 5."""
    path, _ = tiny
    fp32, cache32, config = load_llama(str(path), torch.float32, "cpu", num_slots=2, max_model_len=64)
    bf16, cache16, _ = load_llama(
        str(path), torch.bfloat16, "cpu", num_slots=2, max_model_len=64, ops=KERNELS[backend]
    )
    assert bf16.embed_tokens.dtype == torch.bfloat16
    assert cache16.keys[0].dtype == torch.bfloat16
    driver = Greedy(fp32, cache32)
    prompts = _prompts(config.vocab_size, [9, 4], seed=4)
    driver.add(0, prompts[0])
    driver.add(1, prompts[1])
    for _ in range(5):
        driver.step()
    # Teacher-force bf16 on fp32's tokens and compare each step's prediction.
    sequences = [driver.seqs[slot][0] for slot in (0, 1)]
    for step in range(6):
        batch = ForwardBatch.build(
            [(slot, sequences[slot][: len(prompts[slot]) + step], 0) for slot in (0, 1)]
        )
        top5 = fp32(batch, cache32).topk(5, dim=-1).indices
        predicted = bf16(batch, cache16).argmax(-1)
        assert all(predicted[row] in top5[row] for row in range(2))


@pytest.mark.parametrize("backend", sorted(KERNELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [[0, 1, 2], [4, 1, 2]])
def test_decode_attention_matches_per_sequence_reference(
    dtype: torch.dtype, slots: list[int], backend: str
) -> None:
    """Both SDPA decode layouts (heads as rows in bf16, enable_gqa in fp32) and the native kernel, in
    and out of slot order, next to a prefill chunk, against plain attention over each prefix."""
    heads, kv_heads, dim = 6, 2, 8
    generator = torch.Generator().manual_seed(0)
    cache_k = torch.randn(6, kv_heads, 16, dim, generator=generator).to(dtype)
    cache_v = torch.randn(6, kv_heads, 16, dim, generator=generator).to(dtype)
    starts = [9, 3, 12]
    batch = ForwardBatch.build(
        [(slot, [1], start) for slot, start in zip(slots, starts, strict=True)] + [(3, [1, 1], 0)]
    )
    q = torch.randn(batch.token_ids.numel(), heads, dim, generator=generator).to(dtype)
    out = attend(q, cache_k, cache_v, batch, KERNELS[backend].decode_attention).view(-1, heads, dim)
    for row, (slot, start) in enumerate(zip(slots, starts, strict=True)):
        keys = cache_k[slot, :, : start + 1].float().repeat_interleave(heads // kv_heads, 0)
        values = cache_v[slot, :, : start + 1].float().repeat_interleave(heads // kv_heads, 0)
        weights = (q[row].float().unsqueeze(1) @ keys.transpose(1, 2) / dim**0.5).softmax(-1)
        expected = (weights @ values).squeeze(1)  # [heads, dim]
        torch.testing.assert_close(
            out[row].float(), expected, atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0
        )


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


def test_slot_cache_allocation_and_sizes() -> None:
    cache = SlotKVCache(2, 4, 16, 3, 8, torch.bfloat16, "cpu")
    assert cache.keys[0].shape == (4, 3, 16, 8)
    assert len(cache.values) == 2
    assert cache.bytes_per_slot() == 2 * 2 * 3 * 16 * 8 * 2
    assert cache.total_bytes() == 4 * cache.bytes_per_slot()
    assert SlotKVCache.slots_for_budget(10 * cache.bytes_per_slot() + 1, 2, 16, 3, 8, torch.bfloat16) == 10
    assert [cache.allocate() for _ in range(4)] == [0, 1, 2, 3]
    assert cache.num_free() == 0
    with pytest.raises(RuntimeError):
        cache.allocate()
    cache.free(2)
    cache.free(0)
    assert (cache.allocate(), cache.allocate()) == (0, 2)
    cache.free(2)
    with pytest.raises(ValueError, match="not allocated"):
        cache.free(2)


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
    model, cache, _ = load_llama(default_model_path, torch.float32, "cpu", 2, 128, ops=NativeOps)
    texts = ["The capital of France is", "Write a short poem about the sea. Here it is:"]
    driver = Greedy(model, cache)
    for slot, text in enumerate(texts):
        driver.add(slot, tokenizer(text)["input_ids"])
    for _ in range(16):
        driver.step()
    for slot, text in enumerate(texts):
        assert driver.generated(slot) == _hf_greedy(hf_model, tokenizer(text)["input_ids"], 16)
