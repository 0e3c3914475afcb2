"""The HTTP process's side of the broker connection: one zmq socket per process, many requests.

The HTTP front runs gunicorn's gevent worker, so thousands of connections (queued requests, long
streams, health checks) cost a greenlet each and /ping never waits for a free thread. One reader
greenlet routes the broker's frames to per-request queues by an internal id.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator

import gevent
import zmq.green as zmq
from gevent.queue import Empty, Queue

from serving import messages as msg
from serving.errors import PredictTimeout, ServingError


class BrokerClient:
    def __init__(self, address: str, reply_timeout_s: float) -> None:
        self.address = address
        self.reply_timeout_s = reply_timeout_s
        self._pid: int | None = None
        self._sock: zmq.Socket | None = None
        self._waiting: dict[bytes, Queue] = {}

    def _socket(self) -> zmq.Socket:
        """Created lazily in the serving process (after gunicorn forks), with its reader greenlet."""
        if self._sock is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._sock = zmq.Context().socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.RCVHWM, 0)
            self._sock.setsockopt(zmq.SNDHWM, 0)
            self._sock.connect(self.address)
            gevent.spawn(self._read_forever, self._sock)
        return self._sock

    def _read_forever(self, sock: zmq.Socket) -> None:
        while True:
            kind, key, payload = sock.recv_multipart()
            queue = self._waiting.get(key)
            if queue is not None:  # else: a late frame for a request that already ended
                queue.put((kind, payload))

    def _exchange(self, frames: list[bytes], key: bytes) -> Queue:
        queue: Queue = Queue()
        self._waiting[key] = queue
        self._socket().send_multipart(frames)
        return queue

    def events(self, request: msg.InferRequest) -> Iterator[tuple[bytes, bytes]]:
        """Yield (kind, payload) frames for this request until a terminal one."""
        key = request.request_id.encode()
        queue = self._exchange([msg.REQ, msg.dumps(request)], key)
        try:
            while True:
                try:
                    kind, payload = queue.get(timeout=self.reply_timeout_s)
                except Empty:
                    raise PredictTimeout("No reply from the model within the server timeout.") from None
                yield kind, payload
                if kind in msg.TERMINAL:
                    return
        finally:
            self._waiting.pop(key, None)

    def cancel(self, request_id: str) -> None:
        self._socket().send_multipart([msg.CANCEL, request_id.encode()])

    def manage(self, command: dict, timeout_s: float) -> dict:
        """Run a management command on the broker (serving.management); its reply holds ``code`` and
        either ``body`` or an error's ``type`` and ``message``. A load waits for the model's workers."""
        key = ("manage-" + uuid.uuid4().hex).encode()
        queue = self._exchange([msg.MANAGE, key, json.dumps(command).encode()], key)
        try:
            _, payload = queue.get(timeout=timeout_s)
        except Empty:
            raise ServingError(
                f"The model broker did not finish {command['op']!r} in {timeout_s:g} s.", 504
            ) from None
        finally:
            self._waiting.pop(key, None)
        return json.loads(payload)

    def status(self, timeout_s: float = 1.5) -> dict:
        key = ("status-" + uuid.uuid4().hex).encode()
        queue = self._exchange([msg.STATUS, key], key)
        try:
            _, payload = queue.get(timeout=timeout_s)
        except Empty:
            raise ServingError("The model broker did not answer the health check in time.", 503) from None
        finally:
            self._waiting.pop(key, None)
        return json.loads(payload)
