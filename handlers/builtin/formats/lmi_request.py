"""LMI ``/invocations`` bodies: ``{"inputs", "parameters", "stream"}``, or an OpenAI chat body."""

from __future__ import annotations

from typing import Any

from handlers.builtin.formats.errors import RequestError
from handlers.builtin.formats.openai_request import parse_chat
from handlers.builtin.formats.request import API_LMI, ROUTE_INVOCATIONS, ParsedRequest
from handlers.builtin.formats.sampling import (
    KNOB_FIELDS,
    MAX_TOP_LOGPROBS,
    PENALTY_FIELDS,
    VLLM_FIELDS,
    build_params,
    read_counts,
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

LMI_DEFAULT_MAX_NEW_TOKENS = 30
TOP_LEVEL = ("inputs", "parameters", "stream")
PARAMETERS = (
    "max_new_tokens",
    "do_sample",
    *KNOB_FIELDS,
    *PENALTY_FIELDS,
    *VLLM_FIELDS,
    "logit_bias",
    "n",
    "best_of",
    "top_n_tokens",
    "stop_sequences",
    "stop",
    "ignore_eos",
    "ignore_eos_token",
    "min_new_tokens",
    "details",
    "return_full_text",
    "decoder_input_details",
)
IGNORED = ("truncate", "watermark", "typical_p")
"""Known LMI/TGI knobs accepted and ignored (truncation, watermark, typical-p are not offered)."""
NEUTRAL = {"num_beams": (1,), "grammar": (), "adapter_id": ()}
"""Accepted only as null or a no-op value (the text_generation client sends them as null): there is no
beam search, grammar or adapter support."""


def parse_lmi(body: dict[str, Any]) -> ParsedRequest:
    """Parse an LMI text-generation request; a body with ``messages`` is an OpenAI chat request."""
    if "messages" in body:
        return parse_chat(body, route=ROUTE_INVOCATIONS)
    check_fields(body, "", TOP_LEVEL)
    prompt = get_prompt(body)
    p = get_object(body, "parameters", "")
    check_fields(p, "parameters", PARAMETERS, IGNORED, NEUTRAL)
    where = "parameters"
    stream = get_bool(body, "stream", "", False)
    n, best_of = read_counts(p, where, stream)
    if stream and n > 1:
        raise RequestError(
            f"`parameters.n`={n} works only without streaming (LMI returns the other sequences in "
            "details.best_of_sequences at the end). Set stream to false, or n to 1."
        )
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
        n=n,
        best_of=best_of,
        top_logprobs=get_int(p, "top_n_tokens", where, 0, minimum=0, maximum=MAX_TOP_LOGPROBS),
    )
    return ParsedRequest(
        api=API_LMI,
        params=params,
        prompt=prompt,
        stream=stream,
        details=get_bool(p, "details", where, False),
        details_explicit=p.get("details") is not None,
        return_full_text=get_bool(p, "return_full_text", where, False),
        decoder_input_details=get_bool(p, "decoder_input_details", where, False),
        route=ROUTE_INVOCATIONS,
        max_new_tokens_set=max_new is not None,
    )
