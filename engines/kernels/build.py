"""Compile a kernel from csrc/ once per (source, flags, torch, python) and load it from the cache after.

The first start on a machine pays the compile (about 20 s for one kernel on 2 cores); later starts load
the cached library in well under a second. An OS file lock serialises builds across worker processes
and is released if a builder dies, unlike torch's own lock file, which a killed build leaves behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from functools import cache
from pathlib import Path
from types import ModuleType

log = logging.getLogger("engines.kernels")

SOURCE_DIR = Path(__file__).parent / "csrc"
CFLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp")
"""-fopenmp matters: at::parallel_for is a header template whose `omp parallel` is silently serial
without it. The library links the libgomp torch already loaded (same soname), so one thread pool."""
LDFLAGS = ("-fopenmp",)
EXTRA_CFLAGS = {"decode_attention": ("-ffast-math",)}
"""Per kernel: attention may reassociate sums; the element-wise ops must round exactly like torch."""


def _cflags(name: str) -> tuple[str, ...]:
    return CFLAGS + EXTRA_CFLAGS.get(name, ())


CACHE_ENV = "LMI_KERNEL_CACHE"
"""Folder for compiled kernels; default: <user cache dir>/lmi-serving/kernels."""


class KernelBuildError(RuntimeError):
    """A kernel could not be compiled or loaded; the message carries the compiler's reason."""


def cache_root() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    import platformdirs

    return Path(platformdirs.user_cache_dir("lmi-serving")) / "kernels"


def _build_key(source: Path, name: str) -> str:
    import torch

    digest = hashlib.sha256(source.read_bytes())
    digest.update(" ".join(_cflags(name) + LDFLAGS).encode())
    digest.update(f"{torch.__version__}:{sys.version_info[:2]}".encode())
    return digest.hexdigest()[:16]


@cache
def load_kernel(name: str) -> ModuleType:
    """The compiled extension for csrc/<name>.cpp; raises KernelBuildError when it cannot be built."""
    from filelock import FileLock
    from torch.utils import cpp_extension

    source = SOURCE_DIR / f"{name}.cpp"
    build_dir = cache_root() / f"{name}-{_build_key(source, name)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with FileLock(str(build_dir) + ".lock"):
        (build_dir / "lock").unlink(missing_ok=True)  # torch's baton, stale if a builder was killed
        try:
            module = cpp_extension.load(
                name=f"lmi_{name}",
                sources=[str(source)],
                extra_cflags=list(_cflags(name)),
                extra_ldflags=list(LDFLAGS),
                build_directory=str(build_dir),
                verbose=False,
            )
        except Exception as exc:  # compiler missing, ninja missing, compile error
            raise KernelBuildError(f"Could not build the native kernel {name!r}: {exc}") from exc
    log.info("Native kernel %s ready in %.1f s (%s)", name, time.perf_counter() - started, build_dir)
    return module
