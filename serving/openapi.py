"""The OpenAPI 3.1 document of this server (``GET /openapi.json``), built once from its configuration.

It says what serving/app.py, serving/model_routes.py and the request parsers really do: the served
model's name in /predictions/{model}, the model-management routes only when they are enabled, the
response framing option.output_formatter/option.tgi_compat choose, bounds that reflect
option.max_model_len, and every error in the status and body its route's dialect answers with
(serving.dialects.error_reply). Bodies are JSON Schema 2020-12: serving/openapi_requests.py and
serving/openapi_replies.py. tests/unit/test_openapi.py checks it against the Flask routes.
"""

from __future__ import annotations

from typing import Any

from serving.auth import open_paths
from serving.config import ServingConfig
from serving.dialects import QUEUE_FULL_TYPE, ROUTE_APIS, Api, api_for_path, reply_status
from serving.errors import ShuttingDown
from serving.openapi_replies import reply_schemas
from serving.openapi_requests import DEFAULT_MAX_MODEL_LEN, Schema, ref, request_schemas

OPENAPI_VERSION = "3.1.0"
JSON, JSONLINES, SSE = "application/json", "application/jsonlines", "text/event-stream"
ERROR_SCHEMAS = {"lmi": "LmiError", "openai": "OpenAIError", "tgi": "TgiError"}
ERROR_CAUSES: tuple[tuple[int, str, str], ...] = (
    (400, "", "The body or a parameter is invalid (the message names the field and the fix)."),
    (404, "", "Unknown route, or a model this server does not serve."),
    (405, "", "The route exists but not with this method."),
    (408, "", "The body did not arrive within request_body_timeout."),
    (413, "", "The body exceeds max_request_size."),
    (424, "", "Generation failed inside the model (DJL's handler failure)."),
    (500, "", "The model worker died or failed unexpectedly."),
    (503, QUEUE_FULL_TYPE, "The bounded job queue is full: retry with back-off."),
    (503, ShuttingDown.error_type, "The server is shutting down, or the model is not loaded."),
    (504, "", "No answer within option.predict_timeout."),
)
"""(code a layer fails with, its error type, why): reply_status turns each into its route's status."""
HEAD_REFUSALS = {
    "414": "The request line exceeds limit_request_line (refused before routing: LMI's body).",
    "431": "The headers exceed limit_request_fields or limit_request_field_size (LMI's body).",
}
AUTH_FAILURE = "Missing or wrong API key: send Authorization: Bearer <key> (or X-Api-Key: <key>)."
MANAGEMENT_CAUSES = (
    (400, "", "A query parameter or the body is invalid."),
    (404, "", "No model of that name is loaded."),
    (409, "", "A model of that name is already loaded, or was unloaded while it loaded."),
    (500, "", "The command failed unexpectedly."),
    (503, "", "The server is shutting down, or the model failed (unload and load it again)."),
    (507, "", "Not enough memory for the model's workers."),
)


def build_document(config: ServingConfig) -> dict[str, Any]:
    """The whole document for ``config``."""
    limit = config.settings.get("max_model_len") or DEFAULT_MAX_MODEL_LEN
    paths = {**health_paths(config), **lmi_paths(config), **openai_paths(config), **tgi_paths(config)}
    if config.dynamic_models:
        paths.update(management_paths(config))
    return {
        "openapi": OPENAPI_VERSION,
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": "lmi-serving",
            "version": "0.1.0",
            "description": f"Serving model {config.model_name!r}: LMI/DJL, SageMaker, OpenAI and TGI APIs.",
        },
        "servers": [{"url": "/", "description": "The inference listener (this one)."}],
        "tags": [{"name": name, "description": doc} for name, doc in TAGS.items()],
        "paths": paths,
        "components": {
            "schemas": {**request_schemas(limit), **reply_schemas()},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "api_key (SERVING_API_KEY)."},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
            },
        },
    }


TAGS = {
    "health": "Liveness, metrics and this document.",
    "lmi": "DJL-Serving / SageMaker LMI inference.",
    "openai": "OpenAI-compatible completions and chat completions.",
    "tgi": "Text Generation Inference-compatible generation.",
    "management": "Loading, listing, scaling and unloading models at run time.",
}


def operation(
    config: ServingConfig, path: str, tag: str, summary: str, responses: dict, **fields: Any
) -> dict:
    """One operation; with api_key set, the routes serving.auth guards need a key or answer 401."""
    op = {"tags": [tag], "summary": summary, "operationId": fields.pop("operation_id"), **fields}
    if config.api_key is not None and path not in open_paths(config):
        op["security"] = [{"bearer": []}, {"apiKey": []}]
        refused = json_body(ref(ERROR_SCHEMAS[api_for_path(path).dialect]), AUTH_FAILURE)
        responses = {**responses, "401": refused}
    refusals = {status: json_body(ref("LmiError"), why) for status, why in HEAD_REFUSALS.items()}
    op["responses"] = dict(sorted({**refusals, **responses}.items()))
    return op


def json_body(schema: Schema, description: str = "") -> dict:
    return {"description": description or "OK", "content": {JSON: {"schema": schema}}}


def errors(
    config: ServingConfig, api: Api, causes: tuple[tuple[int, str, str], ...] = ERROR_CAUSES
) -> dict[str, dict]:
    """Every error of a route of ``api``, with the status and body its dialect's clients expect."""
    reasons: dict[int, list[str]] = {}
    for code, error_type, why in causes:
        reasons.setdefault(reply_status(api, code, error_type), []).append(why)
    schema = ref(ERROR_SCHEMAS[api.dialect])
    return {str(status): json_body(schema, " ".join(why)) for status, why in sorted(reasons.items())}


def stream_media(item: Schema, description: str) -> dict:
    """A streamed answer: one JSON document per line (jsonlines) or per ``data:`` event (SSE).

    OpenAPI 3.1 has no schema for stream items; ``x-itemSchema`` (3.2's itemSchema) gives it."""
    return {"schema": {"type": "string", "description": description}, "x-itemSchema": item}


def any_of(*names: str) -> Schema:
    return {"anyOf": [ref(name) for name in names]} if len(names) > 1 else ref(names[0])


def request_body(*names: str) -> dict:
    return {"required": True, "content": {JSON: {"schema": any_of(*names)}}}


# ---- health --------------------------------------------------------------------------------------
def health_paths(config: ServingConfig) -> dict[str, dict]:
    health = ref("Health")
    ping = operation(
        config,
        "/ping",
        "health",
        "Every model's status; the start-up model's decides the code.",
        {
            "200": json_body(health, "Healthy."),
            "500": json_body(health, "The model failed to load."),
            "503": json_body(health, "The model is loading or has no ready worker."),
        },
        operation_id="ping",
    )
    text = {"text/plain": {"schema": {"type": "string"}}}
    metrics = operation(
        config,
        "/metrics",
        "health",
        "Prometheus metrics in the text exposition format.",
        {
            "200": {"description": "Every process's metrics.", "content": text},
            "404": json_body(ref("LmiError"), "Metrics are disabled (metrics=false)."),
        },
        operation_id="metrics",
    )
    document = operation(
        config,
        "/openapi.json",
        "health",
        "This document.",
        {"200": json_body({"type": "object"}, "OpenAPI 3.1.")},
        operation_id="openapi",
    )
    return {"/ping": {"get": ping}, "/metrics": {"get": metrics}, "/openapi.json": {"get": document}}


# ---- LMI / SageMaker -----------------------------------------------------------------------------
def lmi_media(config: ServingConfig, tgi_compat: bool) -> dict[str, dict]:
    """/invocations' answer framings: ``stream`` picks jsonlines (SSE under tgi_compat), unless
    option.output_formatter fixes one (handlers.builtin.formats.factory.output_mode)."""
    body = any_of("LmiGeneration", "LmiGenerationList", "ChatCompletion")  # chat bodies: OpenAI's shape
    line = any_of("LmiStreamLine", "ChatCompletionChunk", "LmiError", "TgiError")
    fixed = (config.settings.get("output_formatter") or "").removesuffix("_chat")
    media = {JSON: {"schema": body}} if fixed in ("", "json") else {}
    if fixed in ("", "jsonlines"):
        media[JSONLINES] = stream_media(line, 'One JSON document per line ("stream": true).')
    if fixed == "sse" or (not fixed and tgi_compat):
        media[SSE] = stream_media(line, 'Server-sent events, each "data: <JSON>" ("stream": true).')
    return media


def lmi_operation(
    config: ServingConfig, path: str, summary: str, operation_id: str, parameters: list[dict]
) -> dict:
    tgi_compat = bool(config.settings.get("tgi_compat"))
    ok = {
        "description": "The generated text (custom handlers answer their own bodies).",
        "content": lmi_media(config, tgi_compat),
    }
    return operation(
        config,
        path,
        "lmi",
        summary,
        {"200": ok, **errors(config, Api.LMI)},
        operation_id=operation_id,
        parameters=parameters,
        requestBody=request_body("LmiRequest", "ChatCompletionRequest"),
    )


def model_schema(config: ServingConfig) -> Schema:
    """The served model's name, or any name when models are loaded at run time."""
    if config.dynamic_models:
        return {"type": "string", "pattern": "^[^/]+$", "minLength": 1}
    return {"type": "string", "enum": [config.model_name]}


def path_param(name: str, schema: Schema, description: str = "") -> dict:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


def lmi_paths(config: ServingConfig) -> dict[str, dict]:
    model = path_param("model", model_schema(config), "The model's name.")
    version = path_param("version", {"type": "string", "pattern": "^[^/]+$", "minLength": 1}, "Ignored.")
    name = {"name": "model_name", "in": "query", "required": False, "schema": model_schema(config)}
    return {
        path: {"post": lmi_operation(config, path, summary, operation_id, parameters)}
        for path, summary, operation_id, parameters in (
            ("/invocations", "SageMaker inference.", "invocations", [name]),
            ("/predictions/{model}", "DJL inference.", "predictions", [model]),
            (
                "/predictions/{model}/{version}",
                "DJL inference (a version).",
                "predictionsVersion",
                [model, version],
            ),
            ("/models/{model}/invoke", "DJL inference.", "invokeModel", [model]),
        )
    }


# ---- OpenAI --------------------------------------------------------------------------------------
def openai_paths(config: ServingConfig) -> dict[str, dict]:
    completions = {
        JSON: {"schema": ref("Completion")},
        SSE: stream_media(any_of("CompletionChunk", "OpenAIError"), 'SSE chunks, then "data: [DONE]".'),
    }
    chat = {
        JSON: {"schema": any_of("ChatCompletion", "LmiGeneration", "LmiGenerationList")},
        SSE: stream_media(any_of("ChatCompletionChunk", "OpenAIError"), 'SSE chunks, then "data: [DONE]".'),
        JSONLINES: stream_media(any_of("LmiStreamLine", "LmiError"), "An LMI body's stream (no messages)."),
    }
    models = operation(
        config,
        "/v1/models",
        "openai",
        "The served models.",
        {"200": json_body(ref("ModelList")), **errors(config, api_for_path("/v1/models"))},
        operation_id="listModels",
    )
    return {
        "/v1/completions": {
            "post": generation_op(config, Api.OPENAI_COMPLETIONS, completions, "CompletionRequest")
        },
        "/v1/chat/completions": {
            "post": generation_op(config, Api.OPENAI_CHAT, chat, "ChatCompletionRequest", "LmiRequest")
        },
        "/v1/models": {"get": models},
    }


def generation_op(config: ServingConfig, api: Api, content: dict, *bodies: str) -> dict:
    path = next(p for p, a in ROUTE_APIS.items() if a is api)
    ok = {"description": "The generated text, streamed when the body says so.", "content": content}
    return operation(
        config,
        path,
        api.dialect,
        f"POST {path}",
        {"200": ok, **errors(config, api)},
        operation_id=api.name.lower(),
        requestBody=request_body(*bodies),
    )


# ---- TGI -----------------------------------------------------------------------------------------
def tgi_paths(config: ServingConfig) -> dict[str, dict]:
    events = stream_media(any_of("StreamResponse", "TgiError"), 'Server-sent events, each "data: <JSON>".')
    generate = {JSON: {"schema": ref("GenerateResponse")}, SSE: events}
    compat = lmi_media(config, tgi_compat=True)
    return {
        "/generate": {"post": generation_op(config, Api.TGI_GENERATE, generate, "TgiRequest")},
        "/generate_stream": {"post": generation_op(config, Api.TGI_STREAM, {SSE: events}, "TgiRequest")},
        "/": {"post": generation_op(config, Api.TGI_COMPAT, compat, "LmiRequest", "ChatCompletionRequest")},
    }


# ---- model management ----------------------------------------------------------------------------
def management_paths(config: ServingConfig) -> dict[str, dict]:
    """SageMaker's multi-model API (inference port) and DJL's management API (its own listener)."""
    servers = []
    if config.multi_model:
        servers.append({"url": "/", "description": "SageMaker multi-model: the inference listener."})
    if config.management_port is not None:
        servers.append({"url": f"http://{config.management_address}", "description": "DJL management API."})
    status = json_body(ref("ManagementStatus"))
    accepted = json_body(ref("ManagementStatus"), "Accepted (synchronous=false).")
    done = {"200": status, "202": accepted, **errors(config, Api.LMI, MANAGEMENT_CAUSES)}
    name = path_param("name", {"type": "string", "pattern": "^[^/]+$", "minLength": 1}, "The model's name.")
    sync = query("synchronous", {"enum": ["true", "false"]}, "Answer once the workers are up (default true).")
    load_body = {
        "type": "object",
        "properties": {"model_name": {"type": "string"}, "url": {"type": "string"}},
    }

    def op(path: str, summary: str, operation_id: str, responses: dict, **fields: Any) -> dict:
        return operation(config, path, "management", summary, responses, operation_id=operation_id, **fields)

    described = any_of("WorkflowDescription", "ModelSummary")
    return {
        "/models": {
            "servers": servers,
            "post": op(
                "/models",
                "Load a model (url and model_name as query parameters or a JSON body).",
                "loadModel",
                done,
                parameters=[query("url", {"type": "string"}), query("model_name", {"type": "string"}), sync],
                requestBody={"required": False, "content": {JSON: {"schema": load_body}}},
            ),
            "get": op(
                "/models",
                "List loaded models.",
                "listLoadedModels",
                {"200": json_body(ref("ModelPage")), **errors(config, Api.LMI, MANAGEMENT_CAUSES)},
                parameters=[
                    query("limit", {"type": "integer", "minimum": 1}),
                    query("next_page_token", {"type": "integer", "minimum": 0}),
                ],
            ),
        },
        "/models/{name}": {
            "servers": servers,
            "parameters": [name],
            "get": op(
                "/models/{name}",
                "Describe a model.",
                "describeModel",
                {"200": json_body(described), **errors(config, Api.LMI, MANAGEMENT_CAUSES)},
            ),
            "delete": op("/models/{name}", "Unload a model once its workers exited.", "unloadModel", done),
            "put": op(
                "/models/{name}",
                "Scale a model's workers.",
                "scaleModel",
                done,
                parameters=[
                    query("min_worker", {"type": "integer", "minimum": 1}, required=True),
                    query("max_worker", {"type": "integer", "minimum": 1}),
                    sync,
                ],
            ),
        },
    }


def query(name: str, schema: Schema, description: str = "", required: bool = False) -> dict:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}
