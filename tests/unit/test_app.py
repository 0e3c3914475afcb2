"""Flask routes, in-process, for the error paths that are answered before the broker is asked."""

from __future__ import annotations

import json

import pytest
from flask import Flask
from flask.testing import FlaskClient

from serving.app import check_json, create_app, guess_mimetype
from serving.config import ServingConfig
from serving.errors import BadRequest

JSON = "application/json"
JSON_LINES = "application/jsonlines"


class UnreachableBroker:
    """Stands in for serving.client.BrokerClient.

    Every request in this file must be answered by the HTTP layer alone (unknown route, wrong
    method, body too large, malformed JSON, unknown model), so the broker must never be reached.
    Starting a real Broker would need model worker processes; this stub records any call instead,
    and each test asserts that there was none.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []

    def events(self, request: object):  # noqa: ANN201 - mirrors BrokerClient.events
        self.calls.append("events")
        raise AssertionError("the broker must not be reached")

    def status(self, timeout_s: float = 1.5) -> dict:
        self.calls.append("status")
        raise AssertionError("the broker must not be reached")

    def cancel(self, request_id: str) -> None:
        self.calls.append("cancel")
        raise AssertionError("the broker must not be reached")


@pytest.fixture
def broker() -> UnreachableBroker:
    return UnreachableBroker()


@pytest.fixture
def app(broker: UnreachableBroker) -> Flask:
    config = ServingConfig(model_dir=None, model_name="mymodel", max_request_size=10)
    flask_app = create_app(config, broker)  # type: ignore[arg-type]
    flask_app.testing = True  # an unexpected exception fails the test instead of becoming a 500
    return flask_app


@pytest.fixture
def client(app: Flask, broker: UnreachableBroker):  # noqa: ANN201
    test_client: FlaskClient = app.test_client()
    yield test_client
    assert broker.calls == []


def error_body(response) -> dict:  # noqa: ANN001
    assert response.mimetype == "application/json"
    body = json.loads(response.data)
    assert set(body) == {"code", "type", "message", "error"}
    assert body["code"] == response.status_code
    assert body["error"] == body["message"]
    return body


# ---- unknown routes and methods ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unknown_route_is_a_404_json_body(client: FlaskClient, method: str):
    response = client.open("/no/such/route", method=method)
    assert response.status_code == 404
    body = error_body(response)
    assert body["type"] == "NotFound"
    assert "Unknown route '/no/such/route'" in body["message"]
    assert "GET /ping" in body["message"]
    assert "POST /invocations" in body["message"]
    assert "POST /predictions/mymodel" in body["message"]


def test_get_invocations_is_a_405_json_body(client: FlaskClient):
    response = client.get("/invocations")
    assert response.status_code == 405
    body = error_body(response)
    assert body["type"] == "MethodNotAllowed"
    assert body["message"] == "Method GET is not allowed on /invocations."


@pytest.mark.parametrize(("method", "path"), [("POST", "/ping"), ("PUT", "/predictions/mymodel")])
def test_other_wrong_methods_are_405(client: FlaskClient, method: str, path: str):
    response = client.open(path, method=method)
    assert response.status_code == 405
    assert error_body(response)["message"] == f"Method {method} is not allowed on {path}."


# ---- request size --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/invocations", "/predictions/mymodel"])
def test_body_larger_than_max_request_size_is_413(client: FlaskClient, path: str):
    response = client.post(path, data=b"x" * 11, content_type="application/octet-stream")
    assert response.status_code == 413
    body = error_body(response)
    assert body["type"] == "RequestEntityTooLarge"
    assert "max_request_size=10 bytes" in body["message"]
    assert "SAGEMAKER_MAX_PAYLOAD_IN_MB" in body["message"]


@pytest.mark.parametrize(
    ("path", "status", "shape"),
    [
        ("/v1/completions", 413, "openai"),
        ("/v1/chat/completions", 413, "openai"),
        ("/generate", 413, "tgi"),
        ("/generate_stream", 413, "tgi"),
        ("/", 413, "tgi"),
    ],
)
def test_oversized_bodies_answer_in_the_dialect_of_the_route(
    client: FlaskClient, path: str, status: int, shape: str
):
    response = client.post(path, data=b"x" * 11, content_type="application/json")
    assert response.status_code == status
    body = json.loads(response.data)
    if shape == "openai":
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == 413
        assert body["error"]["type"] == "invalid_request_error"
        assert "max_request_size=10 bytes" in body["error"]["message"]
    else:
        assert body == {"error": body["error"], "error_type": "validation"}
        assert "max_request_size=10 bytes" in body["error"]


@pytest.mark.parametrize(
    ("path", "status"), [("/invocations", 400), ("/v1/completions", 400), ("/generate", 422)]
)
def test_malformed_json_answers_in_the_dialect_of_the_route(client: FlaskClient, path: str, status: int):
    response = client.post(path, data=b"{nope", content_type="application/json")
    assert response.status_code == status
    body = json.loads(response.data)
    message = body["error"]["message"] if path.startswith("/v1") else body["error"]
    assert "Malformed JSON body" in message


def test_body_of_exactly_max_request_size_is_accepted_by_the_size_check(client: FlaskClient):
    # Ten bytes of malformed JSON: passes the size limit, then fails JSON validation (400, not 413).
    response = client.post("/invocations", data=b"{not json}", content_type="application/json")
    assert response.status_code == 400


def test_default_max_request_size_is_applied_to_flask():
    app = create_app(ServingConfig(model_dir=None), UnreachableBroker())  # type: ignore[arg-type]
    assert app.config["MAX_CONTENT_LENGTH"] == 6 * 1024 * 1024


# ---- malformed JSON ------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
def test_malformed_json_is_400(client: FlaskClient, content_type: str):
    response = client.post("/invocations", data=b'{"in', content_type=content_type)
    assert response.status_code == 400
    body = error_body(response)
    assert body["type"] == "BadRequestException"
    assert body["message"].startswith("Malformed JSON body:")
    assert "Fix: send valid JSON" in body["message"]


def test_malformed_json_on_predictions_is_400(client: FlaskClient):
    response = client.post("/predictions/mymodel", data=b"[1,", content_type="application/json")
    assert response.status_code == 400
    assert error_body(response)["type"] == "BadRequestException"


def test_check_json_accepts_valid_and_blank_bodies(app: Flask):
    for body in (b'{"inputs": "hi"}', b"   ", b""):
        with app.test_request_context(
            "/invocations", method="POST", data=body, content_type="application/json"
        ):
            check_json(body)


def test_check_json_ignores_non_json_content_types(app: Flask):
    with app.test_request_context("/invocations", method="POST", data=b"{x", content_type="text/plain"):
        check_json(b"{x")


def test_check_json_rejects_malformed_json(app: Flask):
    with (
        app.test_request_context("/invocations", method="POST", data=b"{x", content_type="application/json"),
        pytest.raises(BadRequest, match="Malformed JSON body"),
    ):
        check_json(b"{x")


def test_check_json_accepts_valid_json_lines(app: Flask):
    # JSON Lines is one JSON document per line; a valid two-line body must not be refused.
    body = b'{"inputs": "a"}\n{"inputs": "b"}\n'
    with app.test_request_context(
        "/invocations", method="POST", data=body, content_type="application/jsonlines"
    ):
        check_json(body)


# ---- model names ---------------------------------------------------------------------------------


def test_predictions_for_another_model_is_404(client: FlaskClient):
    response = client.post("/predictions/other", data=b"{}", content_type="application/json")
    assert response.status_code == 404
    body = error_body(response)
    assert body["type"] == "ResourceNotFoundException"
    assert "'other'" in body["message"]
    assert "'mymodel'" in body["message"]


def test_invoke_for_another_model_is_404(client: FlaskClient):
    response = client.post("/models/other/invoke", data=b"{}", content_type="application/json")
    assert response.status_code == 404
    assert error_body(response)["type"] == "ResourceNotFoundException"


def test_invocations_with_another_model_name_is_404(client: FlaskClient):
    response = client.post("/invocations?model_name=other", data=b"{}", content_type="application/json")
    assert response.status_code == 404
    body = error_body(response)
    assert "'other' is not served here" in body["message"]


# ---- helpers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "mimetype"),
    [
        (b'{"a": 1}', "application/json"),
        (b"  [1, 2]", "application/json"),
        (b"hello", "text/plain"),
        (b"\xff\xfe\x00", "application/octet-stream"),
        (iter([b"chunk"]), "application/octet-stream"),
    ],
)
def test_guess_mimetype(body: object, mimetype: str):
    assert guess_mimetype(body) == mimetype  # type: ignore[arg-type]


# ---- errors after a stream has started ------------------------------------------------------------


class ScriptedBroker:
    """Replays broker frames for one request, as serving.client.BrokerClient.events yields them."""

    def __init__(self, frames: list[tuple[bytes, bytes]]) -> None:
        self.frames, self.cancelled = frames, []

    def events(self, request: object):  # noqa: ANN201 - mirrors BrokerClient.events
        yield from self.frames

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)


@pytest.mark.parametrize(
    ("path", "content_type", "expected"),
    [
        (
            "/v1/completions",
            "text/event-stream",
            b'data: {"error": {"message": "too slow", "type": "server_error", "param": null, "code": 504}}'
            b"\n\ndata: [DONE]\n\n",
        ),
        (
            "/generate_stream",
            "text/event-stream",
            b'data: {"error": "too slow", "error_type": "generation"}\n\n',
        ),
        (
            "/invocations",
            "application/jsonlines",
            b'{"code": 504, "type": "PredictTimeoutException", "message": "too slow", "error": "too slow"}\n',
        ),
    ],
)
def test_a_broker_error_mid_stream_keeps_its_status_in_the_dialect_and_framing(path, content_type, expected):
    from serving import messages as msg

    head = msg.InferResponse(200, "OK", {"Content-Type": content_type})
    error = json.dumps({"code": 504, "type": "PredictTimeoutException", "message": "too slow"}).encode()
    broker = ScriptedBroker([(msg.START, msg.dumps(head)), (msg.CHUNK, b"first\n"), (msg.ERR, error)])
    app = create_app(ServingConfig(model_dir=None), broker)  # type: ignore[arg-type]
    body = {"prompt": "x", "stream": True} if path.startswith("/v1") else {"inputs": "x", "stream": True}
    response = app.test_client().post(path, json=body)
    assert response.status_code == 200  # sent before the failure
    assert response.data == b"first\n" + expected
    assert broker.cancelled == []  # the stream ended with its terminal frame: nothing to cancel
