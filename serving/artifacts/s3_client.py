"""The S3 side of a fetch: where a model lives (bucket, prefix), the client, the listing, and what
each botocore error means. The endpoint comes from AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or
S3_ENDPOINT_URL; credentials and profiles are the standard AWS ones, read by boto3 and s5cmd alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from serving.artifacts.errors import AccessDenied, ArtifactError, SourceNotFound

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


def describe_client_error(exc: Exception, what: str, bucket: str) -> ArtifactError:
    """Map a botocore error met reading `what` (in `bucket`) to the distinct failure it means."""
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
            return SourceNotFound(
                f"S3 bucket {bucket!r} does not exist (reading {what}). Check the bucket "
                "name in option.model_id and the endpoint/region."
            )
        if code in DENIED_CODES:
            return AccessDenied(f"Access denied to {what} ({code}). {CREDENTIALS_HINT}")
        if code in ("NoSuchKey", "404"):
            return SourceNotFound(f"{what} does not exist. Check option.model_id.")
    return ArtifactError(f"Reading {what} failed: {exc}")


def safe_name(key: str, location: S3Location) -> str:
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
                objects.append(S3Object(key, safe_name(key, location), item["Size"], etag))
    except (ClientError, BotoCoreError) as exc:
        raise describe_client_error(exc, location.url, location.bucket) from None
    return objects
