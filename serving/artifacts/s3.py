"""Fetching s3://bucket/prefix: plan from the listing, transfer, verify, retry, install in the cache.

The listing gives sizes and ETags for verification and lets file selection skip unneeded weights;
it is also where missing buckets, denied access and empty prefixes get their own messages.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from serving.artifacts.archive import extract_archive, single_top_folder
from serving.artifacts.cache import FileRecord, Manifest, materialize, problem, size_of
from serving.artifacts.errors import AccessDenied, ArtifactError, DownloadTimeout, EmptySource, SourceNotFound
from serving.artifacts.fetch import ARCHIVE_SUFFIXES, FetchOptions, target_folder
from serving.artifacts.progress import Progress
from serving.artifacts.s3_client import S3Location, S3Object, describe_client_error, list_objects, make_client
from serving.artifacts.selection import check_weights, select_files
from serving.artifacts.transfer import Transfer, transfer
from serving.artifacts.verify import verify_files

log = logging.getLogger("serving.artifacts")


def plan_download(objects: list[S3Object], location: S3Location, options: FetchOptions) -> list[S3Object]:
    """The objects to fetch; each way of holding nothing usable gets its own message."""
    if not objects:
        raise EmptySource(
            f"No objects under {location.url}. option.model_id must be the folder (prefix) that holds "
            "config.json and the weights; check the prefix for typos."
        )
    names = select_files([o.name for o in objects], options.allow_patterns, options.ignore_patterns)
    chosen = [o for o in objects if o.name in set(names)]
    if not chosen:
        raise EmptySource(
            f"None of the {len(objects)} objects under {location.url} match allow_patterns="
            f"{options.allow_patterns} / ignore_patterns={options.ignore_patterns}."
        )
    archives = [o for o in chosen if o.name.endswith(ARCHIVE_SUFFIXES)]
    if "config.json" in names and not archives and options.allow_patterns is None:
        check_weights(names, location.url, options)  # explicit allow_patterns: the user chose
    return chosen


def fetch_s3(source: str, options: FetchOptions) -> Path:
    from botocore.exceptions import BotoCoreError, ClientError

    deadline = time.monotonic() + options.timeout_s  # listing, lock wait and transfer share it
    location = S3Location.parse(source)
    identity = options.identity(location.url)
    target = target_folder(identity, options)
    if problem(target, identity) is None:  # trusted cache: no network at all
        log.info("Using cached %s from %s", location.url, target)
        return single_top_folder(target)
    try:
        client = make_client(options.workers)
        objects = plan_download(list_objects(client, location), location, options)
    except (BotoCoreError, ClientError) as exc:  # e.g. an unknown AWS_PROFILE
        raise describe_client_error(exc, location.url, location.bucket) from None
    expected = {o.name: FileRecord(o.size, o.etag) for o in objects}

    def produce(staging: Path) -> Manifest:
        download_with_retries(client, location, objects, staging, options, deadline)
        return finish_folder(staging, expected, identity)

    folder = materialize(target, identity, produce, deadline, owned=options.dest is None)
    return single_top_folder(folder)


def download_with_retries(
    client: Any,
    location: S3Location,
    objects: list[S3Object],
    staging: Path,
    options: FetchOptions,
    deadline: float,
) -> None:
    """s5cmd (or boto3) transfers, then verification of every file; retried with back-off, each time
    only for the files that are still missing or wrong, within the one deadline."""
    by_name = {o.name: o for o in objects}
    expected = {o.name: FileRecord(o.size, o.etag) for o in objects}
    pending = objects
    for attempt in range(1, options.retries + 1):
        try:
            total = sum(o.size for o in pending)
            progress = Progress(f"Downloading {location.url}", len(pending), total)
            transfer(client, Transfer(location, pending, staging, options.workers, deadline, progress))
            etag_check = lambda name: etag_is_md5(client, location.bucket, by_name[name])  # noqa: E731
            problems = verify_files(staging, expected, location.url, etag_check)
            if not problems:
                return
            for bad in problems:  # full-size but corrupt files too: fetch them again
                (staging / bad.name).unlink(missing_ok=True)
            if attempt == options.retries:
                raise problems[0]
            error: ArtifactError = problems[0]
        except (DownloadTimeout, AccessDenied, SourceNotFound):
            raise  # retrying cannot help
        except ArtifactError as exc:
            if attempt == options.retries:
                raise
            error = exc
        if time.monotonic() + 2**attempt > deadline:
            raise error
        log.warning(
            "Download attempt %d of %s failed (%s); retrying in %d s",
            attempt,
            location.url,
            error,
            2**attempt,
        )
        time.sleep(2**attempt)
        pending = [o for o in objects if size_of(staging / o.name) != o.size]


def etag_is_md5(client: Any, bucket: str, obj: S3Object) -> bool:
    """False for SSE-KMS and SSE-C objects, whose ETags look like MD5s but are not."""
    try:
        head = client.head_object(Bucket=bucket, Key=obj.key)
    except Exception:  # noqa: BLE001 - cannot tell: keep the check
        return True
    return head.get("ServerSideEncryption") != "aws:kms" and not head.get("SSECustomerAlgorithm")


def finish_folder(staging: Path, expected: dict[str, FileRecord], source: str) -> Manifest:
    """A single downloaded archive is extracted in place (DJL cannot do this); else files as listed."""
    archives = [name for name in expected if name.endswith(ARCHIVE_SUFFIXES)]
    if len(archives) == 1 and len(expected) == 1:
        archive = staging / archives[0]
        extracted = staging / ".extracted"
        extracted.mkdir()
        files = extract_archive(archive, extracted)
        archive.unlink()
        for entry in extracted.iterdir():
            entry.rename(staging / entry.name)
        extracted.rmdir()
        return Manifest(source=source, files=files)
    return Manifest(source=source, files=expected)
