"""Model-worker process: load the handler once, then serve batches sent by the broker.

Run as ``python -m handlers.worker --spec SPEC --address ADDR --identity ID`` by serving.workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from typing import Any

import zmq

from handlers.io import Input, Output
from handlers.service import HandlerService
from serving import messages as msg

log = logging.getLogger("handlers.worker")


def to_input(request: msg.InferRequest) -> Input:
    item = Input()
    item.properties.update(request.properties)
    for key, value in request.content:
        item.content.add(key, value)
    return item


def to_response(output: Output) -> msg.InferResponse:
    properties = {str(k): str(v) for k, v in output.get_properties().items()}
    content = output.content
    body = b""
    if content.size():
        data = content.get("data")
        body = data if data is not None else content.value_at(0)
    if isinstance(body, str):
        body = body.encode()
    return msg.InferResponse(int(output.code), str(output.message), properties, bytes(body))


def finalize(output: Output) -> None:
    """Run the handler's finalize callback after the response left; its failure is only logged."""
    try:
        output.execute_finalize()
    except Exception:
        log.exception("Output.finalize callback failed")


class Worker:
    def __init__(self, sock: zmq.Socket, service: HandlerService) -> None:
        self.sock = sock
        self.service = service
        self.cancelled: set[str] = set()

    def serve_forever(self) -> None:
        while True:
            frames = self.sock.recv_multipart()
            if frames[0] == msg.BATCH:
                self.run_batch(msg.loads(frames[1]))
            elif frames[0] == msg.CANCEL:
                self.cancelled.add(frames[1].decode())

    def run_batch(self, requests: list[msg.InferRequest]) -> None:
        self.cancelled.clear()
        started = time.perf_counter()
        outputs = self.service.handle_batch([to_input(r) for r in requests])
        log.debug("batch of %d in %.1f ms", len(requests), (time.perf_counter() - started) * 1000)
        for request, output in zip(requests, outputs, strict=True):
            if output.stream_content is not None:
                self.stream(request.request_id, output)
            else:
                self.send(msg.RESP, request.request_id, msg.dumps(to_response(output)))
            finalize(output)
        self.sock.send_multipart([msg.DONE, b""])

    def send(self, kind: bytes, request_id: str, payload: bytes) -> None:
        self.sock.send_multipart([kind, request_id.encode(), payload])

    def _poll_cancel(self) -> None:
        while self.sock.poll(0):
            frames = self.sock.recv_multipart()
            if frames[0] == msg.CANCEL:
                self.cancelled.add(frames[1].decode())

    def stream(self, request_id: str, output: Output) -> None:
        """Relay chunks as produced; an error after the first chunk ends the stream in-band."""
        head = to_response(output)
        head.body = b""
        self.send(msg.START, request_id, msg.dumps(head))
        error = b""
        try:
            for chunk in output.iter_stream():
                self._poll_cancel()
                if request_id in self.cancelled:
                    log.info("Request %s cancelled by the client", request_id)
                    break
                self.send(msg.CHUNK, request_id, chunk)
        except Exception as exc:  # reported to the client as the stream's last event
            log.exception("Streaming handler failed")
            error = str(exc).encode() or type(exc).__name__.encode()
        self.send(msg.END, request_id, error)


class RollingWorker:
    """Continuous batching: take requests whenever they come, run one engine step per loop."""

    def __init__(self, sock: zmq.Socket, handler: Any) -> None:
        self.sock = sock
        self.handler = handler

    def serve_forever(self) -> None:
        while True:
            if self.sock.poll(0 if self.handler.has_work() else 100):
                self._receive()
            if self.handler.has_work():
                self._send(self.handler.step())

    def _receive(self) -> None:
        frames: list = []
        while self.sock.poll(0):
            parts = self.sock.recv_multipart()
            if parts[0] == msg.BATCH:
                for request in msg.loads(parts[1]):
                    frames.extend(self.handler.submit(request))
            elif parts[0] == msg.CANCEL:
                self.handler.cancel(parts[1].decode())
        self._send(frames)

    def _send(self, frames: list) -> None:
        for kind, request_id, payload in frames:
            self.sock.send_multipart([kind, request_id.encode(), payload])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--identity", required=True)
    args = parser.parse_args(argv)
    with open(args.spec, encoding="utf-8") as fh:
        spec = json.load(fh)
    logging.basicConfig(
        level=spec.get("log_level", "INFO"),
        format=f"%(asctime)s %(levelname)s [{args.identity}] %(name)s: %(message)s",
    )
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, args.identity.encode())
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(args.address)
    model_dir = spec.get("model_dir")
    if model_dir:
        os.chdir(model_dir)
    service = HandlerService(spec["properties"], model_dir)
    try:
        service.initialize()
    except Exception as exc:
        log.error("Model load failed:\n%s", traceback.format_exc())
        sock.send_multipart([msg.LOAD_FAILED, f"{type(exc).__name__}: {exc}".encode()])
        sock.close()
        sys.exit(3)
    rolling = service.rolling_handler
    capacity = rolling.capacity if rolling is not None else 0
    sock.send_multipart([msg.READY, json.dumps({"rolling_capacity": capacity}).encode()])
    if rolling is not None:
        RollingWorker(sock, rolling).serve_forever()
    Worker(sock, service).serve_forever()


if __name__ == "__main__":
    main()
