"""Kernels compiled ahead of time for portable x86-64 levels, loaded at start-up without a compiler.

The JIT build (build.py) targets ``-march=native`` and keys its cache by the CPU's flags, so a cache
made where an image is built would miss on every other CPU and need the compiler at run time. An
image instead compiles each kernel once per ISA level below (``python -m engines.kernels.prebuilt
--out DIR``); at start-up, with ``LMI_KERNEL_PREBUILT=DIR``, the best level this CPU supports is
imported straight from its .so, and the JIT build stays the fallback (another torch, another source,
a CPU below every level).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from engines.kernels.build import EXTRA_CFLAGS, LDFLAGS, SOURCE_DIR

log = logging.getLogger("engines.kernels")

PREBUILT_ENV = "LMI_KERNEL_PREBUILT"
MANIFEST = "manifest.json"
KERNELS = ("paged_attention", "fused_ops", "quant_gemm", "dense_gemm")


@dataclass(frozen=True)
class Level:
    """One ISA level: its compiler flags and the /proc/cpuinfo flags a CPU needs to run it."""

    name: str
    cflags: tuple[str, ...]
    needs: frozenset[str]


LEVELS = (
    Level(
        "avx512-bf16",
        ("-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni"),
        frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_bf16", "avx512_vnni"}),
    ),
    Level("x86-64-v3", ("-march=x86-64-v3",), frozenset({"avx2", "fma", "bmi2", "f16c", "movbe"})),
)
"""Best first. The bf16 level runs the attention kernel's vdpbf16ps fast path and the quantized
matmul's vpdpbusd one (Sapphire Rapids, Zen 4 and later: all have VNNI); x86-64-v3 (AVX2) runs on
every x86 instance type SageMaker offers."""


def source_digest(name: str) -> str:
    return hashlib.sha256((SOURCE_DIR / f"{name}.cpp").read_bytes()).hexdigest()


def runtime_key() -> dict[str, str]:
    """What a prebuilt library must match besides its source: the torch and Python it was built for."""
    import torch

    return {
        "torch": torch.__version__,
        "python": "{}.{}".format(*sys.version_info[:2]),
        "machine": platform.machine(),
    }


def _compile(name: str, level: Level, out: Path) -> Path:
    """Build ``name`` for ``level`` through torch's extension builder, in a child process: loading an
    AVX-512 library on a build machine without AVX-512 may kill the loader, but the file is there."""
    flags = ["-O3", *level.cflags, "-fopenmp", *EXTRA_CFLAGS.get(name, ())]
    with tempfile.TemporaryDirectory(prefix=f"lmi-{name}-") as build_dir:
        script = (
            "import sys\nfrom torch.utils import cpp_extension\n"
            "cpp_extension.load(name=sys.argv[1], sources=[sys.argv[2]], extra_cflags=sys.argv[3].split(),"
            " extra_ldflags=sys.argv[4].split(), build_directory=sys.argv[5], verbose=False)\n"
        )
        args = [f"lmi_{name}", str(SOURCE_DIR / f"{name}.cpp"), " ".join(flags), " ".join(LDFLAGS), build_dir]
        result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
        built = Path(build_dir) / f"lmi_{name}.so"
        if not built.is_file():
            raise RuntimeError(f"building {name} for {level.name} failed:\n{result.stderr[-4000:]}")
        target = out / f"lmi_{name}-{level.name}.so"
        shutil.copyfile(built, target)
        return target


def prebuild(out: Path, names: tuple[str, ...] = KERNELS, levels: tuple[Level, ...] = LEVELS) -> dict:
    """Compile every kernel for every level into ``out`` and write the manifest that ``load_prebuilt``
    checks; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {**runtime_key(), "kernels": {}}
    jobs = [(name, level) for name in names for level in levels]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # one compiler process per core
        built = list(pool.map(lambda job: _compile(*job, out).name, jobs))
    for (name, level), file in zip(jobs, built, strict=True):
        entry = manifest["kernels"].setdefault(name, {"source_sha256": source_digest(name), "levels": {}})
        entry["levels"][level.name] = file
    for name, entry in manifest["kernels"].items():
        log.info("Prebuilt %s for %s", name, ", ".join(entry["levels"]))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def best_level(cpu: set[str], available: list[str]) -> str | None:
    """The first of LEVELS that was built and that this CPU can run."""
    return next((lv.name for lv in LEVELS if lv.name in available and lv.needs <= cpu), None)


def load_prebuilt(name: str, root: str | None = None, cpu: set[str] | None = None) -> ModuleType | None:
    """``name``'s prebuilt module for this CPU, or None (with the reason logged) when none applies."""
    root = root or os.environ.get(PREBUILT_ENV)
    if not root:
        return None
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        log.warning(
            "%s=%s has no readable %s (%s); compiling kernels instead", PREBUILT_ENV, root, MANIFEST, exc
        )
        return None
    entry = manifest.get("kernels", {}).get(name)
    wanted = runtime_key()
    stale = [key for key, value in wanted.items() if manifest.get(key) != value]
    if entry is None or stale or entry.get("source_sha256") != source_digest(name):
        why = f"built for another {', '.join(stale)}" if stale else "missing or built from another source"
        log.warning("Prebuilt kernel %s in %s is %s; compiling it instead", name, root, why)
        return None
    if cpu is None:
        from engines.device import CPUINFO, cpu_flags

        cpu = cpu_flags(CPUINFO.read_text(encoding="utf-8", errors="replace")) if CPUINFO.exists() else set()
    level = best_level(cpu, list(entry["levels"]))
    if level is None:
        log.warning("No prebuilt level of %s runs on this CPU; compiling it instead", name)
        return None
    spec = importlib.util.spec_from_file_location(f"lmi_{name}", Path(root) / entry["levels"][level])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    log.info("Kernel %s: prebuilt for %s (%s)", name, level, root)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the CPU kernels for portable ISA levels.")
    parser.add_argument("--out", required=True, help="folder for the libraries and their manifest")
    parser.add_argument("--levels", nargs="*", default=[lv.name for lv in LEVELS], help="ISA levels to build")
    parser.add_argument("--kernels", nargs="*", default=list(KERNELS))
    args = parser.parse_args(argv)
    unknown = set(args.levels) - {lv.name for lv in LEVELS}
    if unknown:
        parser.error(f"unknown levels {sorted(unknown)}; choose from {[lv.name for lv in LEVELS]}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prebuild(Path(args.out), tuple(args.kernels), tuple(lv for lv in LEVELS if lv.name in args.levels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
