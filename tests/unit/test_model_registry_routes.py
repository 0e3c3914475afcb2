"""The HTTP side of run-time models (serving.model_routes), in-process with a stub broker.

Which listener serves which API matters for safety: the management API must only answer on its own
(loopback by default) listener, and SageMaker's API only on a multi-model endpoint.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from serving import messages as msg
from serving.app import create_app
from serving.config import ServingConfig

INFERENCE = "http://localhost:8080"
MANAGEMENT = "http://localhost:8081"
MODEL = {"modelName": "m", "modelUrl": "/models/m", "status": "Healthy", "batchSize": 1}


class StubBroker:
    """Answers management commands as the broker would and records what reached it."""

    def __init__(self) -> None:
        self.commands: list[dict[str, Any]] = []
        self.requests: list[msg.InferRequest] = []

    def manage(self, command: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        self.commands.append(command)
        if command["op"] == "list":
            return {"code": 200, "body": {"models": [MODEL], "nextPageToken": "1"}}
        if command["op"] == "describe":
            return {"code": 200, "body": MODEL}
        if command.get("name") == "missing":
            return {"code": 404, "type": "ResourceNotFoundException", "message": "Model 'missing' not found."}
        return {"code": 200, "body": {"status": "ok"}}

    def events(self, request: msg.InferRequest):  # noqa: ANN201 - mirrors BrokerClient.events
        self.requests.append(request)
        yield msg.RESP, msg.dumps(msg.InferResponse(200, "OK", {"Content-Type": "application/json"}, b"{}"))


def client_for(**config: Any):  # noqa: ANN201
    broker = StubBroker()
    app = create_app(ServingConfig(model_dir=None, port=8080, **config), broker)  # type: ignore[arg-type]
    app.testing = True
    return app.test_client(), broker


def test_without_multi_model_or_management_there_are_no_model_routes():
    client, broker = client_for()
    assert client.get("/models", base_url=INFERENCE).status_code == 404
    assert client.get("/models", base_url=MANAGEMENT).status_code == 404
    assert broker.commands == []


def test_the_management_api_answers_only_on_its_own_listener():
    client, broker = client_for(enable_management_api=True, management_address="127.0.0.1:8081")
    refused = client.get("/models", base_url=INFERENCE)
    assert refused.status_code == 404
    assert "Unknown route '/models'" in json.loads(refused.data)["message"]
    assert broker.commands == []
    listed = json.loads(client.get("/models?limit=1", base_url=MANAGEMENT).data)
    assert listed == {"models": [MODEL], "nextPageToken": "1"}  # DJL's shape keeps the status
    assert broker.commands == [{"op": "list", "limit": 1, "token": 0}]
    described = json.loads(client.get("/models/m", base_url=MANAGEMENT).data)
    assert described == [{"workflowName": "m", "models": [MODEL]}]


def test_sagemaker_shapes_on_a_multi_model_endpoint():
    client, _ = client_for(multi_model=True)
    listed = json.loads(client.get("/models", base_url=INFERENCE).data)
    assert listed == {"models": [{"modelName": "m", "modelUrl": "/models/m"}], "nextPageToken": "1"}
    described = json.loads(client.get("/models/m", base_url=INFERENCE).data)
    assert described == {"modelName": "m", "modelUrl": "/models/m"}


def test_load_requests_take_a_json_body_or_query_parameters():
    client, broker = client_for(multi_model=True)
    client.post("/models", json={"model_name": "a", "url": "/opt/ml/models/a/model"}, base_url=INFERENCE)
    client.post("/models?url=/m/b&model_name=b&batch_size=4&synchronous=false", base_url=INFERENCE)
    assert broker.commands == [
        {"op": "load", "url": "/opt/ml/models/a/model", "name": "a", "synchronous": True, "params": {}},
        {"op": "load", "url": "/m/b", "name": "b", "synchronous": False, "params": {"batch_size": "4"}},
    ]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/models", b"[1]", "must be a JSON object"),
        ("/models", b"{nope", "must be a JSON object"),
        ("/models", b'{"model_name": "a"}', "names no model url"),
        ("/models?url=/m&synchronous=maybe", b"", "Invalid synchronous='maybe'"),
    ],
)
def test_malformed_load_requests_are_400_before_the_broker(path: str, body: bytes, message: str):
    client, broker = client_for(multi_model=True)
    resp = client.post(path, data=body, content_type="application/json", base_url=INFERENCE)
    assert resp.status_code == 400
    assert message in json.loads(resp.data)["message"]
    assert broker.commands == []


def test_scaling_needs_min_worker_and_broker_errors_keep_their_status():
    client, broker = client_for(enable_management_api=True, management_address="127.0.0.1:8081")
    missing = client.put("/models/m", base_url=MANAGEMENT)
    assert missing.status_code == 400
    assert "Fix: PUT /models/m?min_worker=2" in json.loads(missing.data)["message"]
    gone = client.delete("/models/missing", base_url=MANAGEMENT)
    assert gone.status_code == 404
    assert json.loads(gone.data)["type"] == "ResourceNotFoundException"
    assert broker.commands == [{"op": "unload", "name": "missing"}]


def test_invocations_name_their_model_for_the_broker_to_route():
    client, broker = client_for(multi_model=True)
    headers = {"X-Amzn-SageMaker-Target-Model": "a.tar.gz"}
    client.post("/models/a/invoke", json={"inputs": "x"}, headers=headers, base_url=INFERENCE)
    client.post("/invocations?model_name=b", json={"inputs": "x"}, base_url=INFERENCE)
    client.post("/invocations", json={"inputs": "x"}, base_url=INFERENCE)
    assert [r.model for r in broker.requests] == ["a", "b", None]
    assert broker.requests[0].properties["X-Amzn-Sagemaker-Target-Model"] == "a.tar.gz"
