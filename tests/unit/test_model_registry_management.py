"""Loading, scaling and unloading on the broker thread (serving.management), without a broker.

A recording broker stands in for serving.broker.Broker; the "workers" it starts are real ``sleep``
processes in their own session, so asking one to exit, reaping it and killing a straggler are real.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from serving.config import load_config
from serving.management import ModelManager
from serving.model_group import ModelGroup, Waiter
from serving.registry import ModelRegistry
from serving.workers import READY, STARTING, WorkerSlot


class RecordingBroker:
    def __init__(self) -> None:
        self.draining = False
        self.replies: dict[bytes, tuple[int, dict]] = {}
        self.abandoned: list[str] = []
        self.started: list[WorkerSlot] = []

    def start_worker(self, group: ModelGroup, slot: WorkerSlot) -> None:
        slot.generation += 1
        slot.process = subprocess.Popen(["sleep", "30"], start_new_session=True)
        slot.state, slot.started_at, slot.stopping_since = STARTING, time.monotonic(), None
        self.started.append(slot)

    def forget_worker(self, slot: WorkerSlot) -> None:
        pass

    def reply(self, waiter: Waiter, code: int, body: dict) -> None:
        self.replies[waiter.key] = (code, body)

    def reply_error(self, waiter: Waiter, error) -> None:  # noqa: ANN001
        self.replies[waiter.key] = (error.status_code, {"message": error.message})

    def abandon(self, group: ModelGroup, error) -> None:  # noqa: ANN001
        self.abandoned.append(group.name)

    def fail_inflight(self, slot: WorkerSlot, error) -> None:  # noqa: ANN001
        pass


@pytest.fixture
def setup(tmp_path: Path):
    config = load_config(None, {"SAGEMAKER_MULTI_MODEL": "true", "SERVING_MEMORY_BUDGET_MB": "100"})
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    registry = ModelRegistry(config, str(runtime), environ={})
    broker = RecordingBroker()
    yield ModelManager(broker, registry), broker, registry, tmp_path
    for slot in broker.started:
        slot.kill()


def folder(root: Path, name: str, properties: str = "required_memory_mb=30\n") -> str:
    path = root / name
    path.mkdir()
    (path / "serving.properties").write_text(properties)
    return str(path)


def command(manager: ModelManager, key: str, **fields) -> None:
    manager.handle(Waiter(b"front", key.encode()), fields)


def become_ready(manager: ModelManager, group: ModelGroup) -> None:
    """What the broker does when each worker reports READY."""
    for slot in group.slots:
        slot.state, slot.loaded = READY, True
    group.ever_ready = True
    manager.on_loaded(group)


def tick_until(manager: ModelManager, done, timeout_s: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        manager.tick(time.monotonic())
        time.sleep(0.01)
    assert done()


def test_a_load_is_answered_when_its_workers_have_loaded(setup):
    manager, broker, registry, root = setup
    command(manager, "l", op="load", name="m", url=folder(root, "m"))
    assert b"l" not in broker.replies
    assert [s.state for s in registry.get("m").slots] == [STARTING]
    become_ready(manager, registry.get("m"))
    assert broker.replies[b"l"] == (200, {"status": 'Model "m" registered.'})


def test_an_asynchronous_load_is_answered_at_once_with_202(setup):
    manager, broker, _, root = setup
    command(manager, "l", op="load", name="m", url=folder(root, "m"), synchronous=False)
    assert broker.replies[b"l"] == (202, {"status": 'Model "m" registration scheduled.'})


def test_a_second_load_and_one_beyond_the_budget_start_nothing(setup):
    manager, broker, registry, root = setup
    command(manager, "a", op="load", name="m", url=folder(root, "m"))
    command(manager, "b", op="load", name="m", url=folder(root, "n"))
    command(manager, "c", op="load", name="big", url=folder(root, "big", "required_memory_mb=90\n"))
    assert broker.replies[b"b"][0] == 409
    assert broker.replies[b"c"][0] == 507
    assert "it needs 90 MB" in broker.replies[b"c"][1]["message"]
    assert len(broker.started) == 1
    assert registry.ledger.used_mb == 30


@pytest.mark.parametrize(
    ("reason", "status", "text"),
    [
        ("model load failed: ValueError: bad config", 500, "failed to load: model load failed: ValueError"),
        ("model load failed: MemoryError: CUDA out of memory", 507, "ran out of memory while loading"),
    ],
)
def test_a_failed_load_answers_why_and_leaves_nothing_behind(setup, reason, status, text):
    manager, broker, registry, root = setup
    command(manager, "l", op="load", name="m", url=folder(root, "m"))
    group = registry.get("m")
    group.failed_reason = reason  # what Broker._fail records before telling the manager
    manager.on_failed(group)
    manager.tick(time.monotonic())
    assert broker.replies[b"l"][0] == status
    assert text in broker.replies[b"l"][1]["message"]
    assert registry.names() == []
    tick_until(manager, lambda: not manager.stopping)
    assert registry.ledger.used_mb == 0
    assert all(slot.has_exited() for slot in broker.started)


def test_an_unload_is_answered_once_the_workers_have_exited(setup):
    manager, broker, registry, root = setup
    command(manager, "l", op="load", name="m", url=folder(root, "m"))
    group = registry.get("m")
    become_ready(manager, group)
    command(manager, "u", op="unload", name="m")
    assert broker.abandoned == ["m"]  # queued and in-flight requests are answered at once
    assert registry.names() == []  # and new ones get a 404
    assert b"u" not in broker.replies
    tick_until(manager, lambda: b"u" in broker.replies)
    assert broker.replies[b"u"] == (200, {"status": 'Model "m" unregistered.'})
    assert broker.started[0].has_exited()
    assert registry.ledger.used_mb == 0
    assert not Path(group.spec_path).exists()


def test_unloading_a_model_that_is_still_loading_answers_both_requests(setup):
    manager, broker, _, root = setup
    command(manager, "l", op="load", name="m", url=folder(root, "m"))
    command(manager, "u", op="unload", name="m")
    assert broker.replies[b"l"][0] == 409
    assert "unloaded before it finished loading" in broker.replies[b"l"][1]["message"]
    tick_until(manager, lambda: b"u" in broker.replies)
    assert broker.replies[b"u"][0] == 200


def test_unknown_models_and_commands(setup):
    manager, broker, _, _ = setup
    command(manager, "u", op="unload", name="nope")
    command(manager, "x", op="explode")
    assert broker.replies[b"u"][0] == 404
    assert broker.replies[b"x"] == (400, {"message": "Unknown management command 'explode'."})


def test_scaling_up_checks_memory_and_waits_for_the_new_workers(setup):
    manager, broker, registry, root = setup
    command(manager, "l", op="load", name="m", url=folder(root, "m"))
    group = registry.get("m")
    become_ready(manager, group)
    command(manager, "big", op="scale", name="m", min_worker=4)
    assert broker.replies[b"big"][0] == 507  # 4 × 30 MB > 100 MB
    command(manager, "s", op="scale", name="m", min_worker=3, max_worker=4)
    assert len(group.slots) == 3
    assert registry.ledger.used_mb == 90
    assert b"s" not in broker.replies
    become_ready(manager, group)
    assert broker.replies[b"s"] == (200, {"status": 'Model "m" scaled to 3 worker(s).'})
    assert group.describe()["workerGroups"][0]["maxWorkers"] == 4


def test_scaling_down_retires_idle_workers_first_and_then_frees_their_memory(setup):
    manager, broker, registry, root = setup
    command(manager, "l", op="load", name="m", url=folder(root, "m", "required_memory_mb=30\nminWorkers=3\n"))
    group = registry.get("m")
    become_ready(manager, group)
    busy = group.slots[2]
    busy.batch = {"request-1": None}
    command(manager, "s", op="scale", name="m", min_worker=1)
    assert broker.replies[b"s"][0] == 200
    assert busy in group.slots  # the busy replica keeps its request; the idle ones go
    assert len(group.slots) == 1
    tick_until(manager, lambda: not manager.stopping)
    assert registry.ledger.used_mb == 30
    assert not busy.has_exited()


def test_bad_worker_counts_are_400(setup):
    manager, broker, registry, root = setup
    command(manager, "l", op="load", name="m", url=folder(root, "m"))
    command(manager, "s", op="scale", name="m", min_worker=3, max_worker=2)
    assert broker.replies[b"s"][0] == 400
    assert "Fix: use 1 <= min_worker <= max_worker" in broker.replies[b"s"][1]["message"]


def test_models_are_listed_page_by_page(setup):
    manager, broker, _, root = setup
    for name in ("a", "b", "c"):
        command(manager, name, op="load", name=name, url=folder(root, name, ""))
    command(manager, "p1", op="list", limit=2, token=0)
    command(manager, "p2", op="list", limit=2, token=2)
    first, second = broker.replies[b"p1"][1], broker.replies[b"p2"][1]
    assert [m["modelName"] for m in first["models"]] == ["a", "b"]
    assert first["nextPageToken"] == "2"
    assert [m["modelName"] for m in second["models"]] == ["c"]
    assert "nextPageToken" not in second
    assert first["models"][0] == {"modelName": "a", "modelUrl": str(root / "a"), "status": "PENDING"}
