"""The boto3 download path: one transfer manager for all files, so files and their parts run in parallel."""

from __future__ import annotations

import time
from typing import Any

from serving.artifacts.errors import ArtifactError
from serving.artifacts.s3_client import describe_client_error
from serving.artifacts.transfer import Transfer


def download_boto3(client: Any, job: Transfer) -> None:
    from boto3.s3.transfer import TransferConfig, create_transfer_manager
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.subscribers import BaseSubscriber

    location, progress = job.location, job.progress

    class Counter(BaseSubscriber):
        def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
            progress.add(bytes_transferred)

        def on_done(self, future: Any, **kwargs: Any) -> None:
            progress.add(files=1)

    chunk = 16 * 1024 * 1024
    config = TransferConfig(
        max_concurrency=job.workers, multipart_threshold=chunk, multipart_chunksize=chunk, use_threads=True
    )
    manager = create_transfer_manager(client, config)
    cancelled = False
    try:
        futures = []
        for obj in job.objects:
            target = job.dest / obj.name
            target.parent.mkdir(parents=True, exist_ok=True)
            futures.append(manager.download(location.bucket, obj.key, str(target), subscribers=[Counter()]))
        while not all(f.done() for f in futures):
            if any(_error(f) is not None for f in futures):
                break
            if time.monotonic() > job.deadline:
                cancelled = True
                raise job.timeout_error()
            time.sleep(0.1)
        for future in futures:
            exc = _error(future)
            if exc is not None:
                cancelled = True
                if isinstance(exc, (ClientError, BotoCoreError)):
                    what = f"s3://{location.bucket}/{future.meta.call_args.key}"
                    raise describe_client_error(exc, what, location.bucket)
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
