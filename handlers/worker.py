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

import zmq

from handlers.batch_io import request_input
from handlers.builtin.generation import GenerationHandler
from handlers.djl_api import Output
from handlers.metrics import GenerationMetrics
from handlers.replies import AnyReply, Reply, StreamChunk, StreamEnd, StreamStart
from handlers.service import HandlerService
from serving import logs
from serving import messages as msg

log = logging.getLogger("handlers.worker")


def to_reply(request_id: str, output: Output) -> Reply:
    """A DJL Output as a plain reply (the head of a stream when it streams)."""
    properties = {str(k): str(v) for k, v in output.get_properties().items()}
    content = output.content
    body = b""
    if content.size():
        data = content.get("data")
        body = data if data is not None else content.value_at(0)
    if isinstance(body, str):
        body = body.encode()
    return Reply(request_id, int(output.code), properties, bytes(body), str(output.message))


def to_frames(reply: AnyReply) -> list[bytes]:
    """The one place where handler replies become wire frames (serving.messages)."""
    rid = reply.request_id.encode()
    if isinstance(reply, Reply):
        head = msg.InferResponse(reply.code, reply.message, reply.headers, reply.body)
        return [msg.RESP, rid, msg.dumps(head)]
    if isinstance(reply, StreamStart):
        return [msg.START, rid, msg.dumps(msg.InferResponse(reply.code, "OK", reply.headers))]
    if isinstance(reply, StreamChunk):
        return [msg.CHUNK, rid, reply.data]
    return [msg.END, rid, reply.error.encode()]


def usage_frames(reply: AnyReply, worker: str) -> list[bytes] | None:
    """Sent just before a request's last frame: which worker served it and, for generation, its
    token counts, for the front's access log (clients never see it)."""
    if not isinstance(reply, (Reply, StreamEnd)):
        return None
    usage: dict[str, object] = {"worker": worker}
    if reply.usage is not None:
        usage["tokens_in"], usage["tokens_out"] = reply.usage.prompt_tokens, reply.usage.generated_tokens
    return [msg.USAGE, reply.request_id.encode(), json.dumps(usage).encode()]


def finalize(output: Output) -> None:
    """Run the handler's finalize callback after the response left; its failure is only logged."""
    try:
        output.execute_finalize()
    except Exception:
        log.exception("Output.finalize callback failed")


class Worker:
    def __init__(self, sock: zmq.Socket, service: HandlerService, identity: str = "") -> None:
        self.sock = sock
        self.service = service
        self.identity = identity
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
        outputs = self.service.handle_batch([request_input(r) for r in requests])
        log.debug("batch of %d in %.1f ms", len(requests), (time.perf_counter() - started) * 1000)
        for request, output in zip(requests, outputs, strict=True):
            if output.stream_content is not None:
                self.stream(request.request_id, output)
            else:
                self.send(to_reply(request.request_id, output))
            finalize(output)
        self.sock.send_multipart([msg.DONE, b""])

    def send(self, reply: AnyReply) -> None:
        usage = usage_frames(reply, self.identity)
        if usage is not None:
            self.sock.send_multipart(usage)
        self.sock.send_multipart(to_frames(reply))

    def _poll_cancel(self) -> None:
        while self.sock.poll(0):
            frames = self.sock.recv_multipart()
            if frames[0] == msg.CANCEL:
                self.cancelled.add(frames[1].decode())

    def stream(self, request_id: str, output: Output) -> None:
        """Relay chunks as produced; an error after the first chunk ends the stream in-band."""
        head = to_reply(request_id, output)
        self.send(StreamStart(request_id, head.code, head.headers))
        error = ""
        try:
            for chunk in output.iter_stream():
                self._poll_cancel()
                if request_id in self.cancelled:
                    log.info("Request %s cancelled by the client", request_id)
                    break
                self.send(StreamChunk(request_id, chunk))
        except Exception as exc:  # reported to the client as the stream's last event
            log.exception("Streaming handler failed")
            error = str(exc) or type(exc).__name__
        self.send(StreamEnd(request_id, error))


class GenerationWorker:
    """Continuous batching: take requests whenever they come, run one engine step per loop."""

    STATS_INTERVAL_S = 30.0

    def __init__(
        self,
        sock: zmq.Socket,
        handler: GenerationHandler,
        identity: str = "",
        metrics: GenerationMetrics | None = None,
    ) -> None:
        self.sock = sock
        self.handler = handler
        self.identity = identity
        self.metrics = metrics
        self._stats_at = time.monotonic()
        self._stats_steps = 0

    def serve_forever(self) -> None:
        while True:
            if self.sock.poll(0 if self.handler.has_work() else 100):
                self._receive()
            if self.handler.has_work():
                self._send(self.handler.step())
                if self.metrics is not None:
                    self.metrics.on_step(self.handler.last_step_size)
            now = time.monotonic()
            if self.metrics is not None and self.metrics.due(now):
                self.metrics.sample(self.handler.engine.stats(), len(self.handler.scheduler.waiting), now)
            if now - self._stats_at >= self.STATS_INTERVAL_S:
                self._log_stats()

    def _log_stats(self) -> None:
        """What the engine holds, every STATS_INTERVAL_S while it works: the operator's view of load."""
        now, stats = time.monotonic(), self.handler.engine.stats()
        rate = (stats.steps - self._stats_steps) / (now - self._stats_at)
        self._stats_at, self._stats_steps = now, stats.steps
        if rate > 0:
            log.info(
                "engine: %d/%d sequences, %d/%d cache tokens, %.1f steps/s, %d waiting",
                stats.running,
                stats.capacity,
                stats.cache_tokens_used,
                stats.cache_tokens_total,
                rate,
                len(self.handler.scheduler.waiting),
            )

    def _receive(self) -> None:
        replies: list[AnyReply] = []
        while self.sock.poll(0):
            parts = self.sock.recv_multipart()
            if parts[0] == msg.BATCH:
                for request in msg.loads(parts[1]):
                    replies.extend(self.handler.submit(request))
            elif parts[0] == msg.CANCEL:
                self.handler.cancel(parts[1].decode())
        self._send(replies)

    def _send(self, replies: list[AnyReply]) -> None:
        for reply in replies:
            usage = usage_frames(reply, self.identity)
            if usage is not None:
                self.sock.send_multipart(usage)
                if self.metrics is not None and reply.usage is not None:
                    self.metrics.on_finished(reply.usage, time.monotonic())
            self.sock.send_multipart(to_frames(reply))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--identity", required=True)
    args = parser.parse_args(argv)
    with open(args.spec, encoding="utf-8") as fh:
        spec = json.load(fh)
    log_format = spec.get("log_format", "text")
    logs.configure(log_format, spec.get("log_level", "INFO"), args.identity)
    options = spec.get("options") or {}
    parallel = options.get("tensor_parallel_degree", 1) != 1 or options.get("pipeline_parallel_degree", 1) > 1
    if parallel and options.get("rolling_batch", "auto") != "disable":  # the native engine's ranks
        from engines.parallel.spawn import prestart

        prestart()  # the followers' fork server imports torch while this process does (0 = max GPUs)
    if log_format == "json":
        route_transformers_logs()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, args.identity.encode())
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(args.address)
    model_dir = spec.get("model_dir")
    if model_dir:
        os.chdir(model_dir)
    service = HandlerService(spec["properties"], model_dir, spec.get("options"))
    try:
        service.initialize()
    except Exception as exc:
        log.error("Model load failed:\n%s", traceback.format_exc())
        sock.send_multipart([msg.LOAD_FAILED, f"{type(exc).__name__}: {exc}".encode()])
        sock.close()
        sys.exit(msg.LOAD_FAILED_EXIT_CODE)
    generation = service.generation_handler
    # The broker holds what waits beyond this (job_queue_size) and sends a request when there is room.
    capacity = generation.engine.capacity if generation is not None else 0
    sock.send_multipart([msg.READY, json.dumps({"rolling_capacity": capacity}).encode()])
    if generation is not None:
        metrics = GenerationMetrics(spec["model_name"]) if spec.get("metrics") else None
        GenerationWorker(sock, generation, args.identity, metrics).serve_forever()
    Worker(sock, service, args.identity).serve_forever()


def route_transformers_logs() -> None:
    """transformers prints through a handler of its own; send its records to ours (JSON lines)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


if __name__ == "__main__":
    main()
