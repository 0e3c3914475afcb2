"""Loading, scaling and unloading models at run time, on the broker thread.

Each command is answered when its effect is real: a load or a scale-up once every new worker has
loaded (or the model failed), an unload once every worker process has exited and its memory is
released. Nothing here waits: workers are asked to exit, and ``tick`` (called every few milliseconds
by the broker loop) reaps them, killing any that outlive STOP_GRACE_S.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from serving.errors import BadRequest, PredictTimeout, ServingError, ShuttingDown, WorkerDied
from serving.memory import InsufficientMemory
from serving.model_group import ModelGroup, Waiter
from serving.registry import ModelConflict, ModelRegistry
from serving.workers import WorkerSlot

if TYPE_CHECKING:
    from serving.broker import Broker

log = logging.getLogger("serving.management")

STOP_GRACE_S = 5.0
"""How long a worker asked to exit (SIGTERM) may take before it is killed."""
OOM_MARKERS = ("memoryerror", "outofmemoryerror", "out of memory")


class ModelUnloaded(ServingError):
    """The request's model was unloaded while the request waited; SageMaker reloads it and retries."""

    status_code = 503
    error_type = "ModelUnloadedException"


class ModelLoadFailed(ServingError):
    error_type = "ModelLoadException"


def load_error(group: ModelGroup) -> ServingError:
    """Why a load failed, as the load request's answer: 507 when the worker ran out of memory."""
    reason = group.failed_reason or "unknown"
    if any(marker in reason.lower() for marker in OOM_MARKERS):
        return InsufficientMemory(
            f"Model {group.name!r} ran out of memory while loading ({reason}). Fix: unload another model "
            "or set required_memory_mb in its serving.properties to what it really needs."
        )
    return ModelLoadFailed(
        f"Model {group.name!r} failed to load: {reason}. Fix: check the model folder and its "
        "serving.properties (the server log has the worker's traceback), then load it again."
    )


class ModelManager:
    """The broker's control path: runs management commands and answers each when its effect is real."""

    def __init__(self, broker: Broker, registry: ModelRegistry) -> None:
        self.broker, self.registry = broker, registry
        self.stopping: list[ModelGroup] = []
        """Groups with retiring workers (scaled down or unloaded) still to reap."""
        self.failed: list[ModelGroup] = []
        """Groups that failed since the last tick: their waiters are answered there."""

    def handle(self, waiter: Waiter, command: dict[str, Any]) -> None:
        """Run one command from the HTTP front (serving.model_routes)."""
        handler = self._commands().get(command.get("op", ""))
        try:
            if handler is None:
                raise BadRequest(f"Unknown management command {command.get('op')!r}.")
            if self.broker.draining and command["op"] in ("load", "scale"):
                raise ShuttingDown("The server is shutting down; no model can be loaded or scaled.")
            handler(waiter, command)
        except ServingError as error:
            log.warning("Management command %s failed: %s", command.get("op"), error.message)
            self.broker.reply_error(waiter, error)
        except Exception as exc:  # a bug must not leave the HTTP request waiting for a reply
            log.exception("Management command %s failed", command.get("op"))
            self.broker.reply_error(waiter, ServingError(f"{command.get('op')} failed: {exc!r}", 500))

    def _commands(self) -> dict[str, Callable[[Waiter, dict[str, Any]], None]]:
        return {
            "load": self._load,
            "unload": self._unload,
            "scale": self._scale,
            "list": self._list,
            "describe": self._describe,
        }

    # ---- commands --------------------------------------------------------------------------------
    def _load(self, waiter: Waiter, command: dict[str, Any]) -> None:
        group = self.registry.prepare(command.get("name"), command.get("url", ""), command.get("params", {}))
        log.info("Loading model %r from %s with %d worker(s)", group.name, group.url, len(group.slots))
        for slot in group.slots:
            self.broker.start_worker(group, slot)
        if command.get("synchronous", True):
            group.load_waiters.append(Waiter(waiter.front, waiter.key, f'Model "{group.name}" registered.'))
        else:
            self.broker.reply(waiter, 202, {"status": f'Model "{group.name}" registration scheduled.'})

    def _unload(self, waiter: Waiter, command: dict[str, Any]) -> None:
        group = self.registry.get(command.get("name", ""))
        log.info("Unloading model %r", group.name)
        group.unload_waiters.append(Waiter(waiter.front, waiter.key, f'Model "{group.name}" unregistered.'))
        self._begin_unload(group)

    def _scale(self, waiter: Waiter, command: dict[str, Any]) -> None:
        group = self.registry.get(command.get("name", ""))
        low = int(command["min_worker"])
        high = int(command.get("max_worker") or max(low, group.max_workers))
        if not 1 <= low <= high:
            raise BadRequest(f"min_worker={low}, max_worker={high}. Fix: use 1 <= min_worker <= max_worker.")
        if group.failed_reason is not None:
            raise ServingError(
                f"Model {group.name!r} failed: {group.failed_reason}. Fix: unload it and load it again.", 503
            )
        self._resize(group, low)
        group.max_workers = high
        done = f'Model "{group.name}" scaled to {low} worker(s).'
        synchronous = command.get("synchronous", True)
        if synchronous and not group.all_loaded():
            group.load_waiters.append(Waiter(waiter.front, waiter.key, done))
        else:
            self.broker.reply(waiter, 200 if synchronous else 202, {"status": done})

    def _resize(self, group: ModelGroup, workers: int) -> None:
        """Start replicas (memory checked first), or retire the idle, then the newest, ones."""
        if workers > len(group.slots):
            self.registry.account_workers(group, workers + len(group.retiring))
            for _ in range(workers - len(group.slots)):
                slot = group.new_slot()
                group.slots.append(slot)
                self.broker.start_worker(group, slot)
        elif workers < len(group.slots):
            idle_first = sorted(group.slots, key=lambda s: (bool(s.batch), -s.index))
            victims = idle_first[: len(group.slots) - workers]
            group.slots = [s for s in group.slots if s not in victims]
            self._retire(group, victims)

    def _list(self, waiter: Waiter, command: dict[str, Any]) -> None:
        groups, next_token = self.registry.page(int(command.get("limit", 100)), int(command.get("token", 0)))
        body: dict[str, Any] = {"models": [g.summary() for g in groups]}
        if next_token is not None:
            body["nextPageToken"] = str(next_token)
        self.broker.reply(waiter, 200, body)

    def _describe(self, waiter: Waiter, command: dict[str, Any]) -> None:
        self.broker.reply(waiter, 200, self.registry.get(command.get("name", "")).describe())

    # ---- events from the broker ------------------------------------------------------------------
    def on_loaded(self, group: ModelGroup) -> None:
        """Every replica of ``group`` has loaded: answer the loads and scale-ups waiting for it."""
        for waiter in group.load_waiters:
            log.info("%s (%.1f s)", waiter.done, time.monotonic() - waiter.since)
            self.broker.reply(waiter, 200, {"status": waiter.done})
        group.load_waiters.clear()

    def on_failed(self, group: ModelGroup) -> None:
        if group not in self.failed:
            self.failed.append(group)

    def tick(self, now: float) -> None:
        """Answer failed loads, and reap workers that were asked to exit."""
        while self.failed:
            group = self.failed.pop()
            for waiter in group.load_waiters:
                self.broker.reply_error(waiter, load_error(group))
            group.load_waiters.clear()
            if not group.at_startup and not group.ever_ready and not group.unloading:
                self._begin_unload(group)  # a failed load leaves nothing behind
        for group in list(self.stopping):
            self._reap(group, now)

    # ---- stopping workers ------------------------------------------------------------------------
    def _begin_unload(self, group: ModelGroup) -> None:
        self.registry.remove(group)  # new requests get a 404 from now on
        self.broker.abandon(
            group,
            ModelUnloaded(
                f"Model {group.name!r} was unloaded while this request waited. Fix: load it again and retry."
            ),
        )
        for waiter in group.load_waiters:
            self.broker.reply_error(
                waiter, ModelConflict(f"Model {group.name!r} was unloaded before it finished loading.")
            )
        group.load_waiters.clear()
        slots, group.slots = group.slots, []
        for slot in slots:
            slot.batch = {}  # its requests were answered above
        self._retire(group, slots)

    def _retire(self, group: ModelGroup, slots: list[WorkerSlot]) -> None:
        group.retiring.extend(slots)
        for slot in slots:
            self._stop_when_done(group, slot, time.monotonic())
        if group not in self.stopping:
            self.stopping.append(group)

    def _reap(self, group: ModelGroup, now: float) -> None:
        """Drop exited workers; ask idle ones (or ones past predict_timeout) to exit; kill stragglers."""
        for slot in list(group.retiring):
            if slot.has_exited():
                self._drop(group, slot)
            elif slot.stopping_since is None:
                self._stop_when_done(group, slot, now)
            elif now - slot.stopping_since > STOP_GRACE_S:
                log.warning(
                    "%sModel worker %d ignored SIGTERM for %g s; killing it",
                    group.log_prefix,
                    slot.index,
                    STOP_GRACE_S,
                )
                slot.kill()
                self._drop(group, slot)
        if group.retiring:
            return
        self.stopping.remove(group)
        if not group.unloading:  # scaled down: reserve only what still runs
            self.registry.account_workers(group, len(group.slots), force=True)
            return
        self.registry.release(group)
        for waiter in group.unload_waiters:
            log.info("%s (%.1f s)", waiter.done, time.monotonic() - waiter.since)
            self.broker.reply(waiter, 200, {"status": waiter.done})
        group.unload_waiters.clear()

    def _stop_when_done(self, group: ModelGroup, slot: WorkerSlot, now: float) -> None:
        """A retiring worker exits once its requests are answered, or once they are past predict_timeout."""
        timeout = group.config.predict_timeout_s
        if slot.batch and now - slot.batch_started > timeout:
            self.broker.fail_inflight(
                slot,
                PredictTimeout(
                    f"The model did not answer within option.predict_timeout={timeout:g} s. "
                    "Raise option.predict_timeout or send smaller requests."
                ),
            )
            slot.batch = {}
        if not slot.batch:
            slot.terminate()

    def _drop(self, group: ModelGroup, slot: WorkerSlot) -> None:
        group.retiring.remove(slot)
        self.broker.forget_worker(slot)
        if slot.batch:
            self.broker.fail_inflight(
                slot,
                WorkerDied(
                    "The model worker was stopped while processing this "
                    "request (the model was scaled down). Retry it."
                ),
            )
