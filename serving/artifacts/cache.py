"""The download cache: one folder per source, created complete by rename, described by a manifest.

A folder is trusted only if its manifest names the same source and every listed file is present with
its recorded size (a stat per file: cheap enough for every start). Anything else (a folder without a
manifest, a truncated file, a leftover staging folder of a killed download) is never served from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("serving.artifacts")

MANIFEST = ".lmi-manifest.json"
DOWNLOAD_DIR_ENV = "SERVING_DOWNLOAD_DIR"


def download_root(configured: str | None = None) -> Path:
    """`download_dir` (SERVING_DOWNLOAD_DIR), else <user cache dir>/lmi-serving/download."""
    if configured:
        return Path(configured)
    import platformdirs

    return Path(platformdirs.user_cache_dir("lmi-serving")) / "download"


def cache_folder(root: Path, source: str) -> Path:
    """<root>/<sha1 of the source URL>, as DJL keys its S3 downloads."""
    return root / hashlib.sha1(source.encode()).hexdigest()


@dataclass
class FileRecord:
    size: int
    etag: str | None = None


@dataclass
class Manifest:
    """What a completed folder holds and where it came from."""

    source: str
    revision: str | None = None
    files: dict[str, FileRecord] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def write(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(json.dumps(asdict(self), indent=1, sort_keys=True))

    @classmethod
    def read(cls, folder: Path) -> Manifest | None:
        try:
            raw = json.loads((folder / MANIFEST).read_text())
            files = {name: FileRecord(**record) for name, record in raw["files"].items()}
            return cls(raw["source"], raw.get("revision"), files, raw.get("created", 0.0))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def total_bytes(self) -> int:
        return sum(record.size for record in self.files.values())


def problem(folder: Path, source: str) -> str | None:
    """Why `folder` cannot be trusted as a complete copy of `source`; None when it can."""
    if not folder.is_dir():
        return "not downloaded yet"
    manifest = Manifest.read(folder)
    if manifest is None:
        return f"{folder} has no readable {MANIFEST} (an interrupted or foreign download)"
    if manifest.source != source:
        return f"{folder} holds {manifest.source}, not {source}"
    for name, record in manifest.files.items():
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing from {folder}"
        if size != record.size:
            return f"{name} in {folder} is {size} bytes, expected {record.size}"
    return None


@contextmanager
def locked(target: Path, timeout_s: float) -> Iterator[None]:
    """Exclusive use of `target` across processes; released by the OS if the holder dies."""
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        from serving.artifacts.errors import DownloadTimeout

        raise DownloadTimeout(
            f"Waited {timeout_s:g} s for another process downloading into {target}. If none is "
            f"running, delete {target}.lock."
        ) from None
    try:
        yield
    finally:
        lock.release()


def _clear_stale(target: Path) -> None:
    """Staging folders of downloads that died (we hold the lock, so nobody else is writing)."""
    for stale in target.parent.glob(f".{target.name}.staging-*"):
        log.info("Removing %s, left by an interrupted download", stale)
        shutil.rmtree(stale, ignore_errors=True)


def materialize(
    target: Path, source: str, produce: Callable[[Path], Manifest], lock_timeout_s: float
) -> Path:
    """`target` holding `source`: reused when trusted, else produced into staging and renamed in."""
    if problem(target, source) is None:
        return target
    with locked(target, lock_timeout_s):
        reason = problem(target, source)
        if reason is None:  # another process finished it while we waited
            return target
        if target.exists():
            log.warning("Not using %s: %s; fetching %s again", target, reason, source)
        _clear_stale(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
        try:
            manifest = produce(staging)
            manifest.write(staging)
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target
