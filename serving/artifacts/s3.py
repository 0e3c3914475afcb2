"""s3://bucket/prefix: list with boto3, download with the s5cmd binary (boto3 if it is missing).

The listing gives sizes and ETags for verification and lets file selection skip unneeded weights;
it is also where missing buckets, denied access and empty prefixes get their own messages. The
endpoint comes from AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or S3_ENDPOINT_URL; credentials and
profiles are the standard AWS ones, read by both tools.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.artifacts.cache import FileRecord, Manifest, materialize, size_of
from serving.artifacts.errors import AccessDenied, ArtifactError, EmptySource, SourceNotFound
from serving.artifacts.fetch import ARCHIVE_SUFFIXES, FetchOptions, target_folder
from serving.artifacts.selection import check_weights, select_files

log = logging.getLogger("serving.artifacts")

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")
DENIED_CODES = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
CREDENTIALS_HINT = (
    "Check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role) "
    "and that they allow s3:ListBucket and s3:GetObject on it."
)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    """'' or ending in '/': the folder whose objects make up the model."""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        rest = url[len("s3://") :].rstrip("*")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ArtifactError(f"{url!r} names no bucket; expected s3://bucket/prefix/")
        return cls(bucket, prefix if not prefix or prefix.endswith("/") else prefix + "/")

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class S3Object:
    key: str
    name: str
    """Path relative to the prefix: where the file lands in the model folder."""
    size: int
    etag: str


def endpoint_url() -> str | None:
    return next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)


def make_client(workers: int = 32) -> Any:
    import boto3
    from botocore.config import Config

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max(workers, 10),
    )
    return boto3.client("s3", endpoint_url=endpoint_url(), region_name=region, config=config)


def describe_client_error(exc: Exception, what: str) -> ArtifactError:
    """Map a botocore error to the distinct failure it means."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return AccessDenied(f"No AWS credentials were found to read {what}. {CREDENTIALS_HINT}")
    if isinstance(exc, EndpointConnectionError):
        return ArtifactError(
            f"Cannot reach the S3 endpoint for {what}: {exc}. Check the network and "
            f"{'/'.join(ENDPOINT_VARIABLES)}."
        )
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            bucket = what.split("/")[2] if what.startswith("s3://") else what
            return SourceNotFound(
                f"S3 bucket {bucket!r} does not exist (reading {what}). Check the bucket "
                "name in option.model_id and the endpoint/region."
            )
        if code in DENIED_CODES:
            return AccessDenied(f"Access denied to {what} ({code}). {CREDENTIALS_HINT}")
        if code in ("NoSuchKey", "404"):
            return SourceNotFound(f"{what} does not exist. Check option.model_id.")
    return ArtifactError(f"Reading {what} failed: {exc}")


def _safe_name(key: str, location: S3Location) -> str:
    """The object's path inside the model folder; keys that would land outside it are refused."""
    name = key[len(location.prefix) :]
    parts = name.split("/")
    if not name or name.startswith("/") or ".." in parts or "" in parts or "\n" in name:
        raise ArtifactError(
            f"s3://{location.bucket}/{key} cannot be stored safely inside the model folder (an empty, "
            "absolute or '..' path component). Rename the object."
        )
    return name


def list_objects(client: Any, location: S3Location) -> list[S3Object]:
    from botocore.exceptions import BotoCoreError, ClientError

    objects = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=location.bucket, Prefix=location.prefix
        ):
            for item in page.get("Contents", []):
                key = item["Key"]
                if key.endswith("/"):
                    continue  # a "folder" marker object
                etag = item.get("ETag", "").strip('"')
                objects.append(S3Object(key, _safe_name(key, location), item["Size"], etag))
    except (ClientError, BotoCoreError) as exc:
        raise describe_client_error(exc, location.url) from None
    return objects


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

    from serving.artifacts.archive import single_top_folder
    from serving.artifacts.cache import problem

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
        raise describe_client_error(exc, location.url) from None
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
    from serving.artifacts.errors import DownloadTimeout
    from serving.artifacts.transfer import transfer
    from serving.artifacts.verify import verify_files

    by_name = {o.name: o for o in objects}
    expected = {o.name: FileRecord(o.size, o.etag) for o in objects}
    pending = objects
    for attempt in range(1, options.retries + 1):
        try:
            transfer(client, location, pending, staging, options, deadline)
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
        from serving.artifacts.archive import extract_archive

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
