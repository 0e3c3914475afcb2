"""Stateful sessions for custom handlers, as DJL's `djl_python.session_manager` offers them.

A SageMaker stateful-session client sends the `X-Amzn-SageMaker-Session-Id` header with every request
of one conversation; the handler maps it to a `Session` (a folder of pickled values, or memory-mapped
arrays such as a cached KV state) that outlives the request. Sessions expire
`sessions_expiration` seconds after creation, so abandoned conversations do not fill the disk.
The folder defaults to `/dev/shm` (memory-backed) where it exists, as in DJL.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("djl_python.session_manager")

DEFAULT_EXPIRATION_S = 20 * 60
_SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_CREATED = ".creation_time"
_EXPIRES = ".expiration_time"


class Session:
    """One session's folder: values are pickled per key, arrays can be memory-mapped in place."""

    def __init__(self, session_id: str, session_root: str) -> None:
        self.session_id = session_id
        self.files_path = os.path.join(session_root, session_id)

    def put(self, key: str, value: Any) -> None:
        """Store `value` under `key`, replacing what was there."""
        with open(self._path(key), "wb") as f:
            pickle.dump(value, f)

    def get(self, key: str, d: Any = None) -> Any:
        """The value stored under `key`, or `d` when there is none."""
        path = self._path(key)
        if not os.path.isfile(path):
            return d
        with open(path, "rb") as f:
            return pickle.load(f)  # noqa: S301 - written by this server into its own 0700 folder

    def get_as_numpy(
        self, key: str, shape: tuple[int, ...], dtype: Any = None, create: bool = False
    ) -> np.memmap:
        """A read-write memory map of `key` (float32 unless `dtype`); `create=True` starts it zeroed."""
        import numpy as np

        mode = "w+" if create or not os.path.isfile(self._path(key)) else "r+"
        return np.memmap(self._path(key), dtype=dtype or np.float32, mode=mode, shape=shape)

    def remove(self) -> bool:
        """Delete the session's files; False when it did not exist."""
        if not os.path.exists(self.files_path):
            log.warning("session not found: %s", self.session_id)
            return False
        log.info("closing session: %s", self.session_id)
        shutil.rmtree(self.files_path)
        return True

    def _path(self, key: str) -> str:
        return os.path.join(self.files_path, key.replace("/", "-"))


def default_sessions_path() -> str:
    """`/dev/shm/djl_sessions` where shared memory exists (fast, RAM-backed), else the temp folder."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(root, "djl_sessions")


class SessionManager:
    """Creates, finds and closes sessions under `sessions_path`; expired ones are swept on create.

    Properties (the handler's init properties, `option.` already stripped): `sessions_expiration`
    (seconds, default 1200) and `sessions_path`. `clock` exists so expiry can be tested without waiting.
    """

    def __init__(self, properties: dict[str, str], clock: Callable[[], float] = time.time) -> None:
        self.expiration = int(properties.get("sessions_expiration", DEFAULT_EXPIRATION_S))
        self.sessions_path = properties.get("sessions_path") or default_sessions_path()
        self.clock = clock
        os.makedirs(self.sessions_path, mode=0o700, exist_ok=True)

    def create_session(self) -> Session:
        """A new, empty session with a fresh UUID id."""
        self._clean_expired_sessions()
        session = Session(str(uuid.uuid4()), self.sessions_path)
        os.makedirs(session.files_path)
        now = self.clock()
        session.put(_CREATED, now)
        session.put(_EXPIRES, now + self.expiration)
        return session

    def get_session(self, session_id: str | None) -> Session | None:
        """The live session `session_id`, or None if it never existed, was closed or has expired.

        Raises ValueError for an id that is not a UUID, so a header cannot name a path outside the folder.
        """
        session = Session(_valid_id(session_id), self.sessions_path)
        if not os.path.isdir(session.files_path):
            return None
        if self._expired(session):
            session.remove()
            return None
        return session

    def close_session(self, session_id: str | None) -> bool:
        """Delete the session; False when it did not exist."""
        return Session(_valid_id(session_id), self.sessions_path).remove()

    def _expired(self, session: Session) -> bool:
        expires = session.get(_EXPIRES)
        return expires is None or self.clock() >= expires

    def _clean_expired_sessions(self) -> None:
        for name in os.listdir(self.sessions_path):
            if _SESSION_ID.fullmatch(name):
                session = Session(name, self.sessions_path)
                if self._expired(session):
                    session.remove()


def _valid_id(session_id: str | None) -> str:
    if not session_id or not _SESSION_ID.fullmatch(session_id):
        raise ValueError(
            f"invalid session_id: {session_id!r}; expected a UUID such as create_session() returns"
        )
    return session_id
