"""JSON Schemas (2020-12, as OpenAPI 3.1 uses) of the request bodies of each dialect.

The ranges are the request parsers' own (handlers/builtin/formats: validate, sampling, *_request), so
an example inside them is one the server accepts, and tests/unit/test_openapi.py checks the field lists
and limits against those modules. Plain dicts; serving/openapi.py puts them in the document.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

MAX_N = 16
"""Most completions (``n``, ``best_of``) per request (handlers.builtin.formats.sampling.MAX_N)."""
MAX_TOP_LOGPROBS = 20
COMPLETION_MAX_LOGPROBS = 5
PENALTY_LIMIT = 2.0
LOGIT_BIAS_LIMIT = 100.0
SEED_MAX = 2**64 - 1
SMALLEST_FACTOR = 1e-6
"""The smallest positive temperature, top_p and repetition_penalty (formats.sampling.SMALLEST_FACTOR)."""
DEFAULT_MAX_MODEL_LEN = 2048
"""option.max_model_len's default is min(model, 2048): no answer can hold more tokens than this."""
FINISH_REASONS = ("length", "eos_token", "stop_sequence", "cancelled", "error")
TGI_FINISH_REASONS = ("length", "eos_token", "stop_sequence")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """Every request field may be null: the parsers read null as "not sent" (text_generation sends it)."""
    if "type" in schema:
        return {**schema, "type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def integer(minimum: int | None = None, maximum: int | None = None, doc: str = "") -> Schema:
    schema: Schema = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return nullable({**schema, "description": doc} if doc else schema)


def number(doc: str = "", **bounds: float) -> Schema:
    """``bounds``: minimum, maximum, exclusiveMinimum as JSON Schema names them."""
    return nullable({"type": "number", **bounds, **({"description": doc} if doc else {})})


def boolean(doc: str = "") -> Schema:
    return nullable({"type": "boolean", **({"description": doc} if doc else {})})


def obj(
    properties: dict[str, Schema], required: tuple[str, ...] = (), closed: bool = True, **extra: Any
) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


PROMPT: Schema = {"type": "string", "minLength": 1}
STOP: Schema = nullable(
    {"anyOf": [PROMPT, {"type": "array", "items": PROMPT}], "description": "Stop strings (not empty)."}
)
IGNORED: Schema = {"description": "Accepted (with any value) and ignored."}


def knobs(openai: bool = False, tgi: bool = False) -> dict[str, Schema]:
    """temperature, top_k, top_p, repetition_penalty, seed (formats.sampling.read_knobs)."""
    temperature = number("0 = greedy." if not tgi else "", minimum=SMALLEST_FACTOR)
    if openai:
        temperature["maximum"] = 2.0
    if not tgi:
        temperature = {"anyOf": [{"const": 0}, temperature]}
    return {
        "temperature": temperature,
        "top_k": integer(-1 if openai else 0, doc="0 (or -1 on OpenAI routes) disables top-k."),
        "top_p": number(minimum=SMALLEST_FACTOR, maximum=1),
        "repetition_penalty": number("1.0 = no penalty.", minimum=SMALLEST_FACTOR),
        "seed": integer(0, SEED_MAX),
    }


def extras() -> dict[str, Schema]:
    """OpenAI's penalties and logit_bias, vLLM's min_p and stop_token_ids (formats.sampling)."""
    penalty = {"minimum": -PENALTY_LIMIT, "maximum": PENALTY_LIMIT}
    bias = {"type": "number", "minimum": -LOGIT_BIAS_LIMIT, "maximum": LOGIT_BIAS_LIMIT}
    return {
        "presence_penalty": number(**penalty),
        "frequency_penalty": number(**penalty),
        "min_p": number(minimum=0, maximum=1),
        "stop_token_ids": nullable({"type": "array", "items": {"type": "integer", "minimum": 0}}),
        "logit_bias": nullable(
            {
                "type": "object",
                "propertyNames": {"pattern": "^[0-9]+$"},
                "additionalProperties": bias,
                "description": "Token id (a string of digits, inside the vocabulary) -> bias.",
            }
        ),
    }


def counts() -> dict[str, Schema]:
    return {"n": integer(1, MAX_N), "best_of": integer(1, MAX_N, "Completions generated; >= n.")}


def detail_flags() -> dict[str, Schema]:
    return {name: boolean() for name in ("details", "return_full_text", "decoder_input_details")}


IGNORED_LMI = {
    "truncate": nullable({"type": "integer", **IGNORED}),
    "watermark": nullable({"type": "boolean", **IGNORED}),
    "typical_p": nullable({"type": "number", **IGNORED}),
}
NEUTRAL_LMI = {
    "num_beams": {"enum": [1, None], "description": "No beam search: only null or 1."},
    "grammar": {"type": "null"},
    "adapter_id": {"type": "null"},
}


def max_tokens(limit: int, name: str = "max_new_tokens") -> Schema:
    return integer(1, limit, f"Prompt tokens + {name} must fit option.max_model_len ({limit} here).")


def lmi_parameters(limit: int) -> Schema:
    props = {
        "max_new_tokens": max_tokens(limit),
        "do_sample": boolean(),
        **knobs(),
        **extras(),
        **counts(),
        "top_n_tokens": integer(0, MAX_TOP_LOGPROBS),
        "stop_sequences": STOP,
        "stop": STOP,
        "ignore_eos": boolean(),
        "ignore_eos_token": boolean(),
        "min_new_tokens": integer(0, limit),
        **detail_flags(),
        **IGNORED_LMI,
        **NEUTRAL_LMI,
    }
    return nullable(obj(props))


def lmi_request(limit: int) -> Schema:
    inputs = {"anyOf": [PROMPT, {"type": "array", "items": PROMPT, "minItems": 1}]}
    props = {"inputs": inputs, "parameters": lmi_parameters(limit), "stream": boolean()}
    return obj(props, ("inputs",), description="An LMI request: one prompt, or a list answered as a list.")


def tgi_request(limit: int) -> Schema:
    params = {
        "max_new_tokens": max_tokens(limit),
        "do_sample": boolean(),
        **knobs(tgi=True),
        "frequency_penalty": extras()["frequency_penalty"],
        "top_n_tokens": integer(0, MAX_TOP_LOGPROBS),
        "best_of": integer(1, MAX_N, "> 1 needs sampling, no seed and no streaming."),
        "stop": STOP,
        **detail_flags(),
        **IGNORED_LMI,
        **NEUTRAL_LMI,
    }
    props = {"inputs": PROMPT, "parameters": nullable(obj(params)), "stream": boolean()}
    return obj(props, ("inputs",))


OPENAI_IGNORED = {
    **{
        name: nullable({"type": "string", **IGNORED}) for name in ("user", "service_tier", "prompt_cache_key")
    },
    **{name: nullable({"type": "boolean", **IGNORED}) for name in ("store", "parallel_tool_calls")},
    "metadata": nullable({"type": "object", "additionalProperties": {"type": "string"}, **IGNORED}),
}


def openai_common(limit: int) -> dict[str, Schema]:
    options = obj(
        {"include_usage": boolean(), "include_obfuscation": nullable({"type": "boolean", **IGNORED})}
    )
    return {
        "model": nullable({"type": "string"}),
        **knobs(openai=True),
        "stop": STOP,
        "stream": boolean(),
        "stream_options": nullable(options),
        "ignore_eos": boolean(),
        "n": counts()["n"],
        **extras(),
        "min_tokens": integer(0, limit),
        **OPENAI_IGNORED,
    }


def completion_request(limit: int) -> Schema:
    props = {
        **openai_common(limit),
        "prompt": PROMPT,
        "best_of": counts()["best_of"],
        "max_tokens": max_tokens(limit, "max_tokens"),
        "logprobs": integer(0, COMPLETION_MAX_LOGPROBS),
        "echo": boolean("Not with logprobs."),
        "suffix": {"enum": ["", None]},
    }
    return obj(props, ("prompt",))


def chat_message() -> Schema:
    part = obj({"type": {"const": "text"}, "text": {"type": "string"}}, ("type", "text"))
    content = {"anyOf": [{"type": "string"}, {"type": "array", "items": part}, {"type": "null"}]}
    props = {"role": {"enum": list(CHAT_ROLES)}, "content": content}
    return obj(props, ("role",), closed=False, description="content is required except for assistant.")


def chat_request(limit: int) -> Schema:
    props = {
        **openai_common(limit),
        "messages": {"type": "array", "items": chat_message(), "minItems": 1},
        "max_tokens": max_tokens(limit, "max_tokens"),
        "max_completion_tokens": max_tokens(limit, "max_completion_tokens"),
        "logprobs": boolean(),
        "top_logprobs": integer(0, MAX_TOP_LOGPROBS, "Needs logprobs: true."),
        "tools": {"enum": [[], None]},
        "tool_choice": {"enum": ["none", "auto", None]},
        "response_format": {"enum": [{"type": "text"}, None]},
        "modalities": {"enum": [["text"], None]},
    }
    return obj(props, ("messages",))


def request_schemas(limit: int) -> dict[str, Schema]:
    """``limit``: the most tokens one answer can hold (option.max_model_len), bounding every max field."""
    return {
        "LmiRequest": lmi_request(limit),
        "TgiRequest": tgi_request(limit),
        "CompletionRequest": completion_request(limit),
        "ChatCompletionRequest": chat_request(limit),
    }
