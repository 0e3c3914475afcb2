"""Model archives (SageMaker's model.tar.gz): extracted once into the cache, refusing unsafe entries.

Extraction uses tarfile's `data` filter, which rejects `..` components, links that point outside the
folder and device files, and strips setuid bits; absolute names, which it would make relative, are
refused outright. The whole archive is checked before
anything is renamed into place, so a rejected archive leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import tarfile
import time
from pathlib import Path

from serving.artifacts.cache import FileRecord, Manifest, materialize
from serving.artifacts.errors import ArtifactError, UnsafeArchive
from serving.artifacts.fetch import FetchOptions, target_folder

log = logging.getLogger("serving.artifacts")


def _strict_data_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """The `data` filter, except that absolute names are refused rather than made relative."""
    if member.name.startswith(("/", os.sep)):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def extract_archive(archive: Path, dest: Path) -> dict[str, FileRecord]:
    """Extract `archive` into the existing folder `dest`; returns the files it wrote, with sizes."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter=_strict_data_filter)
    except tarfile.FilterError as exc:
        raise UnsafeArchive(
            f"{archive} has an unsafe entry ({exc}); nothing was extracted. Rebuild the archive with "
            "relative paths only (e.g. `tar -czf model.tar.gz -C model_dir .`)."
        ) from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArtifactError(f"{archive} is not a readable tar archive: {exc}") from None
    files: dict[str, FileRecord] = {}
    for root, _, names in os.walk(dest):
        for name in names:
            path = Path(root) / name
            files[str(path.relative_to(dest))] = FileRecord(path.stat().st_size)
    return files


def single_top_folder(folder: Path) -> Path:
    """An archive made with `tar -czf m.tar.gz model/` wraps everything in one folder: use that."""
    entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not (folder / "config.json").exists():
        return entries[0]
    return folder


def fetch_archive(source: str, options: FetchOptions) -> Path:
    archive = Path(source).absolute()
    stat = archive.stat()
    key = f"{archive}@{stat.st_size}:{stat.st_mtime_ns}"  # a replaced archive gets a fresh folder

    def produce(staging: Path) -> Manifest:
        log.info("Extracting %s (%.1f MB) into %s", archive, stat.st_size / 1e6, staging)
        return Manifest(source=key, files=extract_archive(archive, staging))

    deadline = time.monotonic() + options.timeout_s
    folder = materialize(target_folder(key, options), key, produce, deadline, owned=options.dest is None)
    return single_top_folder(folder)
