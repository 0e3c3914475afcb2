"""Start-up checks of the security settings: the API key's source and the TLS files, and exposure.

The checks run in ``load_config``, so a bad key or certificate stops ``lmi serve`` (exit code 2)
before any process starts, with a message naming the setting and the fix; the HTTP front then only uses
them. ``exposure_warnings`` is logged by serving.server at start-up.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING

from serving.errors import ConfigError
from serving.properties import Properties

if TYPE_CHECKING:
    from serving.config import ServingConfig

SECRET_KEYS = frozenset({"api_key"})
"""Keys kept out of the model workers' specs and the handlers' properties."""


def read_api_key(props: Properties, environ: Mapping[str, str]) -> str | None:
    """The key clients must present, from ``api_key`` or the file ``api_key_file`` names; None: no key.

    A key set but empty must not silently leave the server open, so blanks are errors here (elsewhere
    an empty value means unset)."""
    for name, variable in (("api_key", "SERVING_API_KEY"), ("api_key_file", "SERVING_API_KEY_FILE")):
        if not environ.get(variable, "x").strip() or not props.values.get(name, "x").strip():
            raise ConfigError(
                f"{name} is set but empty ({_origin(props, name, variable)}). Fix: give it a value, or "
                "unset it to serve without an API key."
            )
    key, path = props.values.get("api_key"), props.values.get("api_key_file")
    if key is not None and path is not None:
        raise ConfigError(
            f"Both api_key ({props.source('api_key')}) and api_key_file ({props.source('api_key_file')}) "
            "are set. Fix: set only one (SERVING_API_KEY or SERVING_API_KEY_FILE)."
        )
    if path is not None:
        key = _read_key_file(path.strip(), props.source("api_key_file"))
    if key is None:
        return None
    key = key.strip()
    if not key.isascii() or not key.isprintable():
        raise ConfigError(
            "The API key has characters an HTTP header cannot carry. Fix: use printable ASCII, e.g. "
            "`openssl rand -hex 32`."
        )
    return key


def _origin(props: Properties, name: str, variable: str) -> str:
    return props.source(name) if name in props.values else f"environment variable {variable}"


def _read_key_file(path: str, source: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            key = fh.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"Cannot read api_key_file {path!r} (from {source}): {exc}. Fix: point SERVING_API_KEY_FILE at "
            "a readable file holding the key."
        ) from None
    if not key:
        raise ConfigError(f"api_key_file {path!r} (from {source}) is empty. Fix: write the key into it.")
    return key


def check_tls(cert: str | None, key: str | None) -> None:
    """Both files or neither; they must be readable PEM and the key must be the certificate's."""
    if bool(cert) != bool(key):
        given, missing = ("tls_cert", "tls_key") if cert else ("tls_key", "tls_cert")
        raise ConfigError(
            f"{given} is set without {missing}. Fix: set both SERVING_TLS_CERT and SERVING_TLS_KEY (PEM "
            "files), or neither to serve plain HTTP."
        )
    if not cert or not key:
        return
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(
                f"Cannot read {name} {path!r}: {exc}. Fix: point SERVING_{name.upper()} at a readable "
                "PEM file."
            ) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"tls_cert {cert!r} and tls_key {key!r} cannot serve TLS: {exc}. Fix: give a PEM certificate "
            "and its own unencrypted PEM private key (the key must match the certificate)."
        ) from None


def _no_password() -> bytes:
    """Without a callback OpenSSL would prompt on the terminal for an encrypted key's passphrase."""
    raise ValueError("the private key is encrypted; the server cannot be given a passphrase")


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` listens on this machine only (127.0.0.0/8, ::1, localhost)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to an external interface


def exposure_warnings(config: ServingConfig) -> list[str]:
    """What start-up should warn about: a management API others can reach with no key to stop them."""
    if not config.enable_management_api or config.api_key or is_loopback(config.management_address):
        return []
    return [
        f"The management API listens on {config.management_address}, beyond this machine, with no API "
        "key: anyone who can reach it can load a model.py, which runs code. Fix: set SERVING_API_KEY (or "
        "SERVING_API_KEY_FILE), or bind it to loopback (management_address=127.0.0.1:8081)."
    ]
