"""Where a model runs, resolved in the model worker: `option.device=auto`, native bf16, torch threads.

Each choice is logged with its reason. The CPU check reads /proc/cpuinfo text, which tests can feed.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from engines.base import EngineLoadError

log = logging.getLogger("engines.device")

CPUINFO = Path("/proc/cpuinfo")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""x86 flags of CPUs whose matrix units compute bf16 natively (oneDNN uses them from torch)."""


def upload(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (on the host) on ``device`` without waiting for the device: a blocking host->GPU copy
    synchronises the stream, which would stall the host behind the step still running (overlap)."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags named on the ``flags`` lines of /proc/cpuinfo text."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == "flags":
            flags.update(value.split())
    return flags


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 flags of this CPU (of `cpuinfo` text when given); empty without /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
    return sorted(cpu_flags(cpuinfo).intersection(BF16_CPU_FLAGS))


def has_native_bf16(device: str, cpuinfo: str | None = None) -> bool:
    """Whether `device` (resolved: cpu, cuda, cuda:N) computes bf16 at full speed."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_bf16_flags(cpuinfo))


def resolve_device(name: str) -> str:
    """`auto` → cuda when torch sees a GPU, else cpu; `cuda`/`cuda:N` must exist. Logs the choice."""
    name = name.strip().lower()
    available = torch.cuda.is_available()
    if name == "auto":
        device = "cuda" if available else "cpu"
        reason = "CUDA is available" if available else "no CUDA device is visible to torch"
        log.info("Device: %s (option.device=auto; %s)", device, reason)
        return device
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match and not available:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise EngineLoadError(
            f"option.device={name} but torch ({torch.__version__}, {build}) sees no CUDA device. "
            "Fix: set option.device=cpu (or auto), or run on a GPU machine with a CUDA build of torch."
        )
    if match and int(match[1] or 0) >= torch.cuda.device_count():
        raise EngineLoadError(
            f"option.device={name} but only {torch.cuda.device_count()} CUDA device(s) are visible. "
            "Fix: pick an index below that, or check CUDA_VISIBLE_DEVICES."
        )
    if not match and name != "cpu":
        raise EngineLoadError(f"option.device={name!r} is not one of auto, cpu, cuda, cuda:N.")
    log.info("Device: %s (option.device=%s)", name, name)
    return name


def configure_threads(num_threads: int | None, workers: int = 1) -> int:
    """Size torch's intra-op pool: option.num_threads, else OMP_NUM_THREADS, else torch's default (the
    physical cores) divided between the ``workers`` model processes on this machine, since two
    workers each running a thread per core make every OpenMP barrier wait on a descheduled thread.
    Logs and returns the count."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)
        source = "option.num_threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        source = "OMP_NUM_THREADS"
    elif workers > 1:
        cores = torch.get_num_threads()
        torch.set_num_threads(max(1, cores // workers))
        source = f"{cores} physical cores shared by {workers} model workers"
    else:
        source = "torch's default: the physical cores"
    count = torch.get_num_threads()
    log.info("Torch threads: %d (%s)", count, source)
    return count


def release_freed_memory() -> int | None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim); returns 1 if any were.

    Loading, converting and quantizing a model frees hundreds of MB of temporaries that glibc keeps
    mapped: the default model quantized to int4 left 450-850 MiB resident where 400-420 MiB stay in
    use (which of the two varied run to run). None where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return int(trim(0))
