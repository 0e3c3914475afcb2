"""Download progress in the log: files, bytes, rate and ETA, at most every few seconds."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("serving.artifacts")


def _mb(value: float) -> str:
    return f"{value / 1e6:.1f} MB"


class Progress:
    """Thread-safe byte counter that logs a line every `interval_s` and a summary at the end."""

    def __init__(self, label: str, total_files: int, total_bytes: int, interval_s: float = 5.0) -> None:
        self.label, self.total_files, self.total_bytes = label, total_files, total_bytes
        self.interval_s = interval_s
        self.started = self._last_log = time.monotonic()
        self.bytes_done = self.files_done = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int = 0, files: int = 0) -> None:
        with self._lock:
            self.bytes_done += nbytes
            self.files_done += files
        self._maybe_log()

    def set(self, bytes_done: int, files_done: int) -> None:
        with self._lock:
            self.bytes_done, self.files_done = bytes_done, files_done
        self._maybe_log()

    def rate(self) -> float:
        return self.bytes_done / max(time.monotonic() - self.started, 1e-6)

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < self.interval_s:
            return
        self._last_log = now
        rate = self.rate()
        eta = (self.total_bytes - self.bytes_done) / rate if rate > 0 else float("inf")
        log.info(
            "%s: %d/%d files, %s/%s, %s/s, ETA %.0f s",
            self.label,
            self.files_done,
            self.total_files,
            _mb(self.bytes_done),
            _mb(self.total_bytes),
            _mb(rate),
            eta,
        )

    def finish(self) -> None:
        seconds = time.monotonic() - self.started
        log.info(
            "%s: %d files, %s in %.1f s (%s/s)",
            self.label,
            self.total_files,
            _mb(self.total_bytes),
            seconds,
            _mb(self.total_bytes / max(seconds, 1e-6)),
        )


def folder_usage(folder: Path) -> tuple[int, int]:
    """(bytes, files) currently under `folder`, for tools that report no progress themselves."""
    total = count = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_size
                count += 1
            except OSError:
                continue  # renamed away while we looked
    return total, count
