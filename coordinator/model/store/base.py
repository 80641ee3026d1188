"""The blob store's interface (see the package docstring), and what its backends share."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20
_SHA = re.compile(r"[0-9a-f]{64}")
_UPLOAD = re.compile(r"[A-Za-z0-9_.-]{1,200}")


def check_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA.fullmatch(sha256):
        raise ValueError(f"{sha256!r} is not a sha256 hex digest")
    return sha256


def upload_key(task_id: str, fence: int, sha256: str) -> str:
    """The one object an adapter upload of (task, fence, sha256) may write: its presigned PUT
    names only this, so a lease's URL can overwrite nothing else (no blob, no other lease's)."""
    key = f"{task_id}.{int(fence)}.{check_sha(sha256)}"
    if not _UPLOAD.fullmatch(key):
        raise ValueError(f"task id {task_id!r} cannot name an upload")
    return key


class StoreError(ValueError):
    """The store named cannot be used (a sentence saying why and what to do)."""


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    size: int
    modified: float  # unix seconds: when the blob was (last) written


class Store(ABC):
    """What the coordinator asks of a blob store. ``direct`` stores hand clients URLs."""

    direct: bool = False  # clients move bytes straight to and from the store (presigned URLs)

    # -- blobs ------------------------------------------------------------------------------------
    @abstractmethod
    def put(self, data: bytes) -> str:
        """Store ``data``; returns its sha256 (a no-op when the blob is there)."""

    @abstractmethod
    def put_file(self, source: Path) -> str:
        """Store a copy of the file ``source``, streamed; returns its sha256."""

    @abstractmethod
    def has(self, sha256: str) -> bool: ...

    @abstractmethod
    def size(self, sha256: str) -> int: ...

    @abstractmethod
    def get(self, sha256: str) -> bytes: ...

    @abstractmethod
    def get_range(self, sha256: str, start: int, end: int) -> bytes:
        """Bytes ``start`` (inclusive) to ``end`` (exclusive) of the blob."""

    def read_range(self, sha256: str, offset: int, length: int, chunk: int = CHUNK) -> Iterator[bytes]:
        """``length`` bytes of a blob from byte ``offset`` on, ``chunk`` bytes at a time: what a
        reader of a part of a large blob (a task's shard of a job's records) holds at once."""
        end = offset + length
        while offset < end:
            block = self.get_range(sha256, offset, min(offset + chunk, end))
            if not block:
                return
            offset += len(block)
            yield block

    @abstractmethod
    def chunks(self, sha256: str, chunk: int = CHUNK, start: int = 0) -> Iterator[bytes]:
        """The blob from ``start`` on, a block at a time (a shard is never read whole)."""

    @abstractmethod
    def fetch(self, sha256: str, target: Path) -> None:
        """The blob as the file ``target`` (a hard link where the store is a local folder)."""

    @abstractmethod
    def delete(self, sha256: str) -> None:
        """Remove the blob (missing is fine)."""

    @abstractmethod
    def list(self) -> Iterator[BlobInfo]:
        """Every blob held (the sweeper's view; paged under the hood)."""

    # -- local files in and out -------------------------------------------------------------------
    @abstractmethod
    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A scratch folder (removed on exit) whose files :meth:`adopt_folder` takes in."""

    @abstractmethod
    def adopt(self, source: Path) -> str:
        """Move the file ``source`` (in :meth:`staging`) into the store; returns its sha256."""

    def adopt_folder(self, folder: Path) -> dict[str, str]:
        """Every file under ``folder`` moved into the store: relative path -> sha256."""
        folder = Path(folder)
        return {str(p.relative_to(folder)): self.adopt(p) for p in sorted(folder.rglob("*")) if p.is_file()}

    # -- what clients fetch and put themselves (direct stores) ------------------------------------
    def presign_get(self, sha256: str, expires_s: float) -> str:
        """A URL that GETs (with Range) this blob only, until ``expires_s`` from now; "" when
        the store is not direct (then the bytes go through the coordinator)."""
        return ""

    def presign_put(self, key: str, expires_s: float) -> str:
        """A URL that PUTs the upload ``key`` (:func:`upload_key`) only; "" when not direct."""
        return ""

    def read_upload(self, key: str, limit: int) -> bytes | None:
        """The bytes a client PUT as upload ``key`` (None: none there, or more than ``limit``)."""
        return None

    def delete_upload(self, key: str) -> None:
        """Remove upload ``key`` (missing is fine)."""

    def uploads(self) -> Iterator[BlobInfo]:
        """Every upload object held, named by its key in ``sha256`` (the sweeper's view)."""
        return iter(())

    def describe(self) -> str:
        return type(self).__name__
