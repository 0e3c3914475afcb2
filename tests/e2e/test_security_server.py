"""The real server with an API key, TLS and connection limits: who gets in, over what, for how long.

Slow clients are raw sockets with bounded waits; while one stalls, a normal request must still be
served at once.
"""

from __future__ import annotations

import json
import socket
import ssl
import time

import pytest
import requests
from support import FIXTURES, ServerProcess, free_port
from tls_certs import self_signed

openai = pytest.importorskip("openai")

PROBE = FIXTURES / "probe"
KEY = "s3cret-key-for-tests"
BEARER = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "api.key"
    key_file.write_text(KEY + "\n")
    management_port = free_port()
    env = {
        "SERVING_API_KEY_FILE": str(key_file),
        "SERVING_ENABLE_MANAGEMENT_API": "true",
        "SERVING_MANAGEMENT_ADDRESS": f"127.0.0.1:{management_port}",
        "SERVING_KEEPALIVE_TIMEOUT": "1",
        "SERVING_REQUEST_BODY_TIMEOUT": "1",
    }
    with ServerProcess(PROBE, env) as srv:
        srv.wait_ready()
        srv.management_url = f"http://127.0.0.1:{management_port}"
        yield srv


def test_ping_openapi_and_metrics_stay_open(keyed):
    assert keyed.ping().status_code == 200
    assert requests.get(keyed.url + "/openapi.json", timeout=10).status_code == 200
    assert requests.get(keyed.url + "/metrics", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("path", "dialect"),
    [("/invocations", "lmi"), ("/predictions/probe", "lmi"), ("/v1/completions", "openai"),
     ("/v1/chat/completions", "openai"), ("/generate", "tgi"), ("/v1/models", "lmi")],
)  # fmt: skip
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-Api-Key": KEY + "x"}])
def test_no_or_wrong_key_is_a_401_in_the_routes_dialect(keyed, path, dialect, headers):
    method = "GET" if path == "/v1/models" else "POST"
    resp = requests.request(method, keyed.url + path, json={"inputs": "hi"}, headers=headers, timeout=10)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    body = resp.json()
    message = {"lmi": lambda: body["message"], "openai": lambda: body["error"]["message"],
               "tgi": lambda: body["error"]}[dialect]()  # fmt: skip
    assert message.startswith("No API key" if not headers else "Wrong API key")
    assert KEY not in resp.text
    if dialect == "lmi":
        assert body["code"] == 401
        assert body["type"] == "UnauthorizedException"


def test_the_key_never_reaches_the_model():
    """Neither the key's header nor SERVING_API_KEY is visible to model code (a user's model.py)."""
    with ServerProcess(PROBE, {"SERVING_API_KEY": KEY}) as srv:
        srv.wait_ready()
        for header, value in (BEARER | {"X-Api-Key": KEY}).items():
            resp = srv.post(json_body={"header": header}, headers={header: value})
            assert resp.status_code == 200
            assert resp.json()["header"] is None
        resp = srv.post(json_body={"env": "SERVING_API_KEY"}, headers=BEARER)
        assert resp.status_code == 200
        assert resp.json()["env"] is None


def test_the_openai_client_with_api_key(keyed):
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=10)
    assert [model.id for model in client.models.list()] == ["probe"]
    wrong = openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


@pytest.mark.parametrize("headers", [BEARER, {"authorization": f"bearer {KEY}"}, {"X-Api-Key": KEY}])
def test_bearer_or_x_api_key_reaches_the_model(keyed, headers):
    resp = keyed.post(json_body={"echo": "in"}, headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["echo"] == "in"


def test_management_routes_need_the_key(keyed):
    assert requests.get(keyed.management_url + "/models", timeout=10).status_code == 401
    resp = requests.get(keyed.management_url + "/models", headers=BEARER, timeout=10)
    assert resp.status_code == 200, resp.text
    assert "probe" in resp.text
    refused = requests.delete(keyed.management_url + "/models/probe", timeout=10)
    assert refused.status_code == 401
    assert keyed.ping().status_code == 200  # the unauthenticated DELETE did nothing


def test_oversize_request_line_and_headers_are_refused_in_json(keyed):
    long_url = requests.post(keyed.url + "/invocations?q=" + "x" * 5000, headers=BEARER, timeout=10)
    assert long_url.status_code == 414
    assert "limit_request_line=4094" in long_url.json()["message"]
    big_header = requests.post(
        keyed.url + "/invocations", headers={**BEARER, "X-Big": "y" * 9000}, timeout=10
    )
    assert big_header.status_code == 431
    assert "limit_request_field_size=8190" in big_header.json()["message"]
    many = {**BEARER, **{f"X-H{i}": "1" for i in range(120)}}
    assert requests.post(keyed.url + "/invocations", headers=many, timeout=10).status_code == 431
    assert keyed.post(json_body={"echo": 1}, headers=BEARER).status_code == 200


def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (bounded)."""
    started, data = time.monotonic(), b""
    sock.settimeout(limit_s)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data, time.monotonic() - started


def test_a_client_trickling_its_headers_is_cut_while_others_are_served(keyed):
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=5) as slow:
        slow.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed_after = None
        for _ in range(40):  # one header byte every 0.1 s: it never finishes its head
            resp = keyed.post(json_body={"echo": "fast"}, headers=BEARER, timeout=5)
            assert resp.status_code == 200
            try:
                slow.sendall(b"X")
                time.sleep(0.1)
                slow.settimeout(0.01)
                if slow.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None, "the slow client was never disconnected"
    assert closed_after < 3.5  # keepalive_timeout=1


def test_a_client_trickling_its_body_gets_a_408_and_is_disconnected(keyed):
    head = f"POST /invocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    head += "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=5) as slow:
        slow.sendall(head.encode() + b'{"echo": ')
        assert keyed.post(json_body={"echo": "fast"}, headers=BEARER, timeout=5).status_code == 200
        data, seconds = _read_until_closed(slow, limit_s=5)
    assert seconds < 3.5  # request_body_timeout=1
    status, _, rest = data.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in rest.lower()
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["code"] == 408
    assert "request_body_timeout=1 s" in body["message"]


# ---- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    env = {"SERVING_TLS_CERT": str(cert), "SERVING_TLS_KEY": str(key), "SERVING_KEEPALIVE_TIMEOUT": "1"}
    with ServerProcess(PROBE, env) as srv:
        srv.url = f"https://127.0.0.1:{srv.port}"
        srv.cert = str(cert)
        deadline = time.monotonic() + 120
        while True:
            assert srv.proc.poll() is None, srv.output()
            try:
                if requests.get(srv.url + "/ping", verify=srv.cert, timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, srv.output()
            time.sleep(0.2)
        yield srv


def test_https_handshake_and_request_verified_against_the_certificate(tls):
    context = ssl.create_default_context(cafile=tls.cert)
    with (
        socket.create_connection(("127.0.0.1", tls.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        assert conn.version() in ("TLSv1.2", "TLSv1.3")
        conn.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data, _ = _read_until_closed(conn, limit_s=5)
    assert data.startswith(b"HTTP/1.1 200")
    resp = requests.post(tls.url + "/invocations", json={"echo": "tls"}, verify=tls.cert, timeout=10)
    assert resp.status_code == 200
    assert resp.json()["echo"] == "tls"
    with pytest.raises(requests.exceptions.SSLError):  # not a certificate this client trusts
        requests.get(tls.url + "/ping", timeout=5)


def test_plain_http_is_refused_on_the_tls_port(tls):
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{tls.port}/ping", timeout=5)
    with socket.create_connection(("127.0.0.1", tls.port), timeout=5) as plain:
        plain.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        data, _ = _read_until_closed(plain, limit_s=5)
    assert b"200" not in data


def test_a_stalled_tls_handshake_is_closed(tls):
    with socket.create_connection(("127.0.0.1", tls.port), timeout=5) as stalled:
        assert requests.get(tls.url + "/ping", verify=tls.cert, timeout=5).status_code == 200
        data, seconds = _read_until_closed(stalled, limit_s=5)
    assert data == b""
    assert seconds < 3.5  # keepalive_timeout=1


# ---- bad settings stop start-up at once -----------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SERVING_API_KEY": "a", "SERVING_API_KEY_FILE": "/etc/hostname"}, "Both api_key"),
        ({"SERVING_API_KEY": ""}, "api_key is set but empty"),
        ({"SERVING_API_KEY_FILE": "/nonexistent/key"}, "Cannot read api_key_file"),
        ({"SERVING_TLS_CERT": "/nonexistent/cert.pem"}, "tls_cert is set without tls_key"),
        ("mismatch", "key values mismatch"),
    ],
)
def test_bad_key_or_tls_settings_fail_start_up_fast(tmp_path, env, message):
    if env == "mismatch":
        cert, _ = self_signed(tmp_path, "a")
        _, other_key = self_signed(tmp_path, "b")
        env = {"SERVING_TLS_CERT": str(cert), "SERVING_TLS_KEY": str(other_key)}
    started = time.monotonic()
    with ServerProcess(PROBE, env) as srv:
        assert srv.proc.wait(timeout=30) == 2
        assert message in srv.output()
    assert time.monotonic() - started < 20
