"""The broker: per model, one bounded queue in front of N model workers.

It runs as a thread of the server's main process and never blocks on a model: it routes each request
to its model's least-loaded ready worker (batching while they are busy), relays replies, enforces
timeouts, detects dead workers and restarts them, and answers health checks at once. Loading,
scaling and unloading models at run time (serving.management) happen on the same thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

import zmq

from serving import messages as msg
from serving.config import ServingConfig
from serving.errors import PredictTimeout, QueueFull, ServingError, ShuttingDown, WorkerDied
from serving.management import ModelManager
from serving.metrics import BrokerMetrics, mark_process_dead
from serving.model_group import ModelGroup, Waiter
from serving.registry import ModelRegistry
from serving.workers import BUSY, DEAD, READY, STARTING, WorkerSlot, stop_all

log = logging.getLogger("serving.broker")


WORKER_CHECK_INTERVAL_S = 0.01
"""How often worker processes are polled for an exit: often enough to notice a death within ~50 ms,
rarely enough that a stream of thousands of token frames per second costs no syscalls per frame."""
METRICS_SAMPLE_INTERVAL_S = 0.5
"""How often the queue-depth gauges are set (serving.metrics)."""
SHUTDOWN_ANSWER_S = 20.0
"""How long a drain (SIGTERM) lets held requests finish before the broker answers them 503: short of the
HTTP front's graceful timeout (serving.http_main.DRAIN_TIMEOUT_S), after which it closes them unanswered."""


@dataclass
class Pending:
    front: bytes
    request: msg.InferRequest


@dataclass
class Inflight:
    front: bytes
    slot: WorkerSlot


class Broker:
    def __init__(
        self, config: ServingConfig, front_address: str, back_address: str, registry: ModelRegistry
    ) -> None:
        self.config = config
        self.front_address, self.back_address = front_address, back_address
        self.registry = registry
        self.manager = ModelManager(self, registry)
        self.metrics = BrokerMetrics() if config.metrics else None
        self._workers_checked = self._metrics_sampled = float("-inf")
        self.workers: dict[bytes, tuple[ModelGroup, WorkerSlot]] = {}
        """Every started worker process by its zmq identity, retiring ones included."""
        self.inflight: dict[str, Inflight] = {}
        self.draining = False
        self._draining_since: float | None = None
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

    @property
    def failed_reason(self) -> str | None:
        """Why a start-up model FAILED (fail_fast exits on it); None while they are fine."""
        return next(
            (g.failed_reason for g in self.registry.groups() if g.at_startup and g.failed_reason), None
        )

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        for group in self.registry.groups():
            for slot in group.slots:
                self.start_worker(group, slot)
        self._thread = threading.Thread(target=self._run, name="broker", daemon=True)
        self._thread.start()

    def start_worker(self, group: ModelGroup, slot: WorkerSlot) -> None:
        """(Re)start a replica under a new identity; messages from its previous process are ignored."""
        self.workers.pop(slot.identity, None)
        slot.start(group.spec_path, self.back_address, group.config.worker_env())
        self.workers[slot.identity] = (group, slot)

    def forget_worker(self, slot: WorkerSlot) -> None:
        self.workers.pop(slot.identity, None)
        mark_process_dead(slot.pid)

    def stop(self, worker_timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        stop_all([slot for _group, slot in list(self.workers.values())], worker_timeout_s)
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
                self._answer_at_drain_end(now)
                for group in self.registry.groups():
                    if len(group.queue):
                        self._dispatch(group, now)
                if self.metrics is not None and now - self._metrics_sampled >= METRICS_SAMPLE_INTERVAL_S:
                    self._metrics_sampled = now
                    for group in self.registry.groups():
                        self.metrics.queue_depth.labels(group.name).set(len(group.queue))
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
        wake = []
        for group in self.registry.groups():
            wake.append(group.queue.next_expiry())
            if any(s.state == READY and not s.rolling_capacity for s in group.slots):
                wake.append(
                    group.queue.next_deadline()
                )  # rolling workers take requests at once or not at all
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
        elif kind == msg.MANAGE:
            self.manager.handle(Waiter(front, payload), json.loads(frames[3]))

    def _reply_error(self, front: bytes, request_id: str, error: ServingError) -> None:
        payload = msg.error_payload(error.status_code, error.error_type, error.message)
        self.front.send_multipart([front, msg.ERR, request_id.encode(), payload])

    def reply(self, waiter: Waiter, code: int, body: dict) -> None:
        """Answer a management request (serving.client.BrokerClient.manage)."""
        payload = json.dumps({"code": code, "body": body}).encode()
        self.front.send_multipart([waiter.front, msg.MANAGE, waiter.key, payload])

    def reply_error(self, waiter: Waiter, error: ServingError) -> None:
        payload = msg.error_payload(error.status_code, error.error_type, error.message)
        self.front.send_multipart([waiter.front, msg.MANAGE, waiter.key, payload])

    def _submit(self, front: bytes, request: msg.InferRequest) -> None:
        try:
            group = self.registry.resolve(request.model)
        except ServingError as error:  # unknown model, or several loaded and none named
            self._reply_error(front, request.request_id, error)
            return
        now, cfg = time.monotonic(), group.config
        if group.failed_reason is not None:
            error = ServingError(f"Model {group.name!r} failed: {group.failed_reason}", 503)
            self._reply_error(front, request.request_id, error)
        elif self.draining:
            self._reply_error(front, request.request_id, ShuttingDown("The server is shutting down."))
        elif group.queue.is_full():
            log.warning("Job queue full (%d); refusing request %s", cfg.job_queue_size, request.request_id)
            error = QueueFull(
                f"Worker queue capacity exceeded for model: {group.name} "
                f"(job_queue_size={cfg.job_queue_size}). Retry later or raise job_queue_size."
            )
            self._reply_error(front, request.request_id, error)
        else:
            request.deadline, request.arrived = now + cfg.predict_timeout_s, now
            group.queue.add(Pending(front, request), now, key=request.request_id)
            self._dispatch(group, now)

    def _cancel(self, request_id: str) -> None:
        if any(group.queue.discard(request_id) is not None for group in self.registry.groups()):
            return
        inflight = self.inflight.pop(request_id, None)
        if inflight is not None:
            slot = inflight.slot
            if slot.rolling_capacity:
                slot.batch.pop(request_id, None)  # a rolling worker sends nothing more for it
            self.back.send_multipart([slot.identity, msg.CANCEL, request_id.encode()])

    # ---- worker side -----------------------------------------------------------------------
    def _on_worker(self, frames: list[bytes]) -> None:
        identity, kind = frames[0], frames[1]
        group, slot = self.workers.get(identity, (None, None))
        if group is None or slot is None or group.unloading:
            return  # a worker generation we already gave up on, or a model being unloaded
        if kind == msg.LOAD_FAILED:  # may arrive after the process exit was noticed
            self._fail(group, f"model load failed: {frames[2].decode(errors='replace')}")
        elif slot.state == DEAD:
            return
        elif kind == msg.READY:
            slot.state, slot.loaded = READY, True
            slot.rolling_capacity = int(json.loads(frames[2] or b"{}").get("rolling_capacity", 0))
            elapsed = time.monotonic() - slot.started_at
            log.info("%sModel worker %d ready in %.1f s", group.log_prefix, slot.index, elapsed)
            if self.metrics is not None:
                self.metrics.load_time.labels(group.name).set(elapsed)
            if group.all_loaded():
                group.ever_ready = True
                self.manager.on_loaded(group)
        elif kind == msg.DONE:
            slot.state, slot.batch, slot.overdue_since = READY, {}, None
            group.queue.batch_done(time.monotonic())
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

    def _dispatch(self, group: ModelGroup, now: float) -> None:
        queue = group.queue
        rolling = [s for s in group.slots if s.state == READY and s.rolling_capacity]
        while rolling and len(queue):
            slot = min(rolling, key=lambda s: len(s.batch))  # least loaded replica
            if len(slot.batch) >= slot.rolling_capacity:
                break
            self._send(group, slot, queue.take(limit=1), now, READY)
        any_busy = any(s.state == BUSY for s in group.slots)
        for slot in group.slots:
            if slot.state != READY or slot.rolling_capacity or not queue.ready(now, any_busy):
                continue
            self._send(group, slot, queue.take(), now, BUSY)
            any_busy = True

    def _send(
        self, group: ModelGroup, slot: WorkerSlot, batch: list[Pending], now: float, state: str
    ) -> None:
        if not slot.batch:
            slot.batch_started = now
        if self.metrics is not None:
            wait = self.metrics.queue_wait.labels(group.name)
            for pending in batch:
                wait.observe(now - (pending.request.arrived or now))
        slot.state = state
        slot.batch.update(dict.fromkeys(p.request.request_id for p in batch))
        for pending in batch:
            self.inflight[pending.request.request_id] = Inflight(pending.front, slot)
        self.back.send_multipart([slot.identity, msg.BATCH, msg.dumps([p.request for p in batch])])

    # ---- failures and timeouts -------------------------------------------------------------
    def fail_inflight(self, slot: WorkerSlot, error: ServingError) -> None:
        for request_id in slot.batch:
            inflight = self.inflight.pop(request_id, None)
            if inflight is not None:
                self._reply_error(inflight.front, request_id, error)

    def abandon(self, group: ModelGroup, error: ServingError) -> None:
        """Fail every request the model holds, queued or in a worker (it failed, or is being unloaded)."""
        for pending in group.queue.drain():
            self._reply_error(pending.front, pending.request.request_id, error)
        for slot in group.slots + group.retiring:
            self.fail_inflight(slot, error)

    def _check_workers(self, now: float) -> None:
        for group in self.registry.groups():
            for slot in group.slots:
                self._check_worker(group, slot, now)
        self.manager.tick(now)

    def _check_worker(self, group: ModelGroup, slot: WorkerSlot, now: float) -> None:
        code = slot.exit_code()
        loading_timeout = group.config.model_loading_timeout_s
        if slot.state != DEAD and code is not None and not self._stop.is_set():
            self._drain(self.back, self._on_worker)  # its last words (LOAD_FAILED) first
            if code == msg.LOAD_FAILED_EXIT_CODE:
                self._await_load_failure(group)
            self._on_worker_death(group, slot, code)
        elif slot.state == STARTING and now - slot.started_at > loading_timeout:
            slot.kill()
            self._fail(group, f"model did not load within option.model_loading_timeout={loading_timeout:g} s")
        elif slot.batch:
            self._check_overdue(group, slot, now)

    def _await_load_failure(self, group: ModelGroup, timeout_s: float = 0.1) -> None:
        """The worker sent its reason just before exiting; wait briefly for it, so the failure names the
        cause (a load request maps an out-of-memory to 507) rather than the exit code."""
        deadline = time.monotonic() + timeout_s
        while group.failed_reason is None and time.monotonic() < deadline:
            if self.back.poll(10):
                self._drain(self.back, self._on_worker)

    def _on_worker_death(self, group: ModelGroup, slot: WorkerSlot, code: int) -> None:
        was_loading = slot.state == STARTING
        slot.state = DEAD
        log.error(
            "%sModel worker %d (pid %s) exited with code %s", group.log_prefix, slot.index, slot.pid, code
        )
        self.fail_inflight(
            slot,
            WorkerDied(
                f"The model worker died (exit code {code}) while processing this request; it is being "
                "restarted. Retry the request."
            ),
        )
        if was_loading and not group.ever_ready:
            self._fail(group, f"model worker exited with code {code} while loading; see the log above")
        self._restart(group, slot)

    def _restart(self, group: ModelGroup, slot: WorkerSlot) -> None:
        """Count a crash or hang; restart until retry_threshold is exceeded, then FAILED."""
        group.crashes += 1
        mark_process_dead(slot.pid)
        threshold = group.config.retry_threshold
        if group.crashes > threshold:
            self._fail(
                group, f"model workers crashed or hung {group.crashes} times (retry_threshold={threshold})"
            )
        if group.failed_reason is None and not self._stop.is_set():
            if self.metrics is not None:
                self.metrics.restarts.labels(group.name).inc()
            self.start_worker(group, slot)

    def _check_overdue(self, group: ModelGroup, slot: WorkerSlot, now: float) -> None:
        timeout = group.config.predict_timeout_s
        if slot.overdue_since is None and now - slot.batch_started > timeout:
            slot.overdue_since = now
            self.fail_inflight(
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
            log.error(
                "%sModel worker %d is stuck past its timeout; restarting it", group.log_prefix, slot.index
            )
            slot.kill()
            self._restart(group, slot)

    def _answer_at_drain_end(self, now: float) -> None:
        """SHUTDOWN_ANSWER_S into a drain, answer everything still held (queued, or on a worker) with a
        503, so no client is left with a connection the HTTP front closes without an answer."""
        if not self.draining:
            return
        self._draining_since = self._draining_since or now
        if now - self._draining_since < SHUTDOWN_ANSWER_S:
            return
        if self.inflight or any(len(group.queue) for group in self.registry.groups()):
            error = ShuttingDown(f"The server shut down {SHUTDOWN_ANSWER_S:g} s after SIGTERM, before this "
                                 "request finished. Retry it.")  # fmt: skip
            for group in self.registry.groups():
                self.abandon(group, error)

    def _expire(self, now: float) -> None:
        for group in self.registry.groups():
            for pending in group.queue.expire(now):
                self._reply_error(
                    pending.front,
                    pending.request.request_id,
                    PredictTimeout(
                        f"The request waited option.predict_timeout={group.config.predict_timeout_s:g} s in "
                        "the queue without a free model worker."
                    ),
                )

    def _fail(self, group: ModelGroup, reason: str) -> None:
        if group.failed_reason is None:  # keep the first, most specific reason
            log.error("Model %r FAILED: %s", group.name, reason)
            group.failed_reason = reason
        self.abandon(group, ServingError(f"Model {group.name!r} failed: {reason}", 503))
        self.manager.on_failed(group)

    # ---- health ----------------------------------------------------------------------------
    def health(self) -> dict:
        """/ping's answer: every model's status; the start-up model's status decides the code."""
        groups = self.registry.groups()
        startup = [g for g in groups if g.at_startup]
        main = startup[0] if startup else None
        workers = [{"index": s.index, "state": s.state, "pid": s.pid} for s in main.slots] if main else []
        return {
            "models": {g.name: g.health() for g in groups},
            "startup": [g.name for g in startup],
            "workers": workers,
            "queue": sum(len(g.queue) for g in groups),
            "inflight": len(self.inflight),
            "crashes": main.crashes if main else 0,
            "reason": main.failed_reason if main else None,
        }
