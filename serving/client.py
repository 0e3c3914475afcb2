"""The HTTP process's side of the broker connection: one DEALER socket per HTTP thread."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import zmq

from serving import messages as msg
from serving.errors import PredictTimeout, ServingError


class BrokerClient:
    """Sends requests to the broker and yields the frames that answer them.

    zmq sockets are not thread-safe, so each HTTP worker thread lazily gets its own socket.
    """

    def __init__(self, address: str, reply_timeout_s: float) -> None:
        self.address = address
        self.reply_timeout_ms = int(reply_timeout_s * 1000)
        self._local = threading.local()
        self._context = zmq.Context.instance()

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.address)
            self._local.sock = sock
        return sock

    def _reset(self) -> None:
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            sock.close(0)
            self._local.sock = None

    def events(self, request: msg.InferRequest) -> Iterator[tuple[bytes, bytes]]:
        """Yield (kind, payload) frames for this request until a terminal one."""
        sock = self._socket()
        sock.send_multipart([msg.REQ, msg.dumps(request)])
        while True:
            if not sock.poll(self.reply_timeout_ms):
                self._reset()
                raise PredictTimeout("No reply from the model within the server timeout.")
            kind, request_id, payload = sock.recv_multipart()
            if request_id.decode() != request.request_id:
                continue  # a late frame for an earlier request on this thread's socket
            yield kind, payload
            if kind in msg.TERMINAL:
                return

    def cancel(self, request_id: str) -> None:
        self._socket().send_multipart([msg.CANCEL, request_id.encode()])

    def status(self, timeout_s: float = 1.5) -> dict:
        sock = self._socket()
        sock.send_multipart([msg.STATUS, b""])
        while sock.poll(int(timeout_s * 1000)):
            kind, _, payload = sock.recv_multipart()
            if kind == msg.STATUS:
                return json.loads(payload)
        self._reset()
        raise ServingError("The model broker did not answer the health check in time.", 503)
