"""Presigned objects fetched fast: byte ranges in parallel threads, each file hashed as it arrives.

A pull from an object store (``FileEntry.url``, see :mod:`nomoat.direct`) is limited by one
connection's rate and by the client's sha256 of every byte. Both are spread here:

- **Ranges in parallel.** Every file still missing is cut into ``range_size`` ranges, and
  ``threads`` threads take them in order (file by file), each GETting its range with one
  request (``Range: bytes=a-b``) straight into a buffer of its own (``readinto``, no copies) and
  writing it at its offset (``os.pwrite``, one large write). Socket reads, writes and sha256
  release the GIL, so the threads really overlap.
- **Hashed while downloading, in order, once.** sha256 cannot be split, so a file's ranges are
  hashed in their order by whichever thread completes the range that is next: the bytes are
  still in memory (no second pass over the file) and the hashing of one range overlaps the
  downloads of the following ones. Ranges that arrive ahead wait in memory; at most ``window``
  ranges are taken and not yet hashed, which bounds memory at ``window * range_size``.
- **Resumable.** A file's hashed prefix is what a try keeps: when a range fails, every thread
  stops taking new ones, each file is cut back to its hashed prefix, and the error goes to the
  caller, whose next try asks again from there (:mod:`nomoat.transfer`).
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nomoat.direct import TIMEOUT_S, DirectError

# 8 x 4 MiB, not 4 x 8 MiB: on 2 shared cores the pull of 77 MB took 0.51-0.61 s against 0.62-0.79 s
# while plain GETs did not get faster (bench/README.md, Session 7).
THREADS = 8  # ranges in flight: enough to hide one connection's latency and the hashing
RANGE = 4 << 20  # bytes a range: one request, one write, one sha256 update
WINDOW = 3 * THREADS  # ranges taken and not yet hashed, at most (memory: WINDOW * RANGE)


@dataclass(eq=False)
class Target:
    """One file to complete: ``fd`` open for writing and holding ``start`` bytes already, which
    ``digest`` (a hashlib object) has taken in; the bytes from ``start`` to ``size`` come from
    ``url``. ``hashed`` ends as the length of the prefix that is written and hashed."""

    url: str
    size: int
    start: int
    fd: int
    digest: Any
    hashed: int = 0
    _waiting: dict[int, memoryview] = field(default_factory=dict)  # offset -> bytes ahead of `hashed`
    _hashing: bool = False

    def __post_init__(self) -> None:
        self.hashed = self.start


def ranges(size: int, start: int, range_size: int) -> Iterator[tuple[int, int]]:
    """The (first, end) byte ranges of ``size`` bytes from ``start`` on, ``range_size`` each."""
    for first in range(start, size, range_size):
        yield first, min(first + range_size, size)


def get_range(url: str, first: int, end: int, into: memoryview, timeout: float = TIMEOUT_S) -> None:
    """Bytes ``first`` to ``end`` (exclusive) of the object at ``url``, read into ``into``."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={first}-{end - 1}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # a URL the coordinator signed
            if response.status != 206 and (first or end != int(response.headers.get("Content-Length", -1))):
                raise DirectError("the object store ignored the byte range asked for")
            got = 0
            while got < end - first:
                n = response.readinto(into[got : end - first])
                if not n:
                    raise DirectError(f"the download broke off {end - first - got} bytes short")
                got += n
    except urllib.error.HTTPError as exc:
        raise DirectError(f"the object store answered {exc.code} {exc.reason}") from None
    except OSError as exc:
        raise DirectError(f"the download broke off ({exc})") from None


class _Run:
    """One fetch of several targets: the shared queue of ranges, the window, the first error."""

    def __init__(self, targets: list[Target], range_size: int, window: int,
                 on_bytes: Callable[[int], object] | None, on_done: Callable[[Target], object] | None) -> None:
        self.work = iter([(t, a, b) for t in targets for a, b in ranges(t.size, t.start, range_size)])
        self.window, self.taken = window, 0
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.on_bytes, self.on_done = on_bytes, on_done
        self.report = threading.Lock()  # a progress display is not thread-safe

    def next(self) -> tuple[Target, int, int] | None:
        with self.cond:
            while self.taken >= self.window and self.error is None:
                self.cond.wait()
            if self.error is not None:
                return None
            item = next(self.work, None)
            if item is not None:
                self.taken += 1
            return item

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            self.cond.notify_all()

    def worker(self, fetch: Callable[[str, int, int, memoryview], None]) -> None:
        while (item := self.next()) is not None:
            target, first, end = item
            try:
                view = memoryview(bytearray(end - first))
                fetch(target.url, first, end, view)
                os.pwrite(target.fd, view, first)
                if self.on_bytes is not None:
                    with self.report:
                        self.on_bytes(end - first)
                self.hash(target, first, view)
            except BaseException as exc:  # noqa: BLE001  (handed to the caller's thread)
                self.fail(exc)
                return

    def hash(self, target: Target, first: int, view: memoryview) -> None:
        """Hand a written range to its file's hash; the thread that finds the next range in order
        hashes it and every one already waiting after it (one hasher per file at a time)."""
        with self.cond:
            target._waiting[first] = view
            if target._hashing:
                return
            target._hashing = True
        while True:
            with self.cond:
                block = target._waiting.pop(target.hashed, None)
                if block is None:
                    target._hashing = False
                    return
            target.digest.update(block)  # outside the lock: other ranges download meanwhile
            with self.cond:
                target.hashed += len(block)
                self.taken -= 1
                self.cond.notify_all()
                whole = target.hashed == target.size
            if whole and self.on_done is not None:
                with self.report:
                    self.on_done(target)


def download(targets: list[Target], *, threads: int = THREADS, range_size: int = RANGE, window: int = WINDOW,
             on_bytes: Callable[[int], object] | None = None, on_done: Callable[[Target], object] | None = None,
             fetch: Callable[[str, int, int, memoryview], None] = get_range) -> None:
    """Complete every target (see the module docstring); ``on_bytes(n)`` as ranges land,
    ``on_done(target)`` as a file's last byte is hashed. On the first error every file is cut back
    to its hashed prefix and the error is raised (a :class:`DirectError` for a broken transfer)."""
    run = _Run([t for t in targets if t.start < t.size], range_size, max(window, threads), on_bytes, on_done)
    pool = [threading.Thread(target=run.worker, args=(fetch,), name=f"fetch-{i}", daemon=True)
            for i in range(max(1, threads))]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if run.error is not None:
        for target in targets:
            target._waiting.clear()
            os.ftruncate(target.fd, target.hashed)  # what is kept is what is hashed: a retry resumes there
        raise run.error
