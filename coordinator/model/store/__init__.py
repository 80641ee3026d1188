"""The blob store: content-addressed bytes (datasets, adapters, model files) behind one interface.

Two backends, one file each, chosen by :func:`open_store` from the ``--store`` URL:

- :class:`~coordinator.model.store.local.BlobStore`, a folder in the data dir (the embedded
  default): clients get its bytes streamed through the coordinator's gRPC calls.
- :class:`~coordinator.model.store.s3.S3Store`, any S3-compatible object store
  (``s3://bucket/prefix``; its endpoint from the settings or the standard AWS chain,
  credentials the standard AWS way): clients get and put
  bytes straight from and to the store by presigned URLs, and the coordinator only names them.

A blob's name is the sha256 of its bytes, so storing the same bytes twice is a no-op and a reader
can check what it got. Besides blobs, a store holds *uploads*: objects a worker writes by a
presigned PUT under a name of its own lease (see :func:`upload_key`), which the coordinator reads
back and checks before anything of it becomes a blob.
"""

from __future__ import annotations

from pathlib import Path

from coordinator.model.store.base import CHUNK, BlobInfo, Store, StoreError, check_sha, upload_key
from coordinator.model.store.local import BlobStore  # the default, by its old name


def open_store(url: str, data_dir: Path | None, endpoint: str = "") -> Store:
    """The store ``url`` names: "" (or a path, or file://...) a folder, s3://bucket/prefix an
    object store at ``endpoint`` (the settings' ``store_endpoint``; "": boto3's standard chain),
    credentials the standard AWS way."""
    if not url:
        if data_dir is None:
            raise StoreError("a store in the data dir needs a data dir")
        return BlobStore(Path(data_dir) / "blobs")
    if url.startswith("s3://"):
        from coordinator.model.store.s3 import S3Store  # boto3 only for those who use it

        return S3Store.from_url(url, endpoint)
    if url.startswith("file://"):
        return BlobStore(Path(url[len("file://"):]))
    if "://" in url:
        raise StoreError(f"--store {url}: use a folder, file:///path, or s3://bucket/prefix")
    return BlobStore(Path(url))


__all__ = ["CHUNK", "BlobInfo", "BlobStore", "Store", "StoreError", "check_sha", "open_store", "upload_key"]
