"""``lmi invoke``: send one request to a local server or a SageMaker endpoint and print the answer.

Streamed answers are printed token by token as they arrive, from a local server's chunked response
or from ``invoke_endpoint_with_response_stream``'s events, through the same ``TokenStream``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TextIO

from serving.deploy.stream import TokenStream


class InvokeError(Exception):
    """The request could not be sent or was refused; the message says by whom and why."""


def request_body(prompt: str | None, body: str | None, max_new_tokens: int, stream: bool) -> bytes:
    """``body`` as given (``@file`` reads a file) or LMI's ``{"inputs", "parameters"}`` for ``prompt``;
    ``stream`` adds ``"stream": true`` to a JSON object that does not say otherwise."""
    if body is None:
        payload: dict[str, Any] = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}}
        return json.dumps({**payload, "stream": True} if stream else payload).encode()
    if body.startswith("@"):
        with open(body[1:], encoding="utf-8") as fh:
            body = fh.read()
    if stream:
        try:
            parsed = json.loads(body)
        except ValueError:
            return body.encode()
        if isinstance(parsed, dict) and "stream" not in parsed:
            return json.dumps({**parsed, "stream": True}).encode()
    return body.encode()


def print_stream(pieces: Iterable[bytes], out: TextIO) -> None:
    """Print each token's text as soon as its line is complete; raise the stream's error at the end."""
    tokens = TokenStream()
    for piece in pieces:
        text = tokens.feed(piece)
        if text:
            out.write(text)
            out.flush()
    out.write(tokens.close() + "\n")
    out.flush()
    if tokens.error:
        raise InvokeError(f"the stream ended with an error: {tokens.error}")


def _is_stream(content_type: str) -> bool:
    return "jsonlines" in content_type or "event-stream" in content_type


def invoke_url(
    url: str, body: bytes, content_type: str, accept: str | None, timeout_s: float, out: TextIO
) -> None:
    """POST to a local server; a streamed content type is printed token by token."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": content_type, **({"Accept": accept} if accept else {})}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)  # noqa: S310 - a URL the user gave
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", errors="replace").strip()
        raise InvokeError(f"{url} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise InvokeError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    with response:
        if _is_stream(response.headers.get("Content-Type", "")):
            print_stream(iter(lambda: response.read1(65536), b""), out)
        else:
            out.write(response.read().decode("utf-8", errors="replace") + "\n")


def invoke_endpoint(
    region: str | None, params: dict[str, Any], stream: bool, timeout_s: float, out: TextIO
) -> None:
    """``invoke_endpoint`` (the whole answer) or ``invoke_endpoint_with_response_stream`` (tokens)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from serving.deploy.cli import sagemaker_client

    try:
        client = sagemaker_client(region, "sagemaker-runtime", read_timeout_s=timeout_s)
        if not stream:
            response = client.invoke_endpoint(**params)
            out.write(response["Body"].read().decode("utf-8", errors="replace") + "\n")
            return
        response = client.invoke_endpoint_with_response_stream(**params)
        events = response["Body"]
        print_stream((e["PayloadPart"]["Bytes"] for e in events if "PayloadPart" in e), out)
    except ClientError as exc:  # ModelError, ValidationError, and mid-stream ModelStreamError
        raise InvokeError(str(exc).splitlines()[0][:1000]) from None
    except BotoCoreError as exc:
        raise InvokeError(f"{type(exc).__name__}: {exc}") from None


def endpoint_params(
    endpoint: str, component: str | None, body: bytes, content_type: str, accept: str | None
) -> dict[str, Any]:
    params: dict[str, Any] = {"EndpointName": endpoint, "Body": body, "ContentType": content_type}
    if accept:
        params["Accept"] = accept
    if component:
        params["InferenceComponentName"] = component
    return params
