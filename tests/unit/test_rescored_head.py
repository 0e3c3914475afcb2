"""The LM head of quantized models: int8 logits with each row's best candidates rescored in float."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import tiny_model_script, tiny_qwen2

from engines.quant.head import RescoredHead
from engines.quant.linear import QuantizedLinear
from engines.quant.methods import quantize_int8


def near_ties(vocab: int, hidden: int, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [vocab, hidden], hidden states [rows, hidden]) whose float logits have many near-ties:
    pairs of vocabulary rows differ by less than int8's rounding."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(vocab // 2, hidden, generator=generator) * 0.05
    weight = torch.cat([base, base + torch.randn(base.shape, generator=generator) * 1e-4])
    return weight, torch.randn(rows, hidden, generator=generator)


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_rescored_head_equals_its_reference(rows, dtype, bias):
    generator = torch.Generator().manual_seed(rows)
    weight = (torch.randn(300, 96, generator=generator) * 0.05).to(dtype)
    bias_values = torch.randn(300, generator=generator).to(dtype) if bias else None
    head = RescoredHead(weight, bias_values, dtype)
    assert head.kernel == "native"
    x = torch.randn(rows, 96, generator=generator).to(dtype)
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    torch.testing.assert_close(head(x).float(), head.expected(x).float(), **tolerance)


def test_the_float_argmax_survives_where_int8_alone_flips_it():
    """On near-ties the int8 head alone picks another token for some rows; rescored, every row's argmax
    is the float head's and the best candidates carry the float logits."""
    weight, x = near_ties(vocab=512, hidden=128, rows=200, seed=3)
    exact = x.double() @ weight.double().T
    int8_alone = QuantizedLinear(quantize_int8(weight), None, torch.float32)(x)
    assert (int8_alone.argmax(-1) != exact.argmax(-1)).sum() > 0
    head = RescoredHead(weight, None, torch.float32)
    got = head(x)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    best = exact.topk(8, dim=-1).indices
    torch.testing.assert_close(got.gather(1, best).double(), exact.gather(1, best), atol=1e-5, rtol=1e-5)
    tail = ~torch.zeros_like(got, dtype=torch.bool).scatter_(1, got.topk(head.candidates, -1).indices, True)
    assert not torch.allclose(got[tail].double(), exact[tail], atol=1e-6)  # the rest is int8's


def test_few_tokens_rescore_them_all():
    weight, x = near_ties(vocab=40, hidden=64, rows=3, seed=1)
    head = RescoredHead(weight, None, torch.float32)
    assert head.candidates == 40
    torch.testing.assert_close(head(x).double(), x.double() @ weight.double().T, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> Path:
    return tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    return tiny_qwen2(tmp_path_factory.mktemp("qwen2"))


def test_which_head_a_quantized_model_gets(untied, tied):
    """8-bit models and tied heads: rescored (the float rows are the head's own or the embedding, not a
    copy); an untied 4-bit model's head: int8 in blocks of 32 with 16-bit activations."""
    from engines.llama.weights import load_llama

    eight_bit, _ = load_llama(str(untied), torch.float32, quantize="int8")
    assert isinstance(eight_bit.lm_head, RescoredHead)
    four_bit_tied, _ = load_llama(str(tied), torch.float32, quantize="int4", group_size=32)
    assert isinstance(four_bit_tied.lm_head, RescoredHead)
    assert four_bit_tied.lm_head.exact.data_ptr() == four_bit_tied.embed_tokens.data_ptr()
    four_bit_untied, _ = load_llama(str(untied), torch.float32, quantize="int4", group_size=32)
    assert isinstance(four_bit_untied.lm_head, QuantizedLinear)
    assert four_bit_untied.lm_head.activation_bits == 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "width", "count"), [(1, 49152, 64), (7, 1000, 64), (3, 70, 70), (2, 17, 1)])
def test_top_candidates_are_the_largest_values(dtype, rows, width, count):
    """The kernel's one-pass selection holds each row's `count` largest values (ties may pick other
    indices of equal value), for widths that leave a partial vector and counts up to the width."""
    from engines.quant.kernels import native_module

    generator = torch.Generator().manual_seed(width)
    logits = torch.randn(rows, width, generator=generator).to(dtype)
    logits[0, width // 2] = 50.0  # a clear maximum in the middle of a row
    top = native_module().top_candidates(logits, count)
    assert top.shape == (rows, count)
    assert all(len(set(row.tolist())) == count for row in top)  # no index twice
    got = logits.float().gather(1, top).sort(-1).values
    torch.testing.assert_close(got, logits.float().topk(count, -1).values.sort(-1).values, atol=0, rtol=0)
    assert width // 2 in top[0].tolist()


def test_top_candidates_refuse_more_than_the_width():
    from engines.quant.kernels import native_module

    with pytest.raises(RuntimeError, match="count must be in 1..10"):
        native_module().top_candidates(torch.randn(2, 10), 11)


def test_no_rows_give_no_logits():
    head = RescoredHead(torch.randn(100, 64) * 0.05, None, torch.float32)
    assert head(torch.zeros(0, 64)).shape == (0, 100)


def test_a_chunked_prompt_through_a_quantized_engine(tied):
    """A prompt longer than a step's prefill budget: its middle chunks sample nothing, so the head gets
    no rows on those steps; the tokens equal those of one unchunked prefill."""
    from engines.base import EngineConfig
    from engines.rolling.factory import create_rolling_engine
    from engines.types import GenerationRequest, SamplingParams

    def tokens(prefill_budget: int) -> list[int]:
        engine = create_rolling_engine(
            EngineConfig(
                model_path=str(tied),
                dtype="fp32",
                max_model_len=128,
                quantize="int4",
                quantize_group_size=32,
                max_rolling_batch_prefill_tokens=prefill_budget,
            )
        )
        try:
            assert isinstance(engine.model.lm_head, RescoredHead)
            params = SamplingParams(max_new_tokens=6, ignore_eos=True)
            admit, out = [GenerationRequest("a", list(range(3, 60)), params)], []
            while admit or engine.running:
                out += [event.token_id for event in engine.step(admit, [])]
                admit = []
            return out
        finally:
            engine.close()

    assert tokens(16) == tokens(4096)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_candidates_rank_nan_last_and_keep_ties(dtype):
    """A NaN never blocks a larger value (it ranks below every number); equal values fill the count."""
    from engines.quant.kernels import native_module

    logits = torch.zeros(2, 100, dtype=dtype)
    logits[0, 0] = float("nan")  # first: it would sit at the heap's front
    logits[0, 50:53] = 3.0
    logits[1, :] = 1.0  # all tied
    top = native_module().top_candidates(logits, 3)
    assert sorted(top[0].tolist()) == [50, 51, 52]
    assert len(set(top[1].tolist())) == 3
