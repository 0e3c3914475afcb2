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

from serving.artifacts.errors import ArtifactError, DownloadTimeout

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


def size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


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
        size = size_of(folder / name)
        if size is None:
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


def _check_replaceable(target: Path, source: str, owned: bool) -> None:
    """A folder we may overwrite: ours (the cache), empty, or an earlier download of the same source."""
    if owned or not target.exists():
        return
    if not target.is_dir():
        raise ArtifactError(f"{target} exists and is not a folder. Choose another destination.")
    manifest = Manifest.read(target)
    if manifest is None and any(target.iterdir()):
        raise ArtifactError(
            f"{target} already holds files that are not a download of {source}; nothing was changed. "
            "Choose an empty or new folder."
        )
    if manifest is not None and manifest.source != source:
        raise ArtifactError(
            f"{target} holds a download of {manifest.source}, not {source}. Choose another folder."
        )


def _install(staging: Path, target: Path, source: str, owned: bool) -> None:
    """Move the finished staging folder (manifest included) to `target`.

    A user's folder (not `owned`) keeps the files the old manifest does not list. While files move
    in, it carries a manifest of the same source naming a file that never exists: an interruption
    leaves a folder no start trusts but the next pull may replace."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; other users must read the weights
    if not target.exists():
        os.rename(staging, target)
        return
    if owned:
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.rename(staging, target)
        return
    try:
        old = Manifest.read(target)
        Manifest(source, files={".lmi-incomplete": FileRecord(-1)}).write(target)
        for name in old.files if old else ():
            (target / name).unlink(missing_ok=True)
        for path in sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST):
            destination = target / path.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, destination)
        os.replace(staging / MANIFEST, target / MANIFEST)  # last: the folder is trusted from here
    except OSError as exc:
        raise ArtifactError(f"Could not move the download into {target}: {exc}") from exc
    shutil.rmtree(staging, ignore_errors=True)


def materialize(
    target: Path, source: str, produce: Callable[[Path], Manifest], deadline: float, owned: bool = True
) -> Path:
    """`target` holding `source`: reused when trusted, else produced into staging and moved in.

    `owned` folders (the cache) may be replaced wholesale; any other folder (lmi pull --dest) must be
    empty, new, or an earlier download of the same source. `deadline` (monotonic) bounds the wait for
    another process's download as well as our own."""
    if problem(target, source) is None:
        return target
    with locked(target, max(deadline - time.monotonic(), 0.1)):
        reason = problem(target, source)
        if reason is None:  # another process finished it while we waited
            return target
        _check_replaceable(target, source, owned)
        if target.exists() and Manifest.read(target) is not None:
            log.warning("Not using %s: %s; fetching %s again", target, reason, source)
        _clear_stale(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
        try:
            manifest = produce(staging)
            manifest.write(staging)
            _install(staging, target, source, owned)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target
