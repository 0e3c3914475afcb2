"""The boto3 download path: one transfer manager for all files, so files and their parts run in parallel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serving.artifacts.errors import ArtifactError, DownloadTimeout
from serving.artifacts.progress import Progress


def download_boto3(
    client: Any,
    location: Any,
    objects: list[Any],
    dest: Path,
    workers: int,
    deadline: float,
    progress: Progress,
) -> None:
    import time

    from boto3.s3.transfer import TransferConfig, create_transfer_manager
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.subscribers import BaseSubscriber

    from serving.artifacts.s3 import describe_client_error

    class Counter(BaseSubscriber):
        def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
            progress.add(bytes_transferred)

        def on_done(self, future: Any, **kwargs: Any) -> None:
            progress.add(files=1)

    chunk = 16 * 1024 * 1024
    config = TransferConfig(
        max_concurrency=workers, multipart_threshold=chunk, multipart_chunksize=chunk, use_threads=True
    )
    manager = create_transfer_manager(client, config)
    cancelled = False
    try:
        futures = []
        for obj in objects:
            target = dest / obj.name
            target.parent.mkdir(parents=True, exist_ok=True)
            futures.append(manager.download(location.bucket, obj.key, str(target), subscribers=[Counter()]))
        while not all(f.done() for f in futures):
            if any(_error(f) is not None for f in futures):
                break
            if time.monotonic() > deadline:
                cancelled = True
                raise DownloadTimeout(
                    f"Downloading {location.url} with boto3 did not finish within the download timeout "
                    f"({progress.bytes_done / 1e6:.1f} of {progress.total_bytes / 1e6:.1f} MB). Raise "
                    "option.download_timeout, or install s5cmd for faster downloads."
                )
            time.sleep(0.1)
        for future in futures:
            exc = _error(future)
            if exc is not None:
                cancelled = True
                if isinstance(exc, (ClientError, BotoCoreError)):
                    raise describe_client_error(exc, f"s3://{location.bucket}/{future.meta.call_args.key}")
                raise ArtifactError(f"Downloading {location.url} failed: {exc}")
    finally:
        manager.shutdown(cancel=cancelled)


def _error(future: Any) -> BaseException | None:
    """A finished transfer's exception (s3transfer futures have no .exception())."""
    if not future.done():
        return None
    try:
        future.result()
    except BaseException as exc:  # noqa: BLE001 - handed back to the caller to classify
        return exc
    return None
