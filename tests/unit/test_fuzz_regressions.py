"""Server errors schemathesis found (tests/e2e/test_openapi_fuzz.py), each pinned where it was fixed.

1. A tiny positive temperature, top_p or repetition_penalty (1e-40, 1e-300) passed the parsers' "> 0"
   checks; the engine then divided float32 logits by it (or compared top_p rounded to 0), every
   probability became NaN, and the step failed for the whole batch: 424 to LMI/TGI clients and 500 to
   OpenAI ones. Now such a value is a 400 naming the field, and the smallest accepted one samples.
"""

from __future__ import annotations

import pytest
import torch

from engines.sampling import apply_repetition_penalty, draw
from engines.types import SamplingParams
from handlers.builtin.formats import RequestError, parse_request
from handlers.builtin.formats.sampling import SMALLEST_FACTOR
from serving.dialects import Api

TINY = 1e-40


def body_for(api: Api, field: str, value: float) -> dict:
    if api is Api.OPENAI_COMPLETIONS:
        return {"prompt": "hi", "temperature": 1.0, field: value}
    return {"inputs": "hi", "parameters": {"do_sample": True, field: value}}


@pytest.mark.parametrize("api", [Api.LMI, Api.TGI_GENERATE, Api.OPENAI_COMPLETIONS])
@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
def test_a_tiny_positive_sampling_factor_is_a_400_naming_the_field(api: Api, field: str):
    with pytest.raises(RequestError) as caught:
        parse_request(api, body_for(api, field, TINY))
    message = str(caught.value)
    assert f"{field}`={TINY!r} is too small" in message
    assert f"the smallest accepted is {SMALLEST_FACTOR:g}" in message


@pytest.mark.parametrize("api", [Api.LMI, Api.TGI_GENERATE, Api.OPENAI_COMPLETIONS])
def test_the_smallest_accepted_factors_parse(api: Api):
    for field in ("temperature", "top_p", "repetition_penalty"):
        params = parse_request(api, body_for(api, field, SMALLEST_FACTOR)).params
        assert getattr(params, field) == SMALLEST_FACTOR


def test_the_smallest_accepted_factors_sample_a_real_token():
    """Where 1e-40 made NaN probabilities, 1e-6 still gives the (near-)greedy token."""
    generator = torch.Generator().manual_seed(0)
    row = torch.randn(64, generator=generator) * 30
    best = int(torch.argmax(row))
    tiny = SamplingParams(do_sample=True, temperature=SMALLEST_FACTOR, top_p=SMALLEST_FACTOR)
    assert draw(row.clone(), tiny, generator) == best
    penalised = row.clone()
    apply_repetition_penalty(
        penalised, torch.tensor([best]), SamplingParams(repetition_penalty=SMALLEST_FACTOR)
    )
    assert torch.isfinite(penalised).all()
    assert draw(penalised, SamplingParams(do_sample=True), generator) == best  # divided by 1e-6: far ahead
