"""Content-addressed blobs on disk: datasets, adapters, model files.

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

CHUNK = 1 << 20


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"{sha256!r} is not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

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

    def adopt_folder(self, folder: Path) -> dict[str, str]:
        """Every file under ``folder`` moved into the store: relative path -> sha256."""
        folder = Path(folder)
        return {str(p.relative_to(folder)): self.adopt(p) for p in sorted(folder.rglob("*")) if p.is_file()}

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def read_range(self, sha256: str, offset: int, length: int, chunk: int = CHUNK) -> Iterator[bytes]:
        """``length`` bytes of a blob from byte ``offset`` on, ``chunk`` bytes at a time: what a
        reader of a part of a large blob (a task's shard of a job's records) holds at once."""
        with open(self.path(sha256), "rb") as fh:
            fh.seek(offset)
            while length > 0:
                block = fh.read(min(chunk, length))
                if not block:
                    return
                length -= len(block)
                yield block

    def chunks(self, sha256: str, chunk: int = CHUNK) -> Iterator[bytes]:
        with open(self.path(sha256), "rb") as fh:
            yield from iter(lambda: fh.read(chunk), b"")

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
