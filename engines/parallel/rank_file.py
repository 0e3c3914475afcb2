"""A rank file's bytes: read ahead into the page cache, viewed in place through a mapping, and written
in the order a rank loads them (engines.parallel.partition decides what goes in it)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import threading
from pathlib import Path
from typing import Any

from engines.base import EngineLoadError

log = logging.getLogger("engines.parallel")

SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
"""The safetensors names of the dtypes a partition stores unquantized weights in -> torch's."""
READ_AHEAD_CHUNK = 128 << 10
"""Bytes per read-ahead advice: Linux's default read-ahead window, under any device's limit on one
advice (the larger of that window and its largest request); advising a resident GiB takes 20 ms."""


def read_ahead(fd: int, size: int) -> None:
    """Have the kernel read the file into the page cache from its start while this rank works, from a
    thread that then closes ``fd``: one WILLNEED advice reads at most the device's read-ahead window
    (128 KiB to a few MiB), so it is given chunk by chunk."""

    def advise() -> None:
        try:
            for offset in range(0, size, READ_AHEAD_CHUNK):
                os.posix_fadvise(fd, offset, READ_AHEAD_CHUNK, os.POSIX_FADV_WILLNEED)
        except OSError as exc:  # advice only: the load reads what it needs anyway
            log.debug("Read-ahead of a rank file stopped: %s", exc)
        finally:
            os.close(fd)

    if hasattr(os, "posix_fadvise"):
        threading.Thread(target=advise, name="partition-read-ahead", daemon=True).start()
    else:
        os.close(fd)


MADV_POPULATE_READ = 22
"""Linux 5.14+: fault a mapping's pages in, reading what the page cache lacks (Python 3.11 lacks the name)."""


def populate(mapped: mmap.mmap, start: int, end: int) -> None:
    """Make bytes [start, end) of a mapping resident and mapped now, so the first requests do not fault
    them in (from the disk when cold): one madvise, else a read of one byte per page."""
    page = mmap.PAGESIZE
    start = start // page * page
    try:
        mapped.madvise(MADV_POPULATE_READ, start, end - start)
        return
    except (OSError, ValueError):
        pass
    for offset in range(start, end, page):
        mapped[offset]


def read_header(mapped: mmap.mmap, path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """A safetensors file's tensors: name -> (dtype, shape, first byte, end byte) in the file."""
    try:
        size = int.from_bytes(mapped[:8], "little")
        header = json.loads(mapped[8 : 8 + size])
        header.pop("__metadata__", None)
        tensors = {}
        for name, info in header.items():
            start, stop = (8 + size + offset for offset in info["data_offsets"])
            tensors[name] = (info["dtype"], info["shape"], start, stop)
    except (ValueError, TypeError, KeyError) as exc:
        raise EngineLoadError(f"{path} has no valid safetensors header: {exc}") from exc
    for name, (_, _, _, stop) in tensors.items():
        if stop > len(mapped):
            raise EngineLoadError(f"{path}: {name} ends beyond the end of the file")
    return tensors


def view_tensor(mapped: mmap.mmap, dtype: str, shape: list[int], start: int, stop: int, where: str) -> Any:
    """The stored tensor as a view of the mapped file (no copy)."""
    import torch

    if dtype not in SAFETENSORS_DTYPES:
        raise EngineLoadError(
            f"{where} is {dtype}; a partition's weights are {', '.join(SAFETENSORS_DTYPES)}"
        )
    torch_dtype = getattr(torch, SAFETENSORS_DTYPES[dtype])
    count = math.prod(shape)
    if count * torch_dtype.itemsize != stop - start:
        raise EngineLoadError(f"{where} has shape {shape} but spans {stop - start} bytes")
    if count == 0:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(mapped, dtype=torch_dtype, count=count, offset=start).view(shape)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def save_in_order(tensors: dict[str, Any], path: Path) -> None:
    """A safetensors file with ``tensors`` laid out in their dict order (safetensors' own writer sorts
    them by name: layers 0, 1, 10, 11, ...), so reading it ahead from its start brings each tensor about
    when the load needs it. All of one dtype: each lies aligned to its element size."""
    import torch

    names = {getattr(torch, name): key for key, name in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with path.open("wb") as file:
        file.write(len(encoded).to_bytes(8, "little") + encoded)
        for tensor in tensors.values():
            file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy())
