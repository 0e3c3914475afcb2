"""Turn a model source (S3 URL, Hub id, archive, folder) into a local folder, by a registry of kinds."""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.artifacts.errors import ArtifactError

log = logging.getLogger("serving.artifacts")

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# kind -> "module:function" taking (source, FetchOptions) and returning the local folder; imported lazily
FETCHERS = {
    "s3": "serving.artifacts.s3:fetch_s3",
    "hub": "serving.artifacts.hub:fetch_hub",
    "archive": "serving.artifacts.archive:fetch_archive",
}


@dataclass(frozen=True)
class FetchOptions:
    """How to fetch, from the model's properties (option.* without the prefix, plus server keys)."""

    download_dir: str | None = None
    """Cache root (download_dir / SERVING_DOWNLOAD_DIR); default <user cache dir>/lmi-serving/download."""
    dest: str | None = None
    """Exact folder to fill instead of the cache (lmi pull --dest)."""
    allow_patterns: tuple[str, ...] | None = None
    ignore_patterns: tuple[str, ...] | None = None
    revision: str | None = None
    timeout_s: float = 216.0
    """Whole-download limit; by default 90 % of model_loading_timeout, so the download's own error
    (naming what was slow) comes before the worker is killed for loading too long."""
    workers: int = 32
    """Parallel transfers (s5cmd --numworkers, boto3 max_concurrency)."""
    retries: int = 3
    """Attempts per download, with back-off; each retry fetches only what is missing or wrong."""
    allow_unsafe_weights: bool = False
    """Accept a checkpoint whose only weights are pickle files (*.bin, *.pt)."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.workers < 1 or self.retries < 1:
            raise ValueError("download timeout, workers and retries must be positive")

    def identity(self, url: str) -> str:
        """What a cached folder must have been fetched as: the URL plus any file-selection override,
        so changing the patterns never serves a folder selected under the old ones."""
        parts = [f"allow={','.join(self.allow_patterns)}"] if self.allow_patterns is not None else []
        parts += [f"ignore={','.join(self.ignore_patterns)}"] if self.ignore_patterns else []
        return url + ("?" + "&".join(parts) if parts else "")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> FetchOptions:
        """From the typed values of the option declaration (serving/options.py), parsed there once."""
        return cls(
            download_dir=settings["download_dir"],
            allow_patterns=settings["allow_patterns"],
            ignore_patterns=settings["ignore_patterns"],
            revision=settings["revision"],
            timeout_s=settings["download_timeout"] or 0.9 * settings["model_loading_timeout"],
            workers=settings["download_workers"],
            retries=settings["download_retries"],
            allow_unsafe_weights=settings["allow_unsafe_weights"],
        )

    @classmethod
    def from_properties(cls, props: Mapping[str, str]) -> FetchOptions:
        """From string properties (``lmi pull``, DJL entry points), through the same declaration;
        ValueError names the bad key, its value and the fix."""
        from serving.errors import ConfigError
        from serving.options import settings_from_properties  # it imports this package

        try:
            return cls.from_settings(settings_from_properties(props))
        except ConfigError as exc:
            raise ValueError(exc.message) from None


def source_kind(source: str) -> str | None:
    """'s3', 'archive', 'hub', or None for a local folder (used in place) or anything else."""
    if source.startswith("s3://"):
        return "s3"
    if source.endswith(ARCHIVE_SUFFIXES) and os.path.isfile(source):
        return "archive"
    if os.path.exists(source):
        return None
    if HUB_ID.match(source):
        return "hub"
    return None


def is_fetchable(source: str) -> bool:
    return source_kind(source) is not None


def fetch(source: str, options: FetchOptions | None = None) -> Path:
    """The local folder holding `source`'s files, downloading or extracting them first if needed."""
    options = options or FetchOptions()
    kind = source_kind(source)
    if kind is None:
        if os.path.isdir(source):
            return Path(source)  # a local folder is used in place, never copied
        raise ArtifactError(
            f"Model source {source!r} is not a folder, an archive (.tar.gz/.tgz/.tar), an s3:// URL or a "
            "Hugging Face Hub id (org/name). Fix option.model_id."
        )
    module_name, _, function = FETCHERS[kind].partition(":")
    return getattr(importlib.import_module(module_name), function)(source, options)


def target_folder(source: str, options: FetchOptions) -> Path:
    """Where `source` lands: --dest if given, else its folder in the download cache."""
    from serving.artifacts.cache import cache_folder, download_root

    if options.dest:
        return Path(options.dest).absolute()
    return cache_folder(download_root(options.download_dir), source)
