"""Sampling knobs shared by every API: read once with the API's own field names, checked the same way."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engines.types import SamplingParams
from handlers.builtin.formats.errors import RequestError
from handlers.builtin.formats.validate import SEED_LIMIT, get_float, get_int, qualified

KNOB_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
"""The fields read_knobs reads; every API's field list includes them under these names."""


@dataclass
class Knobs:
    """Sampling values as the client sent them (None = not sent)."""

    temperature: float | None
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int | None

    def any_warper(self) -> bool:
        """TGI samples when any warper is set even without do_sample (its NextTokenChooser rule)."""
        return self.temperature not in (None, 1.0) or self.top_k > 0 or self.top_p < 1.0


def read_knobs(
    data: Mapping[str, Any],
    where: str,
    *,
    min_temperature_exclusive: bool = False,
    max_temperature: float | None = None,
    top_k_minus_one: bool = False,
) -> Knobs:
    """Read temperature/top_k/top_p/repetition_penalty/seed with LMI/TGI ranges.

    ``top_k_minus_one`` accepts vLLM's ``-1`` (= disabled) for OpenAI-style requests.
    """
    temp_bound = {"gt": 0.0} if min_temperature_exclusive else {"ge": 0.0}
    temperature = get_float(data, "temperature", where, None, le=max_temperature, **temp_bound)
    top_k = get_int(data, "top_k", where, 0, minimum=-1 if top_k_minus_one else 0)
    top_p = get_float(data, "top_p", where, 1.0, gt=0.0, le=1.0, hint="Use 1.0 to disable nucleus sampling.")
    penalty = get_float(
        data, "repetition_penalty", where, 1.0, gt=0.0, hint="Use 1.0 for no repetition penalty."
    )
    seed = get_int(data, "seed", where, None, minimum=0, maximum=SEED_LIMIT - 1)
    return Knobs(temperature, max(top_k, 0), top_p, penalty, seed)


def build_params(
    knobs: Knobs,
    *,
    do_sample: bool,
    max_new_tokens: int,
    min_new_tokens: int,
    stop: tuple[str, ...],
    ignore_eos: bool,
    names: tuple[str, str, str],
) -> SamplingParams:
    """Cross-field checks, then the engine's SamplingParams.

    ``names`` = (where, max-tokens field, min-tokens field) so messages use the client's vocabulary.
    Greedy requests carry temperature 1.0 so an engine never divides by a client's 0.
    """
    where, max_name, min_name = names
    temperature = 1.0 if knobs.temperature is None else knobs.temperature
    if do_sample and temperature == 0:
        raise RequestError(
            f"`{qualified(where, 'temperature')}` must be > 0 when sampling, got 0. "
            "Set do_sample=false for greedy decoding, or use a positive temperature."
        )
    if min_new_tokens > max_new_tokens:
        raise RequestError(
            f"`{qualified(where, min_name)}` ({min_new_tokens}) must not exceed "
            f"`{qualified(where, max_name)}` ({max_new_tokens}); lower it or raise {max_name}."
        )
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_k=knobs.top_k,
        top_p=knobs.top_p,
        repetition_penalty=knobs.repetition_penalty,
        seed=knobs.seed,
        stop_sequences=stop,
        ignore_eos=ignore_eos,
        min_new_tokens=min_new_tokens,
    )
