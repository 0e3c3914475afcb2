"""A spec's ``model_data`` fetched to this host, laid out as SageMaker lays out /opt/ml/model.

SageMaker copies an uncompressed prefix as it is and extracts a ``model.tar.gz`` as it is; neither
gets the file selection or single-folder unwrapping that ``serving.artifacts.fetch`` applies to an
``option.model_id``. So this lists the exact objects itself (the archive is one object, never its
siblings) and hands them to the artifact module's transfer, verification, retries and cache. The cache
key carries the objects' ETags: changed S3 data is fetched again, as SageMaker would on a new endpoint.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from serving.artifacts import ArtifactError, FetchOptions
from serving.artifacts.cache import FileRecord, Manifest, materialize
from serving.artifacts.errors import SourceNotFound
from serving.artifacts.fetch import target_folder
from serving.artifacts.s3 import download_with_retries, finish_folder
from serving.artifacts.s3_client import S3Location, S3Object, describe_client_error, list_objects, make_client
from serving.deploy.spec import ModelData


def fetch_model_data(data: ModelData, options: FetchOptions) -> Path:
    """The local folder to mount read-only at /opt/ml/model; reused while the S3 objects are unchanged.
    Errors are the artifact module's, prefixed with ``model_data <uri>:``."""
    try:
        return _fetch(data, options)
    except ArtifactError as exc:
        raise type(exc)(f"model_data {data.uri}: {exc}") from None


def _fetch(data: ModelData, options: FetchOptions) -> Path:
    deadline = time.monotonic() + options.timeout_s
    client = make_client(options.workers)
    location, objects = (_archive if data.compressed else _prefix)(client, data.uri)
    identity = content_identity(data.uri, objects)
    expected = {o.name: FileRecord(o.size, o.etag) for o in objects}

    def produce(staging: Path) -> Manifest:
        download_with_retries(client, location, objects, staging, options, deadline)
        if data.compressed:
            return finish_folder(staging, expected, identity)  # extracted in place, unsafe entries refused
        return Manifest(source=identity, files=expected)

    return materialize(target_folder(identity, options), identity, produce, deadline)


def content_identity(uri: str, objects: list[S3Object]) -> str:
    """``uri`` plus a digest of every object's name, size and ETag: the cache key of this exact data.
    The ``#`` part also keeps it apart from ``lmi pull``'s folders, which may hold a file selection."""
    listing = "".join(f"{o.name}\0{o.size}\0{o.etag}\n" for o in sorted(objects, key=lambda o: o.name))
    return f"{uri}#sagemaker-layout-{hashlib.sha256(listing.encode()).hexdigest()[:16]}"


def _prefix(client: Any, uri: str) -> tuple[S3Location, list[S3Object]]:
    location = S3Location.parse(uri)
    objects = list_objects(client, location)
    if not objects:
        raise SourceNotFound(
            "no objects under this prefix; SageMaker would fail to create the model too. Upload the "
            "model folder there, or point model_data at the prefix that holds it."
        )
    return location, objects


def _archive(client: Any, uri: str) -> tuple[S3Location, list[S3Object]]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    parent, _, name = key.rpartition("/")
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
            raise SourceNotFound("no such object. Check the bucket and key in the spec.") from None
        raise describe_client_error(exc, uri, bucket) from None
    except BotoCoreError as exc:
        raise describe_client_error(exc, uri, bucket) from None
    if not head.get("ContentLength"):
        raise ArtifactError("the object is empty: not a model.tar.gz.")
    etag = str(head.get("ETag", "")).strip('"')
    return S3Location(bucket, f"{parent}/" if parent else ""), [
        S3Object(key, name, head["ContentLength"], etag)
    ]
