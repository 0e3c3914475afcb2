"""djl_python.session_manager / session_utils: sessions keyed by X-Amzn-SageMaker-Session-Id, with expiry."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from djl_python import Input, Session, SessionManager
from djl_python.session_manager import default_sessions_path
from djl_python.session_utils import HEADER_SAGEMAKER_SESSION_ID, get_session


class Clock:
    """A hand-driven clock, so expiry is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def manager(tmp_path: Path, clock: Clock | None = None, expiration: int = 60) -> SessionManager:
    properties = {"sessions_path": str(tmp_path / "sessions"), "sessions_expiration": str(expiration)}
    return SessionManager(properties, clock=clock or Clock())


def test_create_session_gives_a_uuid_folder_that_stores_values(tmp_path):
    sessions = manager(tmp_path)
    session = sessions.create_session()
    assert isinstance(session, Session)
    assert str(uuid.UUID(session.session_id)) == session.session_id
    assert os.path.isdir(session.files_path)
    session.put("history", ["hello", {"turn": 1}])
    session.put("a/b", 5)  # a slash cannot escape the session folder
    assert session.get("history") == ["hello", {"turn": 1}]
    assert session.get("a/b") == 5
    assert session.get("missing", "default") == "default"


def test_a_session_is_found_again_by_id_even_from_another_manager(tmp_path):
    session = manager(tmp_path).create_session()
    session.put("count", 3)
    found = manager(tmp_path).get_session(session.session_id)
    assert found is not None
    assert found.get("count") == 3


def test_close_session_removes_it(tmp_path):
    sessions = manager(tmp_path)
    session = sessions.create_session()
    assert sessions.close_session(session.session_id) is True
    assert not os.path.exists(session.files_path)
    assert sessions.get_session(session.session_id) is None
    assert sessions.close_session(session.session_id) is False


@pytest.mark.parametrize("bad", ["", None, "../etc", "not-a-uuid", str(uuid.uuid4()) + "/x"])
def test_ids_that_are_not_uuids_are_rejected(tmp_path, bad):
    sessions = manager(tmp_path)
    with pytest.raises(ValueError, match="invalid session_id"):
        sessions.get_session(bad)
    with pytest.raises(ValueError, match="invalid session_id"):
        sessions.close_session(bad)


def test_sessions_expire_after_sessions_expiration_seconds(tmp_path):
    clock = Clock()
    sessions = manager(tmp_path, clock, expiration=10)
    session = sessions.create_session()
    clock.now += 9.5
    assert sessions.get_session(session.session_id) is not None
    clock.now += 0.5
    assert sessions.get_session(session.session_id) is None
    assert not os.path.exists(session.files_path)


def test_creating_a_session_sweeps_expired_ones(tmp_path):
    clock = Clock()
    sessions = manager(tmp_path, clock, expiration=10)
    old = sessions.create_session()
    clock.now += 5
    young = sessions.create_session()
    clock.now += 6  # old is 11 s old, young 6 s
    sessions.create_session()
    assert not os.path.exists(old.files_path)
    assert os.path.exists(young.files_path)


def test_default_expiration_is_twenty_minutes(tmp_path):
    assert SessionManager({"sessions_path": str(tmp_path)}).expiration == 1200


def test_default_path_prefers_shared_memory():
    expected_root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = default_sessions_path()
    assert path.endswith("djl_sessions")
    if expected_root:
        assert path == "/dev/shm/djl_sessions"


def test_get_as_numpy_is_a_persistent_memory_map(tmp_path):
    sessions = manager(tmp_path)
    session = sessions.create_session()
    cache = session.get_as_numpy("kv", (2, 3), create=True)
    assert cache.dtype == np.float32
    assert cache.tolist() == [[0.0] * 3] * 2
    cache[1, 2] = 7.5
    cache.flush()
    again = sessions.get_session(session.session_id).get_as_numpy("kv", (2, 3))
    assert again[1, 2] == 7.5


def request(headers: dict[str, str]) -> Input:
    item = Input()
    item.properties.update(headers)
    item.content.add("data", b"{}")
    return item


def test_get_session_follows_the_sagemaker_header_in_any_case(tmp_path):
    sessions = manager(tmp_path)
    session = sessions.create_session()
    found = get_session(sessions, request({HEADER_SAGEMAKER_SESSION_ID.lower(): session.session_id}))
    assert found is not None
    assert found.session_id == session.session_id
    assert get_session(sessions, request({})) is None


def test_a_session_header_without_a_session_manager_is_an_error():
    assert get_session(None, request({})) is None
    with pytest.raises(RuntimeError, match="stateful sessions are not enabled"):
        get_session(None, request({HEADER_SAGEMAKER_SESSION_ID: str(uuid.uuid4())}))
