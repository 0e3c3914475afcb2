"""The broker: one bounded queue in front of N model workers.

It runs as a thread of the server's main process and never blocks on a model: it routes requests to
the least-loaded ready worker (batching while they are busy), relays replies, enforces timeouts,
detects dead workers and restarts them, and answers health checks at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

import zmq

from serving import messages as msg
from serving.batching import BatchQueue
from serving.config import ServingConfig
from serving.errors import PredictTimeout, QueueFull, ServingError, ShuttingDown, WorkerDied
from serving.workers import BUSY, DEAD, READY, STARTING, WorkerSlot

log = logging.getLogger("serving.broker")


WORKER_CHECK_INTERVAL_S = 0.01
"""How often worker processes are polled for an exit: often enough to notice a death within ~50 ms,
rarely enough that a stream of thousands of token frames per second costs no syscalls per frame."""


@dataclass
class Pending:
    front: bytes
    request: msg.InferRequest


@dataclass
class Inflight:
    front: bytes
    slot: int


class Broker:
    def __init__(self, config: ServingConfig, front_address: str, back_address: str, spec_path: str) -> None:
        self.config = config
        self.front_address, self.back_address, self.spec_path = front_address, back_address, spec_path
        self.queue: BatchQueue[Pending] = BatchQueue(
            config.batch_size,
            config.max_batch_delay_ms / 1000,
            config.job_queue_size,
            max_wait_s=config.predict_timeout_s,
        )
        self._workers_checked = float("-inf")
        self.slots = [WorkerSlot(i) for i in range(config.num_workers)]
        self.inflight: dict[str, Inflight] = {}
        self.crashes = 0
        self.failed_reason: str | None = None
        self.ever_ready = False
        self.draining = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.context = zmq.Context.instance()
        self.front = self.context.socket(zmq.ROUTER)
        self.back = self.context.socket(zmq.ROUTER)
        for sock, address in ((self.front, front_address), (self.back, back_address)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
            sock.setsockopt(zmq.SNDHWM, 0)  # never drop a frame: queues are bounded by job_queue_size
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.bind(address)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        for slot in self.slots:
            slot.start(self.spec_path, self.back_address, self.config.worker_env())
        self._thread = threading.Thread(target=self._run, name="broker", daemon=True)
        self._thread.start()

    def stop(self, worker_timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        for slot in self.slots:
            slot.stop(worker_timeout_s)
        if self._thread is None or not self._thread.is_alive():  # sockets belong to that thread
            self.front.close(0)
            self.back.close(0)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                events = dict(poller.poll(self._poll_timeout_ms()))
                if self.back in events:
                    self._drain(self.back, self._on_worker)
                if self.front in events:
                    self._drain(self.front, self._on_front)
                now = time.monotonic()
                if now - self._workers_checked >= WORKER_CHECK_INTERVAL_S:
                    self._workers_checked = now
                    self._check_workers(now)
                self._expire(now)
                self._dispatch(now)
            except Exception:  # the broker must outlive any single bad message
                log.exception("Broker loop error")

    @staticmethod
    def _drain(sock: zmq.Socket, handler) -> None:  # noqa: ANN001
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handler(frames)

    def _poll_timeout_ms(self) -> int:
        """Sleep until the next thing that can happen without a message: a held dynamic batch is due,
        or the oldest queued request expires. Never 0 while nothing can be dispatched: a busy loop here
        takes a core from the model worker."""
        wake = [self.queue.next_expiry()]
        if any(s.state == READY and not s.rolling_capacity for s in self.slots):
            wake.append(self.queue.next_deadline())  # rolling workers take requests at once or not at all
        times = [t for t in wake if t is not None]
        if not times:
            return 50  # a message (DONE/READY/a request) wakes us; 50 ms bounds worker-death detection
        return max(1, min(50, int((min(times) - time.monotonic()) * 1000) + 1))

    # ---- front side ------------------------------------------------------------------------
    def _on_front(self, frames: list[bytes]) -> None:
        front, kind, payload = frames[0], frames[1], frames[2]
        if kind == msg.REQ:
            self._submit(front, msg.loads(payload))
        elif kind == msg.CANCEL:
            self._cancel(payload.decode())
        elif kind == msg.STATUS:
            self.front.send_multipart([front, msg.STATUS, payload, json.dumps(self.health()).encode()])

    def _reply_error(self, front: bytes, request_id: str, error: ServingError) -> None:
        payload = msg.error_payload(error.status_code, error.error_type, error.message)
        self.front.send_multipart([front, msg.ERR, request_id.encode(), payload])

    def _submit(self, front: bytes, request: msg.InferRequest) -> None:
        now = time.monotonic()
        if self.failed_reason is not None:
            error = ServingError(f"Model {self.config.model_name!r} failed: {self.failed_reason}", 503)
            self._reply_error(front, request.request_id, error)
        elif self.draining:
            self._reply_error(front, request.request_id, ShuttingDown("The server is shutting down."))
        elif self.queue.is_full():
            log.warning(
                "Job queue full (%d); refusing request %s", self.config.job_queue_size, request.request_id
            )
            error = QueueFull(
                f"Worker queue capacity exceeded for model: {self.config.model_name} "
                f"(job_queue_size={self.config.job_queue_size}). Retry later or raise job_queue_size."
            )
            self._reply_error(front, request.request_id, error)
        else:
            request.deadline = now + self.config.predict_timeout_s
            self.queue.add(Pending(front, request), now, key=request.request_id)
            self._dispatch(now)

    def _cancel(self, request_id: str) -> None:
        if self.queue.discard(request_id) is not None:
            return
        inflight = self.inflight.pop(request_id, None)
        if inflight is not None:
            slot = self.slots[inflight.slot]
            if slot.rolling_capacity:
                slot.batch.pop(request_id, None)  # a rolling worker sends nothing more for it
            self.back.send_multipart([slot.identity, msg.CANCEL, request_id.encode()])

    # ---- worker side -----------------------------------------------------------------------
    def _on_worker(self, frames: list[bytes]) -> None:
        identity, kind = frames[0], frames[1]
        slot = next((s for s in self.slots if s.identity == identity), None)
        if kind == msg.LOAD_FAILED:  # may arrive after the process exit was noticed
            self._fail(f"model load failed: {frames[2].decode(errors='replace')}")
        elif slot is None or slot.state == DEAD:
            return  # a message from a worker generation we already gave up on
        elif kind == msg.READY:
            slot.state, slot.loaded = READY, True
            slot.rolling_capacity = int(json.loads(frames[2] or b"{}").get("rolling_capacity", 0))
            self.ever_ready = all(s.loaded for s in self.slots)
            log.info("Model worker %d ready in %.1f s", slot.index, time.monotonic() - slot.started_at)
        elif kind == msg.DONE:
            slot.state, slot.batch, slot.overdue_since = READY, {}, None
            self.queue.batch_done(time.monotonic())
        else:
            self._relay(slot, kind, frames[2].decode(), frames[3])

    def _relay(self, slot: WorkerSlot, kind: bytes, request_id: str, payload: bytes) -> None:
        # Any frame shows the worker is alive: predict_timeout bounds silence, not a whole stream.
        slot.batch_started, slot.overdue_since = time.monotonic(), None
        inflight = self.inflight.get(request_id)
        if inflight is None:
            return  # timed out or cancelled: the client already has its answer
        if kind in msg.TERMINAL:
            del self.inflight[request_id]
            slot.batch.pop(request_id, None)
        self.front.send_multipart([inflight.front, kind, request_id.encode(), payload])

    def _dispatch(self, now: float) -> None:
        rolling = [s for s in self.slots if s.state == READY and s.rolling_capacity]
        while rolling and len(self.queue):
            slot = min(rolling, key=lambda s: len(s.batch))  # least loaded replica
            if len(slot.batch) >= slot.rolling_capacity:
                break
            self._send(slot, self.queue.take(limit=1), now, READY)
        any_busy = any(s.state == BUSY for s in self.slots)
        for slot in self.slots:
            if slot.state != READY or slot.rolling_capacity or not self.queue.ready(now, any_busy):
                continue
            self._send(slot, self.queue.take(), now, BUSY)
            any_busy = True

    def _send(self, slot: WorkerSlot, batch: list[Pending], now: float, state: str) -> None:
        if not slot.batch:
            slot.batch_started = now
        slot.state = state
        slot.batch.update(dict.fromkeys(p.request.request_id for p in batch))
        for pending in batch:
            self.inflight[pending.request.request_id] = Inflight(pending.front, slot.index)
        self.back.send_multipart([slot.identity, msg.BATCH, msg.dumps([p.request for p in batch])])

    # ---- failures and timeouts -------------------------------------------------------------
    def _fail_inflight(self, slot: WorkerSlot, error: ServingError) -> None:
        for request_id in slot.batch:
            inflight = self.inflight.pop(request_id, None)
            if inflight is not None:
                self._reply_error(inflight.front, request_id, error)

    def _check_workers(self, now: float) -> None:
        for slot in self.slots:
            code = slot.exit_code()
            if slot.state != DEAD and code is not None and not self._stop.is_set():
                self._drain(self.back, self._on_worker)  # its last words (LOAD_FAILED) first
                self._on_worker_death(slot, code)
            elif slot.state == STARTING and now - slot.started_at > self.config.model_loading_timeout_s:
                slot.kill()
                self._fail(
                    f"model did not load within option.model_loading_timeout="
                    f"{self.config.model_loading_timeout_s:g} s"
                )
            elif slot.batch:
                self._check_overdue(slot, now)

    def _on_worker_death(self, slot: WorkerSlot, code: int) -> None:
        was_loading = slot.state == STARTING
        slot.state = DEAD
        log.error("Model worker %d (pid %s) exited with code %s", slot.index, slot.pid, code)
        self._fail_inflight(
            slot,
            WorkerDied(
                f"The model worker died (exit code {code}) while processing this request; it is being "
                "restarted. Retry the request."
            ),
        )
        if was_loading and not self.ever_ready:
            self._fail(f"model worker exited with code {code} while loading; see the log above")
        self._restart(slot)

    def _restart(self, slot: WorkerSlot) -> None:
        """Count a crash or hang; restart until retry_threshold is exceeded, then FAILED."""
        self.crashes += 1
        if self.crashes > self.config.retry_threshold:
            threshold = self.config.retry_threshold
            self._fail(f"model workers crashed or hung {self.crashes} times (retry_threshold={threshold})")
        if self.failed_reason is None and not self._stop.is_set():
            slot.start(self.spec_path, self.back_address, self.config.worker_env())

    def _check_overdue(self, slot: WorkerSlot, now: float) -> None:
        timeout = self.config.predict_timeout_s
        if slot.overdue_since is None and now - slot.batch_started > timeout:
            slot.overdue_since = now
            self._fail_inflight(
                slot,
                PredictTimeout(
                    f"The model did not answer within option.predict_timeout={timeout:g} s. "
                    "Raise option.predict_timeout or send smaller requests."
                ),
            )
            if slot.rolling_capacity:  # rolling: free the sequences; new work then shows if it is stuck
                for request_id in slot.batch:
                    self.back.send_multipart([slot.identity, msg.CANCEL, request_id.encode()])
                slot.batch = {}
        elif slot.overdue_since is not None and now - max(slot.overdue_since, slot.batch_started) > max(
            5.0, timeout
        ):  # still silent a grace period after the timeout (or after new work reached it)
            log.error("Model worker %d is stuck past its timeout; restarting it", slot.index)
            slot.kill()
            self._restart(slot)

    def _expire(self, now: float) -> None:
        for pending in self.queue.expire(now):
            self._reply_error(
                pending.front,
                pending.request.request_id,
                PredictTimeout(
                    f"The request waited option.predict_timeout={self.config.predict_timeout_s:g} s in "
                    "the queue without a free model worker."
                ),
            )

    def _fail(self, reason: str) -> None:
        if self.failed_reason is None:  # keep the first, most specific reason
            log.error("Model %r FAILED: %s", self.config.model_name, reason)
            self.failed_reason = reason
        error = ServingError(f"Model {self.config.model_name!r} failed: {reason}", 503)
        for pending in self.queue.drain():
            self._reply_error(pending.front, pending.request.request_id, error)
        for slot in self.slots:
            self._fail_inflight(slot, error)

    # ---- health ----------------------------------------------------------------------------
    def status(self) -> str:
        if self.failed_reason is not None:
            return "FAILED"
        if not self.ever_ready:
            return "PENDING"
        return "Healthy" if any(s.state in (READY, BUSY) for s in self.slots) else "Unhealthy"

    def health(self) -> dict:
        model = {"status": self.status()}
        if self.failed_reason is not None:  # /ping says why, so nobody has to find the log line
            model["reason"] = self.failed_reason
        return {
            "models": {self.config.model_name: model},
            "workers": [{"index": s.index, "state": s.state, "pid": s.pid} for s in self.slots],
            "queue": len(self.queue),
            "inflight": len(self.inflight),
            "crashes": self.crashes,
            "reason": self.failed_reason,
        }
