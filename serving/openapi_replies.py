"""JSON Schemas of the answers of each dialect: bodies, stream events and error bodies.

They follow the response writers (handlers/builtin/formats/*_writer.py) and serving.dialects'
error bodies; tests/e2e/test_openapi_fuzz.py validates live answers against them.
"""

from __future__ import annotations

from serving.openapi_requests import CHAT_ROLES, FINISH_REASONS, TGI_FINISH_REASONS, Schema, obj, ref

INT: Schema = {"type": "integer"}
STR: Schema = {"type": "string"}
LOGPROB: Schema = {"type": ["number", "null"]}
OPENAI_FINISH: Schema = {"enum": ["stop", "length", None]}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


def lmi_schemas() -> dict[str, Schema]:
    """LMI's answers (lmi_writer.py); under option.tgi_compat tokens and finish reasons are TGI's."""
    lmi_token = obj(
        {"id": INT, "text": STR, "log_prob": LOGPROB, "special_token": {"const": True}},
        ("id", "text", "log_prob"),
    )
    token = {"anyOf": [lmi_token, ref("TgiToken")]}
    finish = {"enum": sorted(set(FINISH_REASONS) | set(TGI_FINISH_REASONS))}
    sequence = {
        "finish_reason": finish,
        "generated_tokens": INT,
        "tokens": array(token),
        "top_tokens": array(array(token)),
        "prefill": array(ref("PrefillToken")),
        "seed": {"type": ["integer", "null"]},
    }
    other = obj({**sequence, "generated_text": STR}, ("finish_reason", "generated_tokens", "generated_text"))
    details = obj(
        {**sequence, "inputs": STR, "best_of_sequences": array(other)},
        ("finish_reason", "generated_tokens", "inputs"),
    )
    generation = obj({"generated_text": STR, "details": details}, ("generated_text",))
    line = obj(
        {
            "token": token,
            "top_tokens": array(token),
            "generated_text": STR,
            "details": details,
            "error": STR,
            "code": INT,
        },
        ("token",),
        description="One token per line; the last adds generated_text (and details); an in-stream failure "
        "adds error and code.",
    )
    return {
        "LmiToken": lmi_token,
        "LmiGeneration": generation,
        "LmiGenerationList": array({"anyOf": [generation, {"type": "null"}]}),
        "LmiStreamLine": line,
    }


def openai_schemas() -> dict[str, Schema]:
    """/v1/completions and /v1/chat/completions answers (openai_*_writer.py)."""
    usage = obj(
        {
            "prompt_tokens": INT,
            "completion_tokens": INT,
            "total_tokens": INT,
            "prompt_tokens_details": obj({"cached_tokens": INT}, ("cached_tokens",)),
        },
        ("prompt_tokens", "completion_tokens", "total_tokens"),
    )
    legacy = obj(
        {
            "tokens": array(STR),
            "token_logprobs": array({"type": "number"}),
            "top_logprobs": array({"type": "object", "additionalProperties": {"type": "number"}}),
            "text_offset": array(INT),
        },
        ("tokens", "token_logprobs", "top_logprobs", "text_offset"),
    )
    text_choice = obj(
        {
            "index": INT,
            "text": STR,
            "logprobs": {"anyOf": [legacy, {"type": "null"}]},
            "finish_reason": OPENAI_FINISH,
        },
        ("index", "text", "logprobs", "finish_reason"),
    )
    chat_token = {"token": STR, "logprob": {"type": "number"}, "bytes": array(INT)}
    content = obj(
        {**chat_token, "top_logprobs": array(obj(chat_token, tuple(chat_token)))}, tuple(chat_token)
    )
    chat_logprobs = obj({"content": array(content), "refusal": {"type": "null"}}, ("content", "refusal"))
    logprobs = {"anyOf": [chat_logprobs, {"type": "null"}]}
    message = obj({"role": {"const": "assistant"}, "content": STR}, ("role", "content"))
    chat_choice = obj(
        {"index": INT, "message": message, "logprobs": logprobs, "finish_reason": OPENAI_FINISH},
        ("index", "message", "logprobs", "finish_reason"),
    )
    delta = obj({"role": {"enum": list(CHAT_ROLES)}, "content": STR})
    chunk_choice = obj(
        {"index": INT, "delta": delta, "logprobs": logprobs, "finish_reason": OPENAI_FINISH},
        ("index", "delta", "logprobs", "finish_reason"),
    )
    model = obj(
        {"id": STR, "object": {"const": "model"}, "created": INT, "owned_by": STR},
        ("id", "object", "created", "owned_by"),
    )
    return {
        "Usage": usage,
        "Completion": envelope("text_completion", text_choice, usage_required=True),
        "CompletionChunk": envelope("text_completion", text_choice, usage_required=False),
        "ChatCompletion": envelope("chat.completion", chat_choice, usage_required=True),
        "ChatCompletionChunk": envelope("chat.completion.chunk", chunk_choice, usage_required=False),
        "ModelList": obj({"object": {"const": "list"}, "data": array(model)}, ("object", "data")),
    }


def envelope(kind: str, choice: Schema, usage_required: bool) -> Schema:
    """An OpenAI object; stream chunks carry usage only with stream_options.include_usage (null before
    the last)."""
    usage = ref("Usage") if usage_required else {"anyOf": [ref("Usage"), {"type": "null"}]}
    props = {"id": STR, "object": {"const": kind}, "created": INT, "model": STR, "choices": array(choice)}
    required = ("id", "object", "created", "model", "choices")
    return obj({**props, "usage": usage}, (*required, "usage") if usage_required else required)


def tgi_schemas() -> dict[str, Schema]:
    """/generate and /generate_stream answers (tgi_writer.py)."""
    token = obj(
        {"id": INT, "text": STR, "logprob": LOGPROB, "special": {"type": "boolean"}},
        ("id", "text", "logprob", "special"),
    )
    sequence = {
        "finish_reason": {"enum": list(TGI_FINISH_REASONS)},
        "generated_tokens": INT,
        "seed": {"type": ["integer", "null"]},
        "prefill": array(ref("PrefillToken")),
        "tokens": array(ref("TgiToken")),
        "top_tokens": array(array(ref("TgiToken"))),
    }
    required = ("finish_reason", "generated_tokens", "seed", "prefill", "tokens")
    other = obj({**sequence, "generated_text": STR}, (*required, "generated_text"))
    details = obj({**sequence, "best_of_sequences": array(other)}, required)
    stream_details = obj(
        {
            "finish_reason": sequence["finish_reason"],
            "generated_tokens": INT,
            "seed": sequence["seed"],
            "input_length": INT,
        },
        ("finish_reason", "generated_tokens", "seed", "input_length"),
    )
    event = obj(
        {
            "index": INT,
            "token": ref("TgiToken"),
            "generated_text": {"type": ["string", "null"]},
            "details": {"anyOf": [stream_details, {"type": "null"}]},
            "top_tokens": array(ref("TgiToken")),
        },
        ("index", "token", "generated_text", "details"),
    )
    prefill = obj({"id": INT, "text": STR, "logprob": LOGPROB}, ("id", "text", "logprob"))
    return {
        "TgiToken": token,
        "PrefillToken": prefill,
        "GenerateResponse": obj({"generated_text": STR, "details": details}, ("generated_text",)),
        "StreamResponse": event,
    }


def error_schemas() -> dict[str, Schema]:
    """serving.dialects' error bodies: every layer's failure reaches the client in one of these."""
    openai = obj(
        {
            "message": STR,
            "type": {"enum": ["invalid_request_error", "rate_limit_exceeded", "server_error"]},
            "param": {"type": "null"},
            "code": INT,
        },
        ("message", "type", "param", "code"),
    )
    return {
        "LmiError": obj(
            {"code": INT, "type": STR, "message": STR, "error": STR}, ("code", "type", "message", "error")
        ),
        "OpenAIError": obj({"error": openai}, ("error",)),
        "TgiError": obj(
            {"error": STR, "error_type": {"enum": ["validation", "overloaded", "generation"]}},
            ("error", "error_type"),
        ),
    }


def server_schemas() -> dict[str, Schema]:
    """/ping and the model-management answers (serving.model_group, serving.model_routes)."""
    health = obj(
        {"status": {"enum": ["Healthy", "Unhealthy", "PENDING", "FAILED"]}, "reason": STR}, ("status",)
    )
    summary = obj({"modelName": STR, "modelUrl": STR, "status": STR}, ("modelName", "modelUrl"), closed=False)
    return {
        "Health": {"type": "object", "additionalProperties": health, "description": "Model name -> status."},
        "ManagementStatus": obj({"status": STR}, ("status",)),
        "ModelSummary": summary,
        "ModelPage": obj({"models": array(summary), "nextPageToken": STR}, ("models",)),
        "WorkflowDescription": array(
            obj({"workflowName": STR, "models": array(summary)}, ("workflowName", "models"))
        ),
    }


def reply_schemas() -> dict[str, Schema]:
    return {**lmi_schemas(), **openai_schemas(), **tgi_schemas(), **error_schemas(), **server_schemas()}
