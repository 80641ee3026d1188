"""The local-folder blob store (the embedded default): content-addressed files in the data dir.

A blob's name is the sha256 of its bytes, so storing the same bytes twice is a no-op and a
reader can always check what it got. Writes go to a temporary file and are renamed into place,
so a crash never leaves a half-written blob under a valid name. On several hosts, point the
data dir at shared storage.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from coordinator.model.store.base import CHUNK, BlobInfo, Store, check_sha


class BlobStore(Store):
    """Blobs as ``<root>/<sha[:2]>/<sha>``; clients get their bytes through the coordinator."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / check_sha(sha256)[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if not target.exists():
            self._write(target, data)
        return sha

    def put_file(self, source: Path) -> str:
        """Store a copy of ``source``, streamed (a model shard is never read into memory)."""
        sha = _file_sha256(source)
        target = self.path(sha)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as out, open(source, "rb") as fh:
                    shutil.copyfileobj(fh, out, CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return sha

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A scratch folder on the store's own file system (removed on exit), whose files
        :meth:`adopt_folder` moves into the store by rename rather than by copy."""
        where = Path(tempfile.mkdtemp(dir=self.root, prefix=".staging-"))
        try:
            yield where
        finally:
            shutil.rmtree(where, ignore_errors=True)

    def adopt(self, source: Path) -> str:
        """Move ``source`` (a file in :meth:`staging`) into the store; returns its sha256."""
        sha = _file_sha256(source)
        target = self.path(sha)
        if target.exists():
            Path(source).unlink()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(source, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(source, target)
        return sha

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def get_range(self, sha256: str, start: int, end: int) -> bytes:
        with open(self.path(sha256), "rb") as fh:
            fh.seek(start)
            return fh.read(max(0, end - start))

    def chunks(self, sha256: str, chunk: int = CHUNK, start: int = 0) -> Iterator[bytes]:
        with open(self.path(sha256), "rb") as fh:
            fh.seek(start)
            yield from iter(lambda: fh.read(chunk), b"")

    def fetch(self, sha256: str, target: Path) -> None:
        """A hard link to the (immutable) blob where the file system allows, else a streamed copy."""
        try:
            os.link(self.path(sha256), target)
        except OSError:
            shutil.copyfile(self.path(sha256), target)

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def list(self) -> Iterator[BlobInfo]:
        for sub in sorted(self.root.iterdir()) if self.root.exists() else ():
            if len(sub.name) != 2 or not sub.is_dir():
                continue  # staging folders and temporary files are not blobs
            for p in sorted(sub.iterdir()):
                if len(p.name) == 64 and not p.name.startswith("."):
                    st = p.stat()
                    yield BlobInfo(p.name, st.st_size, st.st_mtime)

    def describe(self) -> str:
        return f"the folder {self.root}"

    def _write(self, target: Path, data: bytes) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()
