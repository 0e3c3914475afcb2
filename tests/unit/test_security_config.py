"""Start-up security settings (serving/security.py through load_config), limits, and exposure."""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import pytest
from tls_certs import self_signed

from serving.config import ServingConfig, load_config
from serving.errors import ConfigError
from serving.http_main import HttpServer
from serving.security import exposure_warnings, is_loopback
from serving.server import Server
from serving.workers import write_worker_spec

# ---- the API key ---------------------------------------------------------------------------------


def test_the_key_from_the_environment_stays_out_of_reprs_settings_and_worker_specs(tmp_path):
    config = load_config(None, {"SERVING_API_KEY": " abc-123 "})
    assert config.api_key == "abc-123"
    assert "abc-123" not in repr(config)
    assert "api_key" not in config.settings
    assert "api_key" not in config.handler_properties()
    write_worker_spec(config, str(tmp_path / "worker.json"))
    assert "abc-123" not in (tmp_path / "worker.json").read_text()
    assert dataclasses.asdict(config)["api_key"] == "abc-123"  # config.json: what the HTTP front reads


def test_the_key_from_a_file_or_from_serving_properties(tmp_path):
    (tmp_path / "key").write_text("from-file\n")
    assert load_config(None, {"SERVING_API_KEY_FILE": str(tmp_path / "key")}).api_key == "from-file"
    model = tmp_path / "model"
    model.mkdir()
    (model / "serving.properties").write_text("api_key=from-properties\n")
    config = load_config(str(model), {})
    assert config.api_key == "from-properties"
    assert "api_key" not in config.model_properties
    assert load_config(None, {}).api_key is None


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SERVING_API_KEY": "a", "SERVING_API_KEY_FILE": "/etc/hostname"}, "Both api_key"),
        ({"SERVING_API_KEY": ""}, "api_key is set but empty (environment variable SERVING_API_KEY)"),
        ({"SERVING_API_KEY": "   "}, "api_key is set but empty"),
        ({"SERVING_API_KEY_FILE": ""}, "api_key_file is set but empty"),
        ({"SERVING_API_KEY_FILE": "/nonexistent/key"}, "Cannot read api_key_file '/nonexistent/key'"),
        ({"SERVING_API_KEY": "caf\u00e9"}, "printable ASCII"),
    ],
)
def test_bad_key_settings_stop_start_up(environ, message):
    with pytest.raises(ConfigError, match="Fix: ") as info:
        load_config(None, environ)
    assert message in str(info.value)


def test_an_empty_key_file_or_an_empty_key_in_the_properties_stops_start_up(tmp_path):
    (tmp_path / "key").write_text("\n")
    with pytest.raises(ConfigError, match="is empty. Fix: write the key into it"):
        load_config(None, {"SERVING_API_KEY_FILE": str(tmp_path / "key")})
    (tmp_path / "serving.properties").write_text("api_key=\n")
    with pytest.raises(ConfigError, match=r"api_key is set but empty \(.*serving.properties\)"):
        load_config(str(tmp_path), {})


# ---- TLS -----------------------------------------------------------------------------------------


def test_a_matching_certificate_and_key_are_accepted_and_served(tmp_path):
    cert, key = self_signed(tmp_path)
    config = load_config(None, {"SERVING_TLS_CERT": str(cert), "SERVING_TLS_KEY": str(key)})
    assert (config.tls_cert, config.tls_key) == (str(cert), str(key))
    front = HttpServer(config, "ipc:///nonexistent")
    assert (front.cfg.certfile, front.cfg.keyfile) == (str(cert), str(key))
    assert front.cfg.ssl_context.__name__ == "defer_handshake"


def test_bad_tls_settings_stop_start_up(tmp_path):
    cert, key = self_signed(tmp_path, "a")
    _, other_key = self_signed(tmp_path, "b")
    enc_cert, enc_key = self_signed(tmp_path, "c", passphrase=b"pw")
    cases = [
        ({"SERVING_TLS_CERT": str(cert)}, "tls_cert is set without tls_key"),
        ({"SERVING_TLS_KEY": str(key)}, "tls_key is set without tls_cert"),
        (
            {"SERVING_TLS_CERT": str(tmp_path / "none.crt"), "SERVING_TLS_KEY": str(key)},
            "Cannot read tls_cert",
        ),
        ({"SERVING_TLS_CERT": str(cert), "SERVING_TLS_KEY": str(tmp_path)}, "Cannot read tls_key"),
        ({"SERVING_TLS_CERT": str(cert), "SERVING_TLS_KEY": str(other_key)}, "key values mismatch"),
        (
            {"SERVING_TLS_CERT": str(enc_cert), "SERVING_TLS_KEY": str(enc_key)},
            "the private key is encrypted",
        ),
        ({"SERVING_TLS_CERT": str(key), "SERVING_TLS_KEY": str(cert)}, "cannot serve TLS"),
    ]
    for environ, message in cases:
        with pytest.raises(ConfigError, match="Fix: ") as info:
            load_config(None, environ)
        assert message in str(info.value), environ


# ---- limits and time bounds reach gunicorn -------------------------------------------------------


def test_limits_and_timeouts_reach_the_http_front():
    environ = {
        "SERVING_KEEPALIVE_TIMEOUT": "7",
        "SERVING_REQUEST_BODY_TIMEOUT": "2.5",
        "SERVING_LIMIT_REQUEST_LINE": "2048",
        "SERVING_LIMIT_REQUEST_FIELDS": "50",
        "SERVING_LIMIT_REQUEST_FIELD_SIZE": "4096",
    }
    config = load_config(None, environ)
    assert config.request_body_timeout_s == 2.5
    cfg = HttpServer(config, "ipc:///nonexistent").cfg
    assert (cfg.keepalive, cfg.limit_request_line, cfg.limit_request_fields) == (7, 2048, 50)
    assert cfg.limit_request_field_size == 4096
    assert cfg.worker_class.__name__ == "BoundedGeventWorker"
    assert not cfg.is_ssl
    defaults = HttpServer(ServingConfig(model_dir=None), "ipc:///nonexistent").cfg
    assert (defaults.keepalive, defaults.limit_request_line, defaults.limit_request_fields) == (2, 4094, 100)
    assert defaults.limit_request_field_size == 8190


@pytest.mark.parametrize(
    ("variable", "value"),
    [("SERVING_KEEPALIVE_TIMEOUT", "0"), ("SERVING_LIMIT_REQUEST_LINE", "9000"),
     ("SERVING_LIMIT_REQUEST_FIELDS", "0"), ("SERVING_REQUEST_BODY_TIMEOUT", "-1")],
)  # fmt: skip
def test_unbounded_or_out_of_range_limits_stop_start_up(variable, value):
    with pytest.raises(ConfigError, match=f"environment variable {variable}"):
        load_config(None, {variable: value})


# ---- exposure ------------------------------------------------------------------------------------


def test_the_management_api_is_off_and_on_loopback_by_default():
    config = load_config(None, {})
    assert not config.enable_management_api
    assert HttpServer(config, "ipc:///nonexistent").cfg.bind == ["127.0.0.1:8080"]
    enabled = load_config(None, {"SERVING_ENABLE_MANAGEMENT_API": "true"})
    assert HttpServer(enabled, "ipc:///nonexistent").cfg.bind == ["127.0.0.1:8080", "127.0.0.1:8081"]
    external = load_config(
        None, {"SERVING_ENABLE_MANAGEMENT_API": "1", "SERVING_MANAGEMENT_ADDRESS": "https://0.0.0.0:9000"}
    )
    assert HttpServer(external, "ipc:///nonexistent").cfg.bind == ["127.0.0.1:8080", "0.0.0.0:9000"]


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1:8081", True), ("127.0.0.5:1", True), ("localhost:8081", True), ("[::1]:8081", True),
     ("0.0.0.0:8081", False), ("10.0.0.4:8081", False), ("[::]:8081", False), ("myhost:8081", False)],
)  # fmt: skip
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_a_reachable_management_api_without_a_key_is_warned_about():
    def config(**fields) -> ServingConfig:
        return ServingConfig(model_dir=None, enable_management_api=True, **fields)

    (warning,) = exposure_warnings(config(management_address="0.0.0.0:8081"))
    assert "0.0.0.0:8081" in warning
    assert "SERVING_API_KEY" in warning
    assert exposure_warnings(config(management_address="0.0.0.0:8081", api_key="k")) == []
    assert exposure_warnings(config()) == []
    assert exposure_warnings(ServingConfig(model_dir=None, management_address="0.0.0.0:1")) == []


def test_the_server_logs_the_warning_at_start_up(caplog):
    config = ServingConfig(model_dir=None, enable_management_api=True, management_address="0.0.0.0:1")
    server = SimpleNamespace(config=config, registry=SimpleNamespace(ledger=SimpleNamespace(budget_mb=1)))
    with caplog.at_level(logging.INFO, logger="serving.server"):
        Server._log_addresses(server)  # type: ignore[arg-type]
    assert "Management API on http://0.0.0.0:1" in caplog.text
    (warning,) = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert "beyond this machine, with no API key" in warning
