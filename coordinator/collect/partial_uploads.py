"""Partial uploads: the bytes of an adapter upload that broke off, kept so the worker can resume.

An upload is named by (task, fence, sha256) and its bytes are appended, as they arrive, to
``uploads/<task>-<fence>-<sha256>.part`` in the data dir; a stream that breaks off leaves the
file behind, and ``UploadOffset`` tells the worker how many bytes are here, so it sends only the
rest. Nothing is accepted until the whole file's sha256 matches the manifest; a mismatch removes
the file.

What the folder may hold is bounded by the lease, not by what clients choose: only the current
holder of a task's lease may start a part (the caller checks), a lease has at most one part (an
upload under another sha256 replaces it), and a part is never larger than its manifest's size,
which the caller bounds by the size of an adapter of the job's config. :meth:`sweep`, run on a
timer (coordinator.server), removes the parts of leases that ended and any left too long.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("nomoat.uploads")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


class UploadRefused(Exception):
    """The upload can never succeed as sent; the message says why (a final answer)."""


class UploadRetry(Exception):
    """The upload cannot go on now but may be retried; the message says how."""


class PartialUploads:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._busy: set[Path] = set()

    def path(self, task_id: str, fence: int, sha256: str) -> Path:
        if not _NAME.match(task_id) or task_id.startswith(".") or not _SHA.match(sha256):
            raise UploadRefused("the manifest's task id or sha256 is malformed")
        return self.root / f"{task_id}-{int(fence)}-{sha256}.part"

    def _lease_parts(self, task_id: str, fence: int) -> list[Path]:
        prefix = f"{task_id}-{int(fence)}-"
        try:
            names = os.listdir(self.root)  # (a glob compiles a pattern for each lease: a cost per upload)
        except FileNotFoundError:
            return []
        return [self.root / n for n in names
                if n.startswith(prefix) and n.endswith(".part") and _SHA.match(n[len(prefix) : -5])]

    def offset(self, task_id: str, fence: int, sha256: str) -> int:
        """How many bytes of this upload the coordinator holds (0 when none)."""
        try:
            return self.path(task_id, fence, sha256).stat().st_size
        except (OSError, UploadRefused):
            return 0

    @contextmanager
    def _exclusive(self, path: Path) -> Iterator[None]:
        with self._lock:
            if path in self._busy:
                raise UploadRetry("another upload under this lease is still being received; retry shortly")
            self._busy.add(path)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(path)

    def receive(self, task_id: str, fence: int, sha256: str, size: int, offset: int,
                blocks: Iterable[bytes]) -> bytes | None:
        """Write ``blocks`` from byte ``offset`` on; the whole, checked file once it is complete.

        Returns None when the stream ended before ``size`` bytes (the part is kept for a
        resume). Raises UploadRefused for a sha256 mismatch or too many bytes (the part is
        removed), UploadRetry when ``offset`` is past what is held. If the stream breaks off
        (the client went away), what arrived is kept and the exception goes on up.
        """
        path = self.path(task_id, fence, sha256)
        with self._exclusive(self.root / f"{task_id}-{int(fence)}"):  # one stream per lease at a time
            for other in self._lease_parts(task_id, fence):
                if other != path:  # one part per lease: another sha256 replaces it
                    other.unlink(missing_ok=True)
            held = path.stat().st_size if path.exists() else 0
            if offset > held:
                raise UploadRetry(f"the coordinator holds {held} bytes of this upload; resume from offset {held}")
            received = offset
            self.root.mkdir(parents=True, exist_ok=True)
            with open(path, "r+b" if path.exists() else "wb") as fh:
                fh.truncate(offset)
                fh.seek(offset)
                for block in blocks:
                    received += len(block)
                    if received > size:
                        fh.close()
                        path.unlink(missing_ok=True)
                        raise UploadRefused("more bytes arrived than the manifest announced")
                    fh.write(block)
                    fh.flush()  # a broken stream keeps every byte that arrived
            if received < size:
                return None
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                path.unlink(missing_ok=True)
                raise UploadRefused("the upload's sha256 does not match its manifest: it was corrupted on the way")
            return data

    def discard(self, task_id: str, fence: int, sha256: str) -> None:
        try:
            self.path(task_id, fence, sha256).unlink(missing_ok=True)
        except UploadRefused:
            pass

    def sweep(self, max_age_s: float = 24 * 3600, live: Callable[[str, int], bool] | None = None,
               grace_s: float = 60.0) -> int:
        """Remove parts untouched for ``max_age_s``, and (given ``live(task, fence)``, whether
        that lease still holds) parts of leases that ended, once untouched for ``grace_s``;
        returns how many."""
        removed = 0
        now = time.time()
        for part in self.root.glob("*.part") if self.root.exists() else ():
            try:
                age = now - part.stat().st_mtime
                lease = _lease_of(part.name)
                ended = live is not None and age > grace_s and (lease is None or not live(*lease))
                if age > max_age_s or ended:
                    part.unlink()
                    removed += 1
            except OSError:
                pass
        return removed

    def held_bytes(self) -> int:
        """Bytes of every part held now."""
        total = 0
        for part in self.root.glob("*.part") if self.root.exists() else ():
            try:
                total += part.stat().st_size
            except OSError:
                pass
        return total


class Sweeper:
    """:meth:`PartialUploads.sweep` every ``every_s`` on a thread of its own until :meth:`stop`."""

    def __init__(self, uploads: PartialUploads, live: Callable[[str, int], bool], every_s: float,
                 max_age_s: float, grace_s: float = 60.0) -> None:
        self.uploads, self.live, self.every_s = uploads, live, every_s
        self.max_age_s, self.grace_s = max_age_s, grace_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uploads-sweep", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                swept = self.uploads.sweep(self.max_age_s, self.live, self.grace_s)
                if swept:
                    log.info("removed %d partial uploads of leases that ended or were abandoned", swept)
            except Exception:  # noqa: BLE001  (Redis away, a file gone: the next round tries again)
                log.exception("sweeping partial uploads failed")
            if self._stopping.wait(self.every_s):
                return

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)


def _lease_of(name: str) -> tuple[str, int] | None:
    """(task, fence) of a part's file name, None when it is not one of ours."""
    try:
        task_id, fence, rest = name.rsplit("-", 2)
        return (task_id, int(fence)) if rest.endswith(".part") and _SHA.match(rest[:-5]) else None
    except ValueError:
        return None
