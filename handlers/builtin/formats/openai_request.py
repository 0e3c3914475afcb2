"""OpenAI ``/v1/completions`` and ``/v1/chat/completions`` bodies (plus vLLM's common extras)."""

from __future__ import annotations

from typing import Any

from handlers.builtin.formats.chat_messages import parse_messages
from handlers.builtin.formats.errors import RequestError
from handlers.builtin.formats.request import API_CHAT, API_COMPLETION, ROUTE_V1, ParsedRequest
from handlers.builtin.formats.sampling import (
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
    get_str,
)

COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's documented default for /v1/completions."""
CHAT_DEFAULT_MAX_TOKENS = 1024
"""OpenAI has no fixed chat default (it runs to the context limit); see ParsedRequest.max_new_tokens_set."""

COMMON = (
    "model",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "stream_options",
    "seed",
    "ignore_eos",
    "n",
    *PENALTY_FIELDS,
    "logit_bias",
)
EXTRAS = ("top_k", "repetition_penalty", "min_tokens", *VLLM_FIELDS)
"""vLLM's extensions, so clients written for vLLM keep working."""
COMPLETION_FIELDS = (*COMMON, *EXTRAS, "prompt", "max_tokens", "logprobs", "echo", "best_of")
COMPLETION_NEUTRAL = {"suffix": ("",)}
COMPLETION_MAX_LOGPROBS = 5
"""OpenAI's limit for the legacy ``logprobs`` of /v1/completions."""
CHAT_FIELDS = (
    *COMMON,
    *EXTRAS,
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
)
CHAT_NEUTRAL = {
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
}
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key")
"""Bookkeeping fields with no effect on generated text."""


def _base(
    body: dict[str, Any], api: str, max_tokens: int | None, default_max: int, top_logprobs: int
) -> ParsedRequest:
    """Fields shared by both endpoints; temperature 0 means greedy, as in OpenAI and vLLM."""
    knobs = read_knobs(body, "", max_temperature=2.0, top_k_minus_one=True)
    temperature = 1.0 if knobs.temperature is None else knobs.temperature
    stream = get_bool(body, "stream", "", False)
    options = get_object(body, "stream_options", "")
    check_fields(options, "stream_options", ("include_usage",), ("include_obfuscation",))
    max_name = "max_tokens" if api == API_COMPLETION else "max_completion_tokens"
    n, best_of = read_counts(body, "", stream)
    params = build_params(
        knobs,
        do_sample=temperature > 0,
        max_new_tokens=default_max if max_tokens is None else max_tokens,
        min_new_tokens=get_int(body, "min_tokens", "", 0, minimum=0),
        stop=get_stop(body, "stop", ""),
        ignore_eos=get_bool(body, "ignore_eos", "", False),
        names=("", max_name, "min_tokens"),
        n=n,
        best_of=best_of,
        top_logprobs=top_logprobs,
    )
    return ParsedRequest(
        api=api,
        params=params,
        stream=stream,
        route=ROUTE_V1,
        model=get_str(body, "model", ""),
        include_usage=stream and get_bool(options, "include_usage", "stream_options", False),
        max_new_tokens_set=max_tokens is not None,
    )


def parse_completion(body: dict[str, Any]) -> ParsedRequest:
    """Parse /v1/completions; ``echo`` becomes return_full_text, ``logprobs`` (0..5 alternatives) the
    legacy per-token logprobs."""
    check_fields(body, "", COMPLETION_FIELDS, IGNORED, COMPLETION_NEUTRAL)
    prompt = get_prompt(body, "prompt")
    logprobs = get_int(body, "logprobs", "", None, minimum=0, maximum=COMPLETION_MAX_LOGPROBS)
    echo = get_bool(body, "echo", "", False)
    if echo and logprobs is not None:
        raise RequestError(
            "`echo` with `logprobs` is not supported (prompt log-probabilities are not computed)."
        )
    max_tokens = get_int(body, "max_tokens", "", None, minimum=1)
    parsed = _base(body, API_COMPLETION, max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, logprobs or 0)
    parsed.prompt, parsed.return_full_text, parsed.logprobs = prompt, echo, logprobs
    return parsed


def parse_chat(body: dict[str, Any], route: str = ROUTE_V1) -> ParsedRequest:
    """Parse a chat completion; ``route`` is "invocations" when it came through /invocations."""
    check_fields(body, "", CHAT_FIELDS, IGNORED, CHAT_NEUTRAL)
    messages = parse_messages(body.get("messages"))
    max_tokens = get_int(body, "max_completion_tokens", "", None, minimum=1)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", "", None, minimum=1)
    top = get_int(body, "top_logprobs", "", None, minimum=0, maximum=MAX_TOP_LOGPROBS)
    want_logprobs = get_bool(body, "logprobs", "", False)
    if top is not None and not want_logprobs:
        raise RequestError(f"`top_logprobs`={top} requires `logprobs`: true; set it or drop top_logprobs.")
    parsed = _base(body, API_CHAT, max_tokens, CHAT_DEFAULT_MAX_TOKENS, top or 0)
    parsed.messages, parsed.route = messages, route
    parsed.logprobs = (top or 0) if want_logprobs else None
    return parsed
