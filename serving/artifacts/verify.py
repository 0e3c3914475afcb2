"""Check downloaded files against the listing: size always, MD5 where the ETag is one, and the
safetensors header (a truncated or garbled file fails here, naming the file, not later in the loader)."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

from serving.artifacts.cache import FileRecord, size_of
from serving.artifacts.errors import IntegrityError

PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")
"""A single-part upload's ETag is usually the MD5 of its bytes; multipart ETags ("...-N") are not."""
MAX_HEADER_BYTES = 100 * 1024 * 1024


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_safetensors(path: Path) -> str | None:
    """Why `path` is not a well-formed safetensors file (header length, JSON, data extent); None if it is."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return "shorter than a safetensors header"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            return f"its header claims {header_len} bytes but the file has {size}"
        try:
            header = json.loads(fh.read(header_len))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not a valid safetensors header"
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        return f"its tensors end at byte {expected} but the file has {size} bytes"
    return None


def file_problem(
    folder: Path, name: str, record: FileRecord, source: str, etag_is_md5: Callable[[str], bool]
) -> IntegrityError | None:
    """What is wrong with one downloaded file, or None. `etag_is_md5(name)` is asked only when the MD5
    differs from an MD5-shaped ETag (KMS- or SSE-C-encrypted objects have ETags that are not MD5s)."""
    path = folder / name
    size = size_of(path)
    if size is None:
        return IntegrityError(
            f"{name} from {source} was not downloaded. Retry; if it persists, check that "
            "the object is readable.",
            name,
        )
    if size != record.size:
        return IntegrityError(
            f"{name} from {source} is {size} bytes, but the listing says {record.size}. "
            "The transfer was cut short or the object changed during the download.",
            name,
        )
    if record.etag and PLAIN_MD5.match(record.etag) and _md5(path) != record.etag and etag_is_md5(name):
        return IntegrityError(
            f"{name} from {source} is corrupt: its MD5 does not match the ETag "
            f"{record.etag}. Retry; if it persists, re-upload the file.",
            name,
        )
    if name.endswith(".safetensors"):
        reason = check_safetensors(path)
        if reason:
            return IntegrityError(f"{name} from {source} is not a valid safetensors file: {reason}.", name)
    return None


def verify_files(
    folder: Path,
    expected: dict[str, FileRecord],
    source: str,
    etag_is_md5: Callable[[str], bool] = lambda name: True,
) -> list[IntegrityError]:
    """Every problem among `expected`, so one retry can fetch all the bad files at once."""
    problems = (file_problem(folder, n, r, source, etag_is_md5) for n, r in sorted(expected.items()))
    return [p for p in problems if p is not None]
