"""Compile a kernel from csrc/ once per (source, flags, compiler, CPU, torch, python); load it after.

The first start on a machine pays the compile (about 20 s per kernel on 2 cores); later starts load
the cached library in well under a second. The key includes the CPU's feature flags because of
-march=native: a cache shared between machines never hands one CPU another's instructions. An OS
file lock serialises builds across worker processes and is released if a builder dies, unlike
torch's own lock file, which a killed build leaves behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
import time
from functools import cache
from pathlib import Path
from types import ModuleType

log = logging.getLogger("engines.kernels")

SOURCE_DIR = Path(__file__).parent / "csrc"
CFLAGS = ("-O3", "-march=native", "-fopenmp")
"""-fopenmp matters: at::parallel_for is a header template whose `omp parallel` is silently serial
without it. The library links the libgomp torch already loaded (same soname), so one thread pool."""
LDFLAGS = ("-fopenmp",)
EXTRA_CFLAGS = {
    "paged_attention": ("-ffast-math",),
    "fused_ops": ("-ffp-contract=off",),
}
"""Per kernel: attention may reassociate sums and needs -ffast-math for glibc's vectorised expf (with
-fno-finite-math-only the exp goes scalar and a layer takes twice as long), so NaN inputs give
unspecified rather than NaN outputs there; the element-wise ops must round exactly like torch, so no
fused multiply-adds there."""
BUILD_TIMEOUT_S = 180.0
"""Longest wait for another process's build of the same kernel: under the default 240 s
model_loading_timeout, so a worker stuck behind a hung build still falls back to the torch ops."""


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


CPU_FIELDS = ("flags", "Features", "model name", "CPU implementer", "CPU part")
"""/proc/cpuinfo fields that tell CPUs apart (x86: flags, model name; ARM: Features, implementer, part)."""


def _cpu_flags() -> str:
    seen: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                field = line.split(":", 1)[0].strip()
                if field in CPU_FIELDS:
                    seen.setdefault(field, line)
    except OSError:
        pass
    return "".join(seen.values()) or platform.processor()


def _compiler_version() -> str:
    compiler = os.environ.get("CXX", "c++")
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return compiler  # the build will fail and say why
    return compiler + result.stdout


def _build_key(source: Path, name: str) -> str:
    import torch

    digest = hashlib.sha256(source.read_bytes())
    for part in (" ".join(_cflags(name) + LDFLAGS), torch.__version__, str(sys.version_info[:2]),
                 platform.machine(), _cpu_flags(), _compiler_version()):  # fmt: skip
        digest.update(part.encode())
    return digest.hexdigest()[:16]


@cache
def load_kernel(name: str) -> ModuleType:
    """The compiled extension for csrc/<name>.cpp: prebuilt (``LMI_KERNEL_PREBUILT``) when one fits
    this CPU and torch, else built here; raises KernelBuildError when it cannot be built (no compiler,
    a compile error, an unwritable cache folder, a build that never finishes)."""
    from engines.kernels.prebuilt import load_prebuilt

    prebuilt = load_prebuilt(name)  # an image's kernels, compiled when it was built
    if prebuilt is not None:
        return prebuilt
    started = time.perf_counter()
    try:
        module, build_dir = _build(name)
    except KernelBuildError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means: use the torch ops instead
        raise KernelBuildError(f"Could not build the native kernel {name!r}: {exc}") from exc
    log.info("Native kernel %s ready in %.1f s (%s)", name, time.perf_counter() - started, build_dir)
    return module


def _build(name: str) -> tuple[ModuleType, Path]:
    from filelock import FileLock, Timeout
    from torch.utils import cpp_extension

    source = SOURCE_DIR / f"{name}.cpp"
    build_dir = cache_root() / f"{name}-{_build_key(source, name)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(build_dir) + ".lock", timeout=BUILD_TIMEOUT_S):
            (build_dir / "lock").unlink(missing_ok=True)  # torch's baton, stale if a builder was killed
            module = cpp_extension.load(
                name=f"lmi_{name}",
                sources=[str(source)],
                extra_cflags=list(_cflags(name)),
                extra_ldflags=list(LDFLAGS),
                build_directory=str(build_dir),
                verbose=False,
            )
    except Timeout:
        raise KernelBuildError(
            f"Waited {BUILD_TIMEOUT_S:g} s for another process building {name!r} in {build_dir}"
        ) from None
    return module, build_dir
