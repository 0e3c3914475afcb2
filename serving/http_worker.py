"""gunicorn's gevent worker with every client read bounded in time, and JSON refusals of oversize heads.

The HTTP front runs with ``timeout=0`` (streams may last minutes), so nothing in gunicorn bounds a
connection's life. What a slow client (slowloris) could hold open, and what bounds it:

* the request line and headers: gunicorn's gevent worker already reads each request's head, the
  first included, under ``gevent.Timeout(keepalive)`` (``AsyncWorker.handle``), so
  ``keepalive_timeout`` (always >= 1 s) bounds waiting for a request plus receiving its head;
* the TLS handshake: gevent would run it before the worker sees the socket, with no bound; the
  context defers it (``defer_handshake``) and ``handle`` runs it under the same ``keepalive_timeout``;
* the body: nothing in gunicorn; ``DeadlineBody`` gives the whole body ``request_body_timeout`` from
  the end of the head, then the request is answered 408 (in its route's dialect, by the app's error
  handler) and the connection closed.

Each bound is one gevent timer on the connection's own greenlet, so a stalled client costs a sleeping
greenlet for a bounded time and never delays other connections.
"""

from __future__ import annotations

import functools
import json
import ssl
import time
from typing import Any

import gevent
from gunicorn import util
from gunicorn.http.errors import LimitRequestHeaders, LimitRequestLine
from gunicorn.workers.ggevent import GeventWorker
from werkzeug.exceptions import RequestTimeout

from serving.dialects import Api, error_reply


def defer_handshake(_config: Any, default_factory: Any) -> ssl.SSLContext:
    """gunicorn's ``ssl_context`` hook: the default context, but wrapping sockets without the handshake,
    which ``BoundedGeventWorker.handle`` then runs under a timeout."""
    context = default_factory()
    context.wrap_socket = functools.partial(context.wrap_socket, do_handshake_on_connect=False)
    return context


class DeadlineBody:
    """A request body (gunicorn's ``Body``) that must arrive whole within ``timeout_s`` of its head."""

    def __init__(self, req: Any, timeout_s: float) -> None:
        self.req, self.body, self.timeout_s = req, req.body, timeout_s
        self.deadline = time.monotonic() + timeout_s

    def read(self, size: int | None = None) -> bytes:
        return self._bounded(self.body.read, size)

    def readline(self, size: int | None = None) -> bytes:
        return self._bounded(self.body.readline, size)

    def readlines(self, size: int | None = None) -> list[bytes]:
        return self._bounded(self.body.readlines, size)

    def __iter__(self) -> DeadlineBody:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def _bounded(self, read: Any, size: int | None) -> Any:
        timer = gevent.Timeout(max(self.deadline - time.monotonic(), 0.0))
        timer.start()
        try:
            return read(size)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            self.req.must_close = True  # the rest of the body may still come: never reuse the connection
            raise RequestTimeout(
                f"The request body did not arrive within request_body_timeout={self.timeout_s:g} s of its "
                "headers. Fix: send the body right after the headers, or raise request_body_timeout "
                "(SERVING_REQUEST_BODY_TIMEOUT)."
            ) from None
        finally:
            timer.close()


class BoundedGeventWorker(GeventWorker):
    """The gevent worker (``worker_class``) of serving.http_main, with the bounds above."""

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        if isinstance(client, ssl.SSLSocket) and not self._handshake(client, addr):
            util.close(client)
            return
        super().handle(listener, client, addr)

    def _handshake(self, client: Any, addr: Any) -> bool:
        client.setblocking(True)
        with gevent.Timeout(self.cfg.keepalive, False):
            try:
                client.do_handshake()
            except (ssl.SSLError, OSError) as exc:  # plain HTTP on the TLS port, a reset, a bad hello
                self.log.debug("TLS handshake with %s failed: %s", addr, exc)
                return False
            return True
        self.log.debug("TLS handshake with %s took over %s s: closed", addr, self.cfg.keepalive)
        return False

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        if req.body is None:
            return super().handle_request(listener_name, req, sock, addr)
        timeout_s = self.app.config_obj.request_body_timeout_s  # the HttpServer application
        body = req.body = DeadlineBody(req, timeout_s)
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            req.body = body.body  # what the parser drains before the next request (under keepalive)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """Oversize request lines and headers are refused in JSON (LMI dialect: no route was parsed)."""
        if not isinstance(exc, (LimitRequestLine, LimitRequestHeaders)):
            super().handle_error(req, client, addr, exc)
            return
        cfg = self.cfg
        if isinstance(exc, LimitRequestLine):
            code, reason = 414, "URI Too Long"
            message = (
                f"The request line is longer than limit_request_line={cfg.limit_request_line} bytes. Fix: "
                "send a shorter URL, or raise limit_request_line (SERVING_LIMIT_REQUEST_LINE, at most 8190)."
            )
        else:
            code, reason = 431, "Request Header Fields Too Large"
            message = (
                f"The request headers exceed the limits ({exc}): at most limit_request_fields="
                f"{cfg.limit_request_fields} fields of at most limit_request_field_size="
                f"{cfg.limit_request_field_size} bytes. Fix: send fewer or smaller headers, or raise those "
                "limits (SERVING_LIMIT_REQUEST_FIELDS, SERVING_LIMIT_REQUEST_FIELD_SIZE)."
            )
        self.log.warning("Refused a request from %s: %s", addr[0] if addr else "", exc)
        _, body = error_reply(Api.LMI, code, message, reason.replace(" ", ""))
        payload = json.dumps(body).encode()
        head = (
            f"HTTP/1.1 {code} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        try:
            util.write_nonblock(client, head.encode("latin-1") + payload)
        except OSError:
            pass  # the client is gone
