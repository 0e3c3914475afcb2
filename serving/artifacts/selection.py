"""Which files of a checkpoint to fetch: everything useful, but not a second copy of the weights.

A repository often carries the same weights as safetensors and as pickle (`*.bin`, `*.pt`) or in
framework-specific formats; only safetensors are fetched when they exist. `option.allow_patterns` and
`option.ignore_patterns` (comma-separated or a JSON list of fnmatch patterns) override the default.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from fnmatch import fnmatch

PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
"""Skipped when safetensors exist."""
ALWAYS_SKIPPED = ("*.msgpack", "*.h5", "*.ot", "*.onnx_data", "flax_model*", "tf_model*", "rust_model*")
"""Other frameworks' copies of the weights, never loaded by this server."""
WEIGHT_PATTERNS = ("*.safetensors", "*.gguf", *PICKLE_WEIGHTS)


def parse_patterns(raw: str | None) -> tuple[str, ...] | None:
    """`a,b` or `["a", "b"]` -> ("a", "b"); None or empty -> None (no override)."""
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Patterns {raw!r} are not a JSON list: {exc}") from None
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"Patterns {raw!r} must be a JSON list of strings")
        return tuple(values)
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _matches(name: str, patterns: Iterable[str]) -> bool:
    base = name.rsplit("/", 1)[-1]
    return any(fnmatch(name, pattern) or fnmatch(base, pattern) for pattern in patterns)


def select_files(
    names: Iterable[str], allow: tuple[str, ...] | None = None, ignore: tuple[str, ...] | None = None
) -> list[str]:
    """The names to fetch, sorted. With `allow`, only matching names; `ignore` always removes names."""
    names = sorted(set(names))
    if allow is not None:
        chosen = [n for n in names if _matches(n, allow)]
    else:
        has_safetensors = any(_matches(n, ("*.safetensors",)) for n in names)
        skipped = ALWAYS_SKIPPED + (PICKLE_WEIGHTS if has_safetensors else ())
        chosen = [n for n in names if not _matches(n, skipped)]
    if ignore:
        chosen = [n for n in chosen if not _matches(n, ignore)]
    return chosen


def has_weights(names: Iterable[str]) -> bool:
    return any(_matches(n, WEIGHT_PATTERNS) for n in names)


def check_weights(names: list[str], source: str, options: object) -> None:
    """A transformers checkpoint (config.json) needs weights this server will load: safetensors or
    GGUF, or pickle files when option.allow_unsafe_weights=true. Raises NoWeights saying which."""
    from serving.artifacts.errors import NoWeights

    listing = ", ".join(sorted(names)[:10])
    if not has_weights(names):
        raise NoWeights(
            f"{source} has config.json but no weights (*.safetensors, *.gguf, *.bin): found "
            f"{listing}. Upload the weights (safetensors preferred)."
        )
    safe = any(_matches(n, ("*.safetensors", "*.gguf")) for n in names)
    if not safe and not getattr(options, "allow_unsafe_weights", False):
        raise NoWeights(
            f"{source} has no *.safetensors weights, only pickle files ({listing}), which can "
            "run code when loaded. Convert them to safetensors, or set "
            "option.allow_unsafe_weights=true if you trust them."
        )
