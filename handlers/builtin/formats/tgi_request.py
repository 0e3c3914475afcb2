"""TGI ``/generate`` and ``/generate_stream`` bodies, including the None-filled ones text_generation sends."""

from __future__ import annotations

from typing import Any

from handlers.builtin.formats.errors import RequestError
from handlers.builtin.formats.lmi_request import IGNORED, NEUTRAL, TOP_LEVEL
from handlers.builtin.formats.request import API_TGI, ROUTE_TGI, ParsedRequest
from handlers.builtin.formats.sampling import (
    KNOB_FIELDS,
    MAX_N,
    MAX_TOP_LOGPROBS,
    Knobs,
    build_params,
    read_knobs,
)
from handlers.builtin.formats.validate import (
    check_fields,
    get_bool,
    get_int,
    get_object,
    get_prompt,
    get_stop,
)

TGI_DEFAULT_MAX_NEW_TOKENS = 20
"""TGI's classic default (and the text_generation client's)."""
PARAMETERS = (
    "max_new_tokens",
    "do_sample",
    *KNOB_FIELDS,
    "frequency_penalty",
    "top_n_tokens",
    "best_of",
    "stop",
    "details",
    "return_full_text",
    "decoder_input_details",
)


def _best_of(p: dict[str, Any], knobs: Knobs, do_sample: bool, stream: bool) -> int:
    """TGI's ``best_of``: that many sampled completions, the best returned (the rest in details)."""
    where = "parameters"
    best_of = get_int(p, "best_of", where, 1, minimum=1, maximum=MAX_N)
    if best_of == 1:
        return 1
    if not do_sample:
        raise RequestError(
            "`parameters.best_of` > 1 needs sampling: set do_sample, temperature, top_k or top_p."
        )
    if knobs.seed is not None:
        raise RequestError("`parameters.seed` must not be set when `parameters.best_of` > 1 (as in TGI).")
    if stream:
        raise RequestError("`parameters.best_of` > 1 cannot be streamed; use /generate or best_of 1.")
    return best_of


def parse_tgi(body: dict[str, Any], stream: bool | None = None) -> ParsedRequest:
    """Parse a TGI request; ``stream`` comes from the route (/generate_stream) and overrides the body.

    ``frequency_penalty`` is applied as OpenAI and vLLM define it (per occurrence in the generated text),
    not TGI's count divided by the sequence length.
    """
    check_fields(body, "", TOP_LEVEL)
    prompt = get_prompt(body)
    p = get_object(body, "parameters", "")
    where = "parameters"
    check_fields(p, where, PARAMETERS, IGNORED, NEUTRAL)
    knobs = read_knobs(p, where, min_temperature_exclusive=True)
    max_new = get_int(p, "max_new_tokens", where, None, minimum=1)
    do_sample = get_bool(p, "do_sample", where, False) or knobs.any_warper()
    stream = get_bool(body, "stream", "", False) if stream is None else stream
    params = build_params(
        knobs,
        do_sample=do_sample,
        max_new_tokens=TGI_DEFAULT_MAX_NEW_TOKENS if max_new is None else max_new,
        min_new_tokens=0,
        stop=get_stop(p, "stop", where),
        ignore_eos=False,
        names=(where, "max_new_tokens", "max_new_tokens"),
        n=_best_of(p, knobs, do_sample, stream),
        top_logprobs=get_int(p, "top_n_tokens", where, 0, minimum=0, maximum=MAX_TOP_LOGPROBS),
    )
    return ParsedRequest(
        api=API_TGI,
        params=params,
        prompt=prompt,
        stream=stream,
        details=get_bool(p, "details", where, False),
        details_explicit=p.get("details") is not None,
        return_full_text=get_bool(p, "return_full_text", where, False),
        decoder_input_details=get_bool(p, "decoder_input_details", where, False),
        route=ROUTE_TGI,
        max_new_tokens_set=max_new is not None,
    )
