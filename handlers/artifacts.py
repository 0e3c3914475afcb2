"""Before any handler loads: S3 and archive models become local folders, and model_id points there.

DJL's front end downloads an s3:// model_id and rewrites it to the local folder before Python starts,
so user `model.py` code only ever sees a path; this does the same inside the model worker, where the
loading timeout and /ping's FAILED state cover it. Hub ids stay as they are for user handlers (their
code may call from_pretrained itself); the built-in handler fetches them through the same module.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from serving.artifacts import FetchOptions, fetch
from serving.artifacts.fetch import ARCHIVE_SUFFIXES, source_kind

log = logging.getLogger("handlers.artifacts")


def _archive_in(model_dir: str | None) -> str | None:
    """A model folder holding only a model archive (no config.json): the archive to extract."""
    if not model_dir or not os.path.isdir(model_dir):
        return None
    if os.path.exists(os.path.join(model_dir, "config.json")):
        return None
    archives = sorted(f for f in os.listdir(model_dir) if f.endswith(ARCHIVE_SUFFIXES))
    return os.path.join(model_dir, archives[0]) if len(archives) == 1 else None


def localize_model(
    properties: dict[str, str], model_dir: str | None, settings: dict[str, Any] | None = None
) -> dict[str, str]:
    """`properties` with model_id naming a local folder whenever the model came from S3 or an archive.

    ``settings``: the typed values the server validated (the worker spec); else parsed from properties."""
    source = properties.get("model_id") or properties.get("s3url")
    if source and model_dir and not source.startswith("s3://") and not os.path.isabs(source):
        relative = os.path.join(model_dir, source)
        source = relative if os.path.isfile(relative) else source  # an archive next to serving.properties
    source = source or _archive_in(model_dir)
    if not source or source_kind(source) not in ("s3", "archive"):
        return properties
    options = FetchOptions.from_settings(settings) if settings else FetchOptions.from_properties(properties)
    local = fetch(source, options)
    log.info("Model %s is at %s", source, local)
    return {**properties, "model_id": str(local)}
