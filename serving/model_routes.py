"""HTTP routes that load, list, describe, scale and unload models.

SageMaker's multi-model API answers on the inference port when ``SAGEMAKER_MULTI_MODEL=true``
(SageMaker sends ``POST /models`` with a JSON body); DJL's management API answers on its own listener
(``management_address``, 127.0.0.1:8081 unless configured) when ``enable_management_api`` is set
(query parameters, DJL's response shapes). Both are thin: each turns HTTP into one command for the
broker (serving.management), which does the work and chooses the status.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import NotFound as RouteNotFound

from serving.app import error_response, json_response
from serving.client import BrokerClient
from serving.config import ServingConfig
from serving.errors import BadRequest

LOAD_TIMEOUT_S = 24 * 3600.0
"""How long the front waits for a load: the broker fails it after the model's model_loading_timeout,
which each model's serving.properties may raise; this only guards against a lost broker."""
COMMAND_TIMEOUT_S = 120.0
"""Other commands: an unload waits at most for its workers' SIGTERM grace period."""
LOAD_EXAMPLE = '{"model_name": "m1", "url": "/opt/ml/models/m1/model"}'


def listener_port() -> int | None:
    """The local port the request came in on (not the Host header, which the client chooses)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        try:
            return sock.getsockname()[1]
        except OSError:
            pass
    port = str(request.environ.get("SERVER_PORT", ""))
    return int(port) if port.isdigit() else None


def api_flavour(config: ServingConfig) -> str:
    """ "sagemaker" on a multi-model endpoint's inference port, "djl" on the management listener; these
    routes do not exist anywhere else (404, as any unknown route)."""
    port = listener_port()
    if config.multi_model and port == config.port:
        return "sagemaker"
    if config.management_port is not None and port == config.management_port:
        return "djl"
    raise RouteNotFound()


def integer(name: str, default: int | None, minimum: int) -> int | None:
    """An integer query parameter; 400 naming it when it is not one."""
    text = request.args.get(name)
    if text is None or text == "":
        return default
    if not text.strip().isdigit() or int(text) < minimum:
        raise BadRequest(f"Invalid {name}={text!r}. Fix: pass an integer >= {minimum}.")
    return int(text)


def synchronous(fields: dict[str, str]) -> bool:
    text = fields.pop("synchronous", "true").strip().lower()
    if text not in ("true", "false"):
        raise BadRequest(f"Invalid synchronous={text!r}. Fix: pass true or false.")
    return text == "true"


def load_fields() -> dict[str, str]:
    """DJL's query parameters, plus SageMaker's JSON body fields (other body keys are ignored)."""
    fields = dict(request.args.items())
    body = request.get_data(cache=False)
    if body.strip():
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise BadRequest(f"The load request body must be a JSON object. Fix: send {LOAD_EXAMPLE}.")
        for key in ("model_name", "url"):
            if document.get(key) is not None:
                fields.setdefault(key, str(document[key]))
    if not fields.get("url"):
        raise BadRequest(
            f"The load request names no model url. Fix: send {LOAD_EXAMPLE} (SageMaker), or "
            "POST /models?url=/path/to/model&model_name=m1 (management API)."
        )
    return fields


def answer(reply: dict[str, Any], shape: Any = None) -> Response:
    """The broker's reply as HTTP: its body (reshaped by ``shape``), or its error in the LMI shape."""
    if "body" not in reply:
        return error_response(reply["code"], reply["message"], reply.get("type", ""))
    body = shape(reply["body"]) if shape is not None else reply["body"]
    return json_response(body, reply["code"])


def register_model_routes(app: Flask, client: BrokerClient, config: ServingConfig) -> None:
    def manage(command: dict[str, Any], timeout_s: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        return client.manage(command, timeout_s)

    @app.post("/models")
    def load_model() -> Response:
        api_flavour(config)
        fields = load_fields()
        command = {"op": "load", "url": fields.pop("url"), "name": fields.pop("model_name", None)}
        command["synchronous"] = synchronous(fields)
        return answer(manage({**command, "params": fields}, LOAD_TIMEOUT_S))

    @app.get("/models")
    def list_models() -> Response:
        flavour = api_flavour(config)
        limit = integer("limit", 100, minimum=1)
        token = integer("next_page_token", 0, minimum=0)
        reply = manage({"op": "list", "limit": limit, "token": token})
        if flavour == "sagemaker":  # SageMaker's shape: name and URL only
            return answer(reply, lambda b: {**b, "models": [_name_and_url(m) for m in b["models"]]})
        return answer(reply)

    @app.get("/models/<name>")
    def describe_model(name: str) -> Response:
        flavour = api_flavour(config)
        reply = manage({"op": "describe", "name": name})
        if flavour == "sagemaker":
            return answer(reply, _name_and_url)
        return answer(reply, lambda b: [{"workflowName": name, "models": [b]}])  # DJL's shape

    @app.delete("/models/<name>")
    def unload_model(name: str) -> Response:
        api_flavour(config)
        return answer(manage({"op": "unload", "name": name}))

    @app.put("/models/<name>")
    def scale_model(name: str) -> Response:
        api_flavour(config)
        low = integer("min_worker", None, minimum=1)
        if low is None:
            raise BadRequest(f"PUT /models/{name} needs min_worker. Fix: PUT /models/{name}?min_worker=2.")
        command = {
            "op": "scale",
            "name": name,
            "min_worker": low,
            "max_worker": integer("max_worker", None, 1),
        }
        command["synchronous"] = synchronous(dict(request.args.items()))
        return answer(manage(command, LOAD_TIMEOUT_S))


def _name_and_url(model: dict[str, Any]) -> dict[str, Any]:
    return {"modelName": model["modelName"], "modelUrl": model["modelUrl"]}


def loaded_model_names(client: BrokerClient) -> list[str]:
    """Every loaded model's name (for /v1/models on a server whose models change at run time)."""
    reply = client.manage({"op": "list", "limit": 10_000, "token": 0}, COMMAND_TIMEOUT_S)
    return [model["modelName"] for model in reply.get("body", {}).get("models", [])]
