"""The object-store backend: blobs in any S3-compatible store (S3, R2, MinIO, SeaweedFS).

``--store s3://bucket/prefix``; the endpoint is the settings' ``store_endpoint``
(``--store-endpoint``) when named, else boto3's own chain (AWS_ENDPOINT_URL, a profile's
endpoint_url, or AWS itself); credentials and region come the standard AWS way
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_REGION, a profile, an instance role), read by
boto3, never by us. Blobs live at ``<prefix>/blobs/<sha[:2]>/<sha>``, worker uploads at
``<prefix>/uploads/<task>.<fence>.<sha>``.

Clients move the bytes themselves: the coordinator hands out presigned URLs (SigV4, so a URL
names one object and one method, and expires), a GET for a blob (ranges allowed: a broken pull
resumes) and a PUT for an upload. The coordinator's own reads and writes (folding, publishing,
checking an upload) go through boto3, large files in multipart transfers.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from coordinator.model.store.base import CHUNK, BlobInfo, Store, StoreError, check_sha
from coordinator.model.store.local import _file_sha256

_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code", "")) in _MISSING


class S3Store(Store):
    direct = True

    def __init__(self, bucket: str, prefix: str = "", client=None, endpoint: str = "") -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.s3 = client if client is not None else _client(endpoint)

    @classmethod
    def from_url(cls, url: str, endpoint: str = "") -> S3Store:
        """``s3://bucket[/prefix]`` on ``endpoint`` ("": boto3's chain); the bucket is made when it
        does not exist yet."""
        rest = url[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"--store {url}: name a bucket, as s3://bucket/prefix")
        if endpoint and not endpoint.startswith(("http://", "https://")):
            raise StoreError(f"--store-endpoint {endpoint}: give the object store's URL, as https://HOST[:PORT]")
        store = cls(bucket, prefix, endpoint=endpoint)
        store.ensure_bucket()
        return store

    def ensure_bucket(self) -> None:
        try:
            try:
                self.s3.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if not _missing(exc):
                    raise
                self.s3.create_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"cannot use the bucket {self.bucket} of the object store at "
                             f"{self.s3.meta.endpoint_url} ({exc}); check --store-endpoint (or AWS_ENDPOINT_URL) "
                             "and the credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION") from None

    def _key(self, sha256: str) -> str:
        return self._join(f"blobs/{check_sha(sha256)[:2]}/{sha256}")

    def _upload(self, key: str) -> str:
        return self._join(f"uploads/{key}")

    def _join(self, rest: str) -> str:
        return f"{self.prefix}/{rest}" if self.prefix else rest

    # -- blobs ------------------------------------------------------------------------------------
    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has(sha):
            self.s3.put_object(Bucket=self.bucket, Key=self._key(sha), Body=data)
        return sha

    def put_file(self, source: Path) -> str:
        sha = _file_sha256(source)
        if not self.has(sha):
            self.s3.upload_file(str(source), self.bucket, self._key(sha))
        return sha

    def has(self, sha256: str) -> bool:
        try:
            self.s3.head_object(Bucket=self.bucket, Key=self._key(sha256))
            return True
        except ClientError as exc:
            if _missing(exc):
                return False
            raise

    def size(self, sha256: str) -> int:
        try:
            return int(self.s3.head_object(Bucket=self.bucket, Key=self._key(sha256))["ContentLength"])
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(f"blob {sha256} is not in {self.describe()}") from None
            raise

    def get(self, sha256: str) -> bytes:
        return self._read(self._key(sha256))

    def _read(self, key: str, **extra) -> bytes:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=key, **extra)["Body"].read()
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(f"{key} is not in {self.describe()}") from None
            raise

    def get_range(self, sha256: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        return self._read(self._key(sha256), Range=f"bytes={start}-{end - 1}")

    def chunks(self, sha256: str, chunk: int = CHUNK, start: int = 0) -> Iterator[bytes]:
        extra = {"Range": f"bytes={start}-"} if start else {}
        body = self.s3.get_object(Bucket=self.bucket, Key=self._key(sha256), **extra)["Body"]
        try:
            yield from iter(lambda: body.read(chunk), b"")
        finally:
            body.close()

    def fetch(self, sha256: str, target: Path) -> None:
        self.s3.download_file(self.bucket, self._key(sha256), str(target))

    def delete(self, sha256: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self._key(sha256))

    def list(self) -> Iterator[BlobInfo]:
        for key, size, modified in self._objects(self._join("blobs/")):
            name = key.rsplit("/", 1)[-1]
            if len(name) == 64:
                yield BlobInfo(name, size, modified)

    def _objects(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", ()):
                yield obj["Key"], int(obj["Size"]), obj["LastModified"].timestamp()

    # -- local files in and out -------------------------------------------------------------------
    @contextmanager
    def staging(self) -> Iterator[Path]:
        where = Path(tempfile.mkdtemp(prefix="nomoat-staging-"))
        try:
            yield where
        finally:
            shutil.rmtree(where, ignore_errors=True)

    def adopt(self, source: Path) -> str:
        sha = self.put_file(source)
        Path(source).unlink()
        return sha

    # -- what clients fetch and put themselves ----------------------------------------------------
    def presign_get(self, sha256: str, expires_s: float) -> str:
        return self.s3.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": self._key(sha256)},
                                              ExpiresIn=max(1, int(expires_s)))

    def presign_put(self, key: str, expires_s: float) -> str:
        return self.s3.generate_presigned_url("put_object", Params={"Bucket": self.bucket, "Key": self._upload(key)},
                                              ExpiresIn=max(1, int(expires_s)))

    def read_upload(self, key: str, limit: int) -> bytes | None:
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=self._upload(key))
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        if int(head["ContentLength"]) > limit:
            return None
        return self._read(self._upload(key))

    def delete_upload(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self._upload(key))

    def uploads(self) -> Iterator[BlobInfo]:
        for key, size, modified in self._objects(self._join("uploads/")):
            yield BlobInfo(key.rsplit("/", 1)[-1], size, modified)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def _client(endpoint: str = ""):
    """boto3's S3 client on ``endpoint`` ("": wherever boto3's standard chain points). SigV4 signs
    every presigned URL (one object, one method, an expiry); path-style addressing off AWS (MinIO,
    SeaweedFS and R2 serve buckets under the path, not as host names)."""
    def make(style: str):
        config = Config(signature_version="s3v4", s3={"addressing_style": style},
                        retries={"max_attempts": 5, "mode": "standard"})
        return boto3.session.Session().client("s3", config=config, endpoint_url=endpoint or None)

    client = make("auto")
    if not client.meta.endpoint_url.rstrip("/").endswith(".amazonaws.com"):
        client = make("path")  # an endpoint of its own (ours, or the chain's): not AWS
    return client
