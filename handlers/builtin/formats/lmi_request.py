"""LMI ``/invocations`` bodies: ``{"inputs", "parameters", "stream"}``, or an OpenAI chat body."""

from __future__ import annotations

from typing import Any

from handlers.builtin.formats.openai_request import parse_chat
from handlers.builtin.formats.request import API_LMI, ROUTE_INVOCATIONS, ParsedRequest
from handlers.builtin.formats.sampling import KNOB_FIELDS, build_params, read_knobs
from handlers.builtin.formats.validate import (
    check_fields,
    get_bool,
    get_int,
    get_object,
    get_prompt,
    get_stop,
)

LMI_DEFAULT_MAX_NEW_TOKENS = 30
TOP_LEVEL = ("inputs", "parameters", "stream")
PARAMETERS = (
    "max_new_tokens",
    "do_sample",
    *KNOB_FIELDS,
    "stop_sequences",
    "stop",
    "ignore_eos",
    "ignore_eos_token",
    "min_new_tokens",
    "details",
    "return_full_text",
    "decoder_input_details",
)
IGNORED = ("top_n_tokens", "truncate", "watermark", "typical_p")
"""Known LMI/TGI knobs accepted and ignored (top tokens, truncation, watermark, typical-p are not offered)."""
NEUTRAL = {
    "best_of": (1,),
    "n": (1,),
    "num_beams": (1,),
    "frequency_penalty": (0, 0.0),
    "grammar": (),
    "adapter_id": (),
}
"""Accepted only as null or a no-op value (the text_generation client sends them as null): the rolling engine
makes one sequence per request and has no grammar, adapters or frequency penalty."""


def parse_lmi(body: dict[str, Any]) -> ParsedRequest:
    """Parse an LMI text-generation request; a body with ``messages`` is an OpenAI chat request."""
    if "messages" in body:
        return parse_chat(body, route=ROUTE_INVOCATIONS)
    check_fields(body, "", TOP_LEVEL)
    prompt = get_prompt(body)
    p = get_object(body, "parameters", "")
    check_fields(p, "parameters", PARAMETERS, IGNORED, NEUTRAL)
    where = "parameters"
    max_new = get_int(p, "max_new_tokens", where, None, minimum=1)
    stops = get_stop(p, "stop_sequences", where) + get_stop(p, "stop", where)
    ignore_eos = get_bool(p, "ignore_eos", where, False) or get_bool(p, "ignore_eos_token", where, False)
    params = build_params(
        read_knobs(p, where),
        do_sample=get_bool(p, "do_sample", where, False),
        max_new_tokens=LMI_DEFAULT_MAX_NEW_TOKENS if max_new is None else max_new,
        min_new_tokens=get_int(p, "min_new_tokens", where, 0, minimum=0),
        stop=tuple(dict.fromkeys(stops)),
        ignore_eos=ignore_eos,
        names=(where, "max_new_tokens", "min_new_tokens"),
    )
    return ParsedRequest(
        api=API_LMI,
        params=params,
        prompt=prompt,
        stream=get_bool(body, "stream", "", False),
        details=get_bool(p, "details", where, False),
        details_explicit=p.get("details") is not None,
        return_full_text=get_bool(p, "return_full_text", where, False),
        decoder_input_details=get_bool(p, "decoder_input_details", where, False),
        route=ROUTE_INVOCATIONS,
        max_new_tokens_set=max_new is not None,
    )
