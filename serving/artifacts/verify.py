"""Check downloaded files against the listing: size always, MD5 where the ETag is one, and the
safetensors header (a truncated or garbled file fails here, naming the file, not later in the loader)."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

from serving.artifacts.cache import FileRecord
from serving.artifacts.errors import IntegrityError

PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")
"""A single-part upload's ETag is the MD5 of its bytes; multipart ETags ("...-N") are not."""


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
        if header_len > size - 8:
            return f"its header claims {header_len} bytes but the file has {size}"
        try:
            header = json.loads(fh.read(header_len))
        except ValueError:
            return "its header is not valid JSON"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        return f"its tensors end at byte {expected} but the file has {size} bytes"
    return None


def verify_files(folder: Path, expected: dict[str, FileRecord], source: str) -> None:
    """Raise IntegrityError naming the first file that is missing, short, long or corrupt."""
    for name, record in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            raise IntegrityError(
                f"{name} from {source} was not downloaded. Retry; if it persists, check "
                "that the object is readable."
            )
        size = path.stat().st_size
        if size != record.size:
            raise IntegrityError(
                f"{name} from {source} is {size} bytes, but the listing says {record.size}. "
                "The transfer was cut short or the object changed during the download; retry.",
                name,
            )
        if record.etag and PLAIN_MD5.match(record.etag) and _md5(path) != record.etag:
            raise IntegrityError(
                f"{name} from {source} is corrupt: its MD5 does not match the ETag "
                f"{record.etag}. Retry; if it persists, re-upload the file.",
                name,
            )
        if name.endswith(".safetensors"):
            reason = check_safetensors(path)
            if reason:
                raise IntegrityError(f"{name} from {source} is not a valid safetensors file: {reason}.", name)
