"""The API key check (serving/auth.py): what counts as a key, and the hook in front of every route."""

from __future__ import annotations

import json
import logging

import pytest
from flask.testing import FlaskClient

from serving.app import create_app
from serving.auth import key_matches, open_paths, presented_key
from serving.config import ServingConfig

KEY = "k3y-Under-Test"


class RecordingBroker:
    """Stands in for serving.client.BrokerClient: answers /ping and management listings, and records
    every call, so a test can assert that a refused request never reached the broker."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def status(self, timeout_s: float = 1.5) -> dict:
        self.calls.append("status")
        return {"models": {"m": {"status": "Healthy"}}, "startup": ["m"]}

    def manage(self, command: dict, timeout_s: float) -> dict:
        self.calls.append(command["op"])
        return {"code": 200, "body": {"models": [{"modelName": "m", "modelUrl": "/m"}]}}

    def events(self, request: object):  # noqa: ANN201 - mirrors BrokerClient.events
        self.calls.append("events")
        raise AssertionError("no inference request reaches the broker in these tests")


def make_client(broker: RecordingBroker, **fields) -> FlaskClient:
    config = ServingConfig(model_dir=None, model_name="m", max_request_size=64, **fields)
    app = create_app(config, broker)  # type: ignore[arg-type]
    app.testing = True
    return app.test_client()


@pytest.fixture
def broker() -> RecordingBroker:
    return RecordingBroker()


@pytest.fixture
def keyed(broker: RecordingBroker) -> FlaskClient:
    return make_client(broker, api_key=KEY)


# ---- the key a request presents -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Authorization": f"Bearer {KEY}"}, KEY),
        ({"Authorization": f"bearer   {KEY} "}, KEY),
        ({"X-Api-Key": KEY}, KEY),
        ({"Authorization": "Bearer a", "X-Api-Key": "b"}, "a"),
        ({"Authorization": "Basic dXNlcjpwdw==", "X-Api-Key": "b"}, "b"),
        ({"Authorization": "Bearer "}, None),
        ({"Authorization": KEY}, None),
        ({}, None),
    ],
)
def test_presented_key(headers, expected):
    assert presented_key(headers) == expected


def test_key_matches_only_the_exact_key():
    assert key_matches(KEY, KEY)
    assert not key_matches(None, KEY)
    assert not key_matches(KEY[:-1], KEY)
    assert not key_matches(KEY + "x", KEY)
    assert not key_matches(KEY.lower(), KEY)
    assert not key_matches("k3y-Under-Tes\u0100", KEY)


def test_open_paths_put_metrics_behind_the_key_on_request():
    assert open_paths(ServingConfig(model_dir=None)) == {"/ping", "/openapi.json", "/metrics"}
    assert open_paths(ServingConfig(model_dir=None, metrics_require_key=True)) == {"/ping", "/openapi.json"}


# ---- the hook ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "dialect"),
    [("POST", "/invocations", "lmi"), ("POST", "/predictions/m", "lmi"), ("POST", "/models/m/invoke", "lmi"),
     ("POST", "/v1/completions", "openai"), ("POST", "/v1/chat/completions", "openai"),
     ("POST", "/generate", "tgi"), ("POST", "/generate_stream", "tgi"), ("POST", "/", "tgi"),
     ("GET", "/v1/models", "lmi"), ("GET", "/no/such/route", "lmi")],
)  # fmt: skip
def test_every_route_without_the_key_is_a_401_in_its_dialect(keyed, broker, method, path, dialect):
    response = keyed.open(path, method=method, json={"inputs": "x"})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.headers["x-request-id"]
    body = json.loads(response.data)
    if dialect == "lmi":
        assert body["code"] == 401
        assert body["type"] == "UnauthorizedException"
        message = body["message"]
    elif dialect == "openai":
        assert body["error"]["code"] == 401
        assert body["error"]["type"] == "invalid_request_error"
        message = body["error"]["message"]
    else:
        assert set(body) == {"error", "error_type"}
        message = body["error"]
    assert message.startswith("No API key. Fix: send the header `Authorization: Bearer <key>`")
    assert broker.calls == []


def test_a_wrong_key_is_a_401_and_the_log_never_shows_a_key(keyed, broker, caplog):
    with caplog.at_level(logging.WARNING, logger="serving.auth"):
        response = keyed.post("/invocations", headers={"Authorization": "Bearer guess-123"})
    assert response.status_code == 401
    assert json.loads(response.data)["message"].startswith("Wrong API key.")
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "POST /invocations -> 401 Wrong API key" in caplog.text
    assert "guess-123" not in caplog.text
    assert KEY not in caplog.text
    assert broker.calls == []


def test_the_key_is_checked_before_the_body_is_read(keyed):
    response = keyed.post("/invocations", data=b"x" * 1000, content_type="application/octet-stream")
    assert response.status_code == 401  # not 413: nothing was read for a caller without the key


def test_ping_and_openapi_stay_open(keyed, broker):
    assert keyed.get("/ping").status_code == 200
    assert broker.calls == ["status"]
    assert keyed.get("/openapi.json").status_code == 200


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"X-Api-Key": KEY}])
def test_the_key_lets_requests_through(keyed, headers):
    response = keyed.get("/v1/models", headers=headers)
    assert response.status_code == 200
    assert [m["id"] for m in json.loads(response.data)["data"]] == ["m"]


def test_metrics_is_open_unless_metrics_require_key(broker):
    assert make_client(broker, api_key=KEY).get("/metrics").status_code != 401
    guarded = make_client(broker, api_key=KEY, metrics_require_key=True)
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers={"X-Api-Key": KEY}).status_code != 401


def test_management_routes_need_the_key(broker):
    client = make_client(broker, api_key=KEY, enable_management_api=True, management_address="localhost:80")
    assert client.get("/models").status_code == 401
    assert client.delete("/models/m").status_code == 401
    assert broker.calls == []
    response = client.get("/models", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.data
    assert broker.calls == ["list"]


def test_without_a_key_everything_is_open(broker):
    client = make_client(broker)
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200
