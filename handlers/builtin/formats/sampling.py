"""Sampling knobs shared by every API: read once with the API's own field names, checked the same way."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engines.types import SamplingParams
from handlers.builtin.formats.errors import RequestError
from handlers.builtin.formats.validate import (
    SEED_LIMIT,
    get_float,
    get_int,
    get_logit_bias,
    get_token_ids,
    qualified,
)

KNOB_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
"""The fields every API accepts under these names (read by read_knobs)."""
PENALTY_FIELDS = ("presence_penalty", "frequency_penalty")
VLLM_FIELDS = ("min_p", "stop_token_ids")
"""vLLM's extensions, also LMI parameters."""
MAX_N = 16
"""Most completions (``n``, ``best_of``) one request may ask for."""
MAX_TOP_LOGPROBS = 20
PENALTY_LIMIT = 2.0
LOGIT_BIAS_LIMIT = 100.0
SMALLEST_FACTOR = 1e-6
"""The smallest positive temperature, top_p and repetition_penalty: the engines divide float32 logits by
temperature and repetition_penalty (and compare float32 sums with top_p), and far below this the result
overflows or rounds to nothing, so every probability becomes NaN and the whole batch's step fails."""
TINY_HINTS = {
    "temperature": "For greedy decoding use temperature 0 or do_sample=false.",
    "top_p": "Use a larger top_p, or top_k=1 for greedy decoding.",
    "repetition_penalty": "Use 1.0 for no repetition penalty.",
}


@dataclass
class Knobs:
    """Sampling values as the client sent them (None = not sent)."""

    temperature: float | None
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int | None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()

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
    """Read the sampling fields with LMI/TGI ranges; fields absent from ``data`` keep their neutral value.

    An API's check_fields has already refused the names it does not offer. ``top_k_minus_one`` accepts
    vLLM's ``-1`` (= disabled) for OpenAI-style requests.
    """
    temp_bound = {"gt": 0.0} if min_temperature_exclusive else {"ge": 0.0}
    temperature = get_float(data, "temperature", where, None, le=max_temperature, **temp_bound)
    top_k = get_int(data, "top_k", where, 0, minimum=-1 if top_k_minus_one else 0)
    top_p = get_float(data, "top_p", where, 1.0, gt=0.0, le=1.0, hint="Use 1.0 to disable nucleus sampling.")
    penalty = get_float(
        data, "repetition_penalty", where, 1.0, gt=0.0, hint="Use 1.0 for no repetition penalty."
    )
    seed = get_int(data, "seed", where, None, minimum=0, maximum=SEED_LIMIT - 1)
    for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", penalty)):
        if value is not None and 0 < value < SMALLEST_FACTOR:
            raise RequestError(
                f"`{qualified(where, name)}`={value!r} is too small: the smallest accepted is "
                f"{SMALLEST_FACTOR:g} (below it the model's float32 arithmetic overflows). {TINY_HINTS[name]}"
            )
    return Knobs(temperature, max(top_k, 0), top_p, penalty, seed, **_read_extras(data, where))


def _read_extras(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The OpenAI penalties, logit_bias and vLLM's min_p and stop_token_ids."""
    limit = {"ge": -PENALTY_LIMIT, "le": PENALTY_LIMIT, "hint": "Use 0 for no penalty."}
    return {
        "presence_penalty": get_float(data, "presence_penalty", where, 0.0, **limit),
        "frequency_penalty": get_float(data, "frequency_penalty", where, 0.0, **limit),
        "min_p": get_float(data, "min_p", where, 0.0, ge=0.0, le=1.0, hint="Use 0 to disable min_p."),
        "logit_bias": get_logit_bias(data, "logit_bias", where, LOGIT_BIAS_LIMIT),
        "stop_token_ids": get_token_ids(data, "stop_token_ids", where),
    }


def read_counts(data: Mapping[str, Any], where: str, stream: bool) -> tuple[int, int | None]:
    """``n`` (completions returned) and ``best_of`` (completions generated; None = n), each 1..MAX_N.

    best_of > n picks the best completions at the end, so it cannot stream.
    """
    hint = f"This server runs at most {MAX_N} completions per request."
    n = get_int(data, "n", where, 1, minimum=1, maximum=MAX_N, hint=hint)
    best_of = get_int(data, "best_of", where, None, minimum=1, maximum=MAX_N, hint=hint)
    if best_of is not None and best_of < n:
        raise RequestError(
            f"`{qualified(where, 'best_of')}` ({best_of}) must be >= `{qualified(where, 'n')}` ({n}); "
            "raise best_of or drop it."
        )
    if best_of is not None and best_of > n and stream:
        raise RequestError(
            f"`{qualified(where, 'best_of')}`={best_of} > `{qualified(where, 'n')}`={n} cannot be streamed: "
            "the best completions are known only at the end. Set stream to false, or best_of to n."
        )
    return n, (best_of if best_of is not None and best_of > n else None)


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """RequestError when logit_bias or stop_token_ids names an id outside the tokenizer's vocabulary."""
    for name, ids in (
        ("logit_bias", [t for t, _ in params.logit_bias]),
        ("stop_token_ids", params.stop_token_ids),
    ):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise RequestError(
                f"`{name}` names token id {bad[0]}, but the vocabulary has {vocab_size} tokens "
                f"(ids 0..{vocab_size - 1}); use ids from the model's tokenizer."
            )


def build_params(
    knobs: Knobs,
    *,
    do_sample: bool,
    max_new_tokens: int,
    min_new_tokens: int,
    stop: tuple[str, ...],
    ignore_eos: bool,
    names: tuple[str, str, str],
    n: int = 1,
    best_of: int | None = None,
    top_logprobs: int = 0,
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
        n=n,
        best_of=best_of,
        presence_penalty=knobs.presence_penalty,
        frequency_penalty=knobs.frequency_penalty,
        min_p=knobs.min_p,
        logit_bias=knobs.logit_bias,
        stop_token_ids=knobs.stop_token_ids,
        top_logprobs=top_logprobs,
    )
