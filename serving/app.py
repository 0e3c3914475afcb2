"""Flask routes. Each route turns HTTP into an InferRequest, and broker frames back into HTTP."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from serving import messages as msg
from serving.access import RequestRecord
from serving.access import install as install_observability
from serving.auth import api_key_hook
from serving.client import BrokerClient
from serving.config import ServingConfig
from serving.dialects import ROUTE_APIS, Api, api_for_path, error_reply
from serving.errors import BadRequest, NotFound, ServingError
from serving.openapi import build_document

log = logging.getLogger("serving.app")

PING_STATUS = {"Healthy": 200, "FAILED": 500}
HOP_BY_HOP = {"content-length", "transfer-encoding", "connection"}
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
CREDENTIAL_HEADERS = {"authorization", "x-api-key"}
"""Not handed to handlers as properties: the API key stays in the HTTP front."""
NO_CACHE = {"Cache-Control": "no-cache; no-store, must-revalidate, private", "Pragma": "no-cache"}


def json_response(body: object, status: int, headers: dict[str, str] | None = None) -> Response:
    headers = dict(headers or {})
    headers.setdefault("x-request-id", client_request_id())
    return Response(json.dumps(body), status=status, mimetype="application/json", headers=headers)


def current_api() -> Api:
    """The API of the request being handled: set by its route, else read from the path."""
    return g.get("api") or api_for_path(request.path)


def error_response(code: int, message: str, error_type: str = "", headers: dict | None = None) -> Response:
    """Any error, from any layer, in the current route's dialect (serving.dialects)."""
    status, body = error_reply(current_api(), code, message, error_type)
    return json_response(body, status, headers)


def request_properties(request_id: str) -> dict[str, str]:
    """Headers (but credentials) become properties (as DJL); SageMaker custom attributes are exploded."""
    props = {k: v for k, v in request.headers.items() if k.lower() not in CREDENTIAL_HEADERS}
    for pair in request.headers.get(CUSTOM_ATTRIBUTES, "").split(";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip():
            props[key.strip()] = value.strip()
    props["requestId"] = request_id
    return props


def check_json(body: bytes) -> None:
    if request.mimetype not in ("application/json", "application/jsonlines") or not body.strip():
        return
    documents = [body] if request.mimetype == "application/json" else body.splitlines()
    for document in documents:
        try:
            if document.strip():
                json.loads(document)
        except ValueError as exc:
            raise BadRequest(
                f"Malformed JSON body: {exc}. Fix: send valid JSON, e.g. "
                '{"inputs": "Hello", "parameters": {"max_new_tokens": 32}}.'
            ) from None


def client_request_id() -> str:
    """The id the client knows the request by (echoed back); routing uses an internal id."""
    if "request_id" not in g:
        g.request_id = (
            request.headers.get("X-Amzn-SageMaker-Inference-Id")
            or request.headers.get("x-request-id")
            or uuid.uuid4().hex
        )
    return g.request_id


def build_request(api: Api = Api.LMI, model: str | None = None) -> msg.InferRequest:
    g.api = api  # before the body is read: a 413 from reading it answers in this dialect
    body = request.get_data(cache=False)
    check_json(body)
    content = [(key, value.encode()) for key, value in request.args.items(multi=True)]
    content.append(("data", body))
    properties = request_properties(client_request_id())
    return msg.InferRequest(uuid.uuid4().hex, properties, content, api, model=model)


def head_response(head: msg.InferResponse, body: bytes | Iterator[bytes]) -> Response:
    headers = {k: v for k, v in head.properties.items() if k.lower() not in HOP_BY_HOP}
    headers.setdefault("x-request-id", client_request_id())
    headers.update(NO_CACHE)
    response = Response(body, status=head.code, headers=headers)
    if not any(k.lower() == "content-type" for k in headers):
        response.mimetype = guess_mimetype(body)
    return response


def guess_mimetype(body: bytes | Iterator[bytes]) -> str:
    if not isinstance(body, bytes):
        return "application/octet-stream"
    stripped = body.lstrip()[:1]
    if stripped in (b"{", b"["):
        return "application/json"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    return "text/plain"


def relay(client: BrokerClient, infer: msg.InferRequest) -> Response:
    record: RequestRecord | None = g.get("record")
    if record is not None:
        record.model = infer.model or ""
    events = client.events(infer)
    kind, payload = next(events)
    while kind == msg.USAGE:  # the worker's report for the access log, sent before a whole answer
        if record is not None:
            record.on_usage(payload)
        kind, payload = next(events)
    if kind == msg.ERR:  # refused or failed by the broker (queue full, timeout, worker died)
        error = json.loads(payload)
        log.warning("%s %s -> %d %s", request.method, request.path, error["code"], error["message"])
        return error_response(error["code"], error["message"], error.get("type", ""))
    head = msg.loads(payload)
    if kind == msg.RESP:
        return head_response(head, head.body)
    content_type = next((v for k, v in head.properties.items() if k.lower() == "content-type"), "")
    sse = content_type.startswith("text/event-stream")
    return head_response(head, stream_body(client, infer, events, sse, record))


def stream_body(
    client: BrokerClient,
    infer: msg.InferRequest,
    events: Iterator[tuple[bytes, bytes]],
    sse: bool,
    record: RequestRecord | None = None,
) -> Iterator[bytes]:
    """Relay a started stream; a failure after the head (a dead worker) is its last event, in the
    route's dialect and the stream's framing, since the HTTP status has already been sent."""
    request_id, finished = infer.request_id, False
    keep_output = record is not None and record.keep_bodies
    try:
        for kind, payload in events:
            if kind == msg.CHUNK:
                if keep_output:
                    record.on_output(payload)
                yield payload
            elif kind == msg.USAGE:
                if record is not None:
                    record.on_usage(payload)
            elif kind == msg.ERR or (kind == msg.END and payload):
                finished = True
                log.error("Stream %s failed after the response started: %s", request_id, payload[:500])
                error = json.loads(payload) if kind == msg.ERR else {"code": 500, "message": payload.decode()}
                _, body = error_reply(infer.api, error["code"], error["message"], error.get("type", ""))
                if not sse:
                    yield json.dumps(body).encode() + b"\n"
                    continue
                yield b"data: " + json.dumps(body).encode() + b"\n\n"
                if infer.api.dialect == "openai":
                    yield b"data: [DONE]\n\n"  # OpenAI clients stop reading only at [DONE]
            else:
                finished = kind == msg.END
    finally:
        if not finished:
            client.cancel(request_id)  # the client went away: free the model's work at once


def create_app(config: ServingConfig, client: BrokerClient) -> Flask:
    from serving.model_routes import loaded_model_names, register_model_routes  # they use this module

    app = Flask("lmi-serving")
    app.config["MAX_CONTENT_LENGTH"] = config.max_request_size
    install_observability(app, config)  # access log, request metrics, GET /metrics
    app.before_request(api_key_hook(config, error_response))  # after it: 401s are logged and counted

    @app.get("/ping")
    def ping() -> Response:
        """Every model's status; only the start-up model's decides the code (a model loaded through
        /models got its answer from the load request, and must not fail the whole endpoint)."""
        health = client.status()
        models = health["models"]
        counted = [models[name] for name in health.get("startup", models) if name in models]
        worst = next((s["status"] for s in counted if s["status"] != "Healthy"), "Healthy")
        return json_response(models, PING_STATUS.get(worst, 503))

    document = build_document(config)

    @app.get("/openapi.json")
    def openapi() -> Response:
        """This server's OpenAPI 3.1 description (serving/openapi.py)."""
        return json_response(document, 200)

    @app.post("/invocations")
    def invocations() -> Response:
        name = request.args.get("model_name")
        if name and name != config.model_name and not config.dynamic_models:
            raise NotFound(f"Model {name!r} is not served here; this server serves {config.model_name!r}.")
        return relay(client, build_request(model=name))

    for path, api in ROUTE_APIS.items():
        app.add_url_rule(path, api.value, lambda api=api: relay(client, build_request(api)), methods=["POST"])

    @app.get("/v1/models")
    def openai_models() -> Response:
        names = loaded_model_names(client) if config.dynamic_models else [config.model_name]
        models = [{"id": name, "object": "model", "created": 0, "owned_by": "lmi-serving"} for name in names]
        return json_response({"object": "list", "data": models}, 200)

    @app.post("/predictions/<model>")
    @app.post("/predictions/<model>/<version>")
    @app.post("/models/<model>/invoke")
    def predictions(model: str, version: str | None = None) -> Response:
        """SageMaker's X-Amzn-SageMaker-Target-Model header reaches the handler as a property."""
        if model != config.model_name and not config.dynamic_models:
            raise NotFound(f"Model {model!r} not found. Served models: [{config.model_name!r}].")
        return relay(client, build_request(model=model))

    if config.dynamic_models:
        register_model_routes(app, client, config)

    @app.errorhandler(ServingError)
    def on_serving_error(error: ServingError) -> Response:
        log.warning("%s %s -> %d %s", request.method, request.path, error.status_code, error.message)
        return error_response(error.status_code, error.message, error.error_type)

    @app.errorhandler(HTTPException)
    def on_http_error(error: HTTPException) -> Response:
        served = "{model}" if config.dynamic_models else config.model_name
        hints = {
            404: f"Unknown route {request.path!r}. Routes: GET /ping, POST /invocations, "
            f"POST /predictions/{served}.",
            405: f"Method {request.method} is not allowed on {request.path}.",
            413: f"Request body exceeds max_request_size={config.max_request_size} bytes. Fix: send a "
            "smaller body or raise max_request_size (SAGEMAKER_MAX_PAYLOAD_IN_MB).",
        }
        code = error.code or 500
        message = hints.get(code, error.description or error.name)
        log.warning("%s %s -> %d %s", request.method, request.path, code, message)
        allow = dict(error.get_headers()).get("Allow")
        return error_response(code, message, error.name.replace(" ", ""), {"Allow": allow} if allow else None)

    return app
