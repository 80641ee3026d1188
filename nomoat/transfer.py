"""Pull transfer: a model folder streamed into place, resumable, checked, shown as it goes.

The receiving end of ``Models.Pull``; ``nomoat pull`` and the worker cache both come here
through :meth:`nomoat.client.CoordinatorClient.pull`. Read top to bottom:

- **Framing** (:mod:`nomoat.framing`). A chunk of a file goes over the wire as a
  ``PullChunk(file=FileChunk(...))`` framed with one copy of its bytes, and is read back as a
  memoryview into the received message, so its bytes reach the file and the hash with no copy.
- **Partial folder** (:mod:`nomoat.partial`). Files land in ``.<name>.partial`` beside the
  target, with a state file naming the lineage, version and every file's sha256 and size as the
  header announced them. A pull that breaks off leaves it behind; the next try (this call
  retrying with backoff, or the same command run again) asks for each file from the byte it
  holds (``PullRequest.resume``), and the coordinator sends from there only a file that is still
  the same (same sha256). A version that changed meanwhile (the newest moved on, or the
  coordinator's lineage changed) is seen in the header: the files that changed start over, those
  that did not are kept.
- **Checking.** Every file's sha256 is computed as it is written (the kept prefix is read back
  once, then the new bytes follow), and checked when its last byte lands: no file is read twice,
  and a damaged prefix (a disk that lost the tail of a write) is found and fetched again whole.
- **Pipeline.** Writing and hashing run in a thread beside the one receiving, through a queue of
  a few chunks, so memory stays bounded however large a shard is, and the two overlap.
- **Straight from the store.** When the coordinator's blob store is an object store, the header
  names each file's presigned URL (``FileEntry.url``) and the stream carries no bytes: each file
  is fetched from the byte it holds by HTTP Range GETs, several ranges at once in threads, each
  file hashed in order as its ranges land (:mod:`nomoat.fetch`), then checked like a streamed
  one. A URL that expired mid-pull is a broken try: the next asks again.
- **Commit.** When every file checks out the folder gets its stamp
  (:data:`nomoat.lineage.STAMP`) and is renamed into place: the target is never half-written.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import grpc

from nomoat import direct, fetch
from nomoat.framing import Block, PullError, decode
from nomoat.lineage import STAMP
from nomoat.partial import STATE, Partial
from nomoat.v1 import nomoat_pb2 as pb

log = logging.getLogger("nomoat.pull")

_QUEUE = 4  # chunks between the receiving thread and the writing one
_READ = 1 << 20  # block size when hashing a kept prefix back


class _Retry(Exception):
    """This try broke off but another may finish it (the partial folder keeps what arrived)."""


# -- what the person sees ---------------------------------------------------------------------


class Progress(Protocol):
    """What a pull reports as it goes (nomoat.progress.PullBar draws it for the CLI)."""

    def start(self, header: pb.PullHeader, held: int, note: str) -> None:
        """The header arrived; ``held`` bytes of it are here from an earlier try."""

    def advance(self, n: int) -> None:
        """``n`` more bytes arrived."""

    def file_done(self, path: str, size: int) -> None:
        """A file is whole and checked (called from the writing thread)."""

    def retry(self, reason: str, delay: float) -> None:
        """The stream broke off (``reason``); the pull resumes in ``delay`` seconds."""

    def finish(self, header: pb.PullHeader) -> None:
        """Every file is in place."""


class Quiet:
    """No display; retries go to the log (workers, scripts)."""

    def start(self, header: pb.PullHeader, held: int, note: str) -> None:
        if note:
            log.warning("%s", note)

    def advance(self, n: int) -> None:
        pass

    def file_done(self, path: str, size: int) -> None:
        pass

    def retry(self, reason: str, delay: float) -> None:
        log.warning("the pull broke off (%s); resuming in %.1f s", reason, delay)

    def finish(self, header: pb.PullHeader) -> None:
        pass


# -- one try ----------------------------------------------------------------------------------


class _File:
    """One file of the pull: accounted for in the receiving thread, written and hashed in the
    writing one, checked once both are done."""

    def __init__(self, path: Path, entry: pb.FileEntry, on_done: Callable[[str, int], None]) -> None:
        self.path, self.entry, self.on_done = path, entry, on_done
        self.received = entry.offset  # the receiving thread's: bytes of the file so far
        self.fh = None  # the writing thread's, as are the two below
        self.digest = None
        self.sha256 = ""  # set once every byte is written and hashed

    def take(self, block: Block) -> bool:
        """Account for a block (the caller's thread); whether it is the file's last."""
        if block.offset != self.received or self.received + len(block.data) > self.entry.size:
            raise PullError("the coordinator's pull stream was malformed")
        self.received += len(block.data)
        return self.received == self.entry.size

    def store(self, block: Block | None, last: bool) -> None:
        """Write and hash a block (the writing thread); the file's last closes and digests it."""
        if self.fh is None:
            self._open()
        if block is not None:
            self.fh.write(block.data)
            self.digest.update(block.data)  # while the bytes are still in this core's cache
        if last:
            self.fh.close()
            self.sha256 = self.digest.hexdigest()
            if self.sha256 == self.entry.sha256:
                self.on_done(self.entry.path, self.entry.size)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.digest = hashlib.sha256()
        self.fh = open(self.path, "r+b" if self.entry.offset else "wb")  # noqa: SIM115  (closed in store/close)
        if self.entry.offset:  # the kept prefix: read back once, so the whole file's sha256 is known
            buf = bytearray(_READ)
            view, left = memoryview(buf), self.entry.offset
            while left:
                n = self.fh.readinto(view[: min(left, _READ)])
                if not n:
                    break
                self.digest.update(view[:n])
                left -= n
            self.fh.seek(self.entry.offset)
            self.fh.truncate()

    def check(self) -> None:
        """After the stream (the writer stopped): the whole file is here and is the one named."""
        if self.received < self.entry.size:
            raise _Retry(f"the stream ended {self.entry.size - self.received} bytes short of {self.entry.path}")
        if not self.sha256:  # no block came: an empty file, or one held whole from an earlier try
            self.store(None, True)
        if self.sha256 == self.entry.sha256:
            return
        self.path.unlink(missing_ok=True)
        if self.entry.offset:
            raise _Retry(f"the part of {self.entry.path} kept from an earlier try was damaged; "
                         "fetching it again from the start")
        raise PullError(f"{self.entry.path} arrived damaged (sha256 mismatch); pull again")

    def close(self) -> None:
        if self.fh is not None and not self.fh.closed:
            self.fh.close()  # a try broken off: the bytes written so far stay for the next


class _Writer:
    """The thread that writes and hashes each block while the caller's receives the next; a short
    queue between them keeps memory bounded however large the file.

    One thread for both, not one each: on two busy cores (bench/pull.py) a block handed to a
    third thread cost more than the overlap gained, and hashing a block just written finds it in
    the core's cache.
    """

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue(_QUEUE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="pull-writer", daemon=True)
        self.thread.start()

    def put(self, item: tuple[_File, Block, bool]) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    item[0].store(item[1], item[2])
                except BaseException as exc:  # noqa: BLE001  (handed to the receiving thread)
                    self.error = exc

    def close(self) -> None:
        """Finish what is queued (a broken-off try keeps every byte that arrived), then stop."""
        self.queue.put(None)
        self.thread.join()


def _check_header(header: pb.PullHeader, partial: Partial, asked: dict[str, pb.ResumeFrom], lineage: str,
                  address: str) -> None:
    if lineage and header.lineage != lineage:
        raise PullError(
            f"the coordinator at {address} now serves model lineage {header.lineage or '(none)'}, "
            f"not {lineage}: it was restarted with another data dir or base model, so its version "
            f"{header.version} is not the model this task was given; the task must start again")
    root = partial.dir.resolve()
    for e in header.files:
        target = (root / e.path).resolve()
        if root not in target.parents or e.path in (STAMP, STATE):
            raise PullError(f"the coordinator sent an unsafe file name {e.path!r}")
        if e.url and not e.url.startswith(("https://", "http://")):
            raise PullError(f"the coordinator sent an unusable download address for {e.path!r}")
        point = asked.get(e.path)
        if e.offset and (point is None or point.offset != e.offset or point.sha256 != e.sha256
                         or e.offset > e.size):
            raise PullError("the coordinator's pull stream was malformed")


def _receive(stream: Iterable[bytes], partial: Partial, request: pb.PullRequest, lineage: str, address: str,
             report: Progress) -> pb.PullHeader:
    """One try: the header, then every block written into the partial folder and hashed."""
    chunks = iter(stream)
    first = next(chunks, None)
    if first is None:
        raise PullError("the coordinator sent no model")
    header = decode(first)
    if not isinstance(header, pb.PullHeader):
        raise PullError("the coordinator's pull stream was malformed")
    _check_header(header, partial, {r.path: r for r in request.resume}, lineage, address)
    note = partial.adopt(header, request.format, request.since)
    files = {e.path: _File(partial.dir / e.path, e, report.file_done) for e in header.files}
    report.start(header, sum(e.offset for e in header.files), note)
    writer = _Writer()
    try:
        for raw in chunks:
            block = decode(raw)
            file = files.get(block.path) if isinstance(block, Block) else None
            if file is None:
                raise PullError("the coordinator's pull stream was malformed")
            writer.put((file, block, file.take(block)))
            report.advance(len(block.data))
        _download([f for f in files.values() if f.entry.url and f.received < f.entry.size], report)
    finally:
        writer.close()
        for file in files.values():
            file.close()
    if writer.error is not None:
        raise writer.error
    for file in files.values():
        file.check()
    return header


def _download(pending: list[_File], report: Progress) -> None:
    """The rest of each file from its presigned URL: ranges in parallel threads, each file hashed
    in order as its ranges land (:mod:`nomoat.fetch`), then the same checks as a streamed file."""
    if not pending:
        return
    targets = {}
    for file in pending:
        file._open()  # hashes the prefix kept from an earlier try, as a streamed file does
        targets[file] = fetch.Target(file.entry.url, file.entry.size, file.entry.offset, file.fh.fileno(),
                                     file.digest)

    try:
        fetch.download(list(targets.values()), on_bytes=report.advance)
    except direct.DirectError as exc:
        raise _Retry(str(exc)) from None
    finally:
        for file, target in targets.items():
            file.received = target.hashed  # a broken try keeps its hashed prefix (the rest was cut)
            if target.hashed == file.entry.size:
                file.store(None, True)  # closes the file, takes its digest, reports it done


# -- the whole pull ---------------------------------------------------------------------------

# Codes a broken connection or a restarting coordinator answer with; anything else (not found,
# refused, bad request) is an answer, and trying again would get the same one.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
              grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED}


def _transient(exc: grpc.RpcError) -> bool:
    code = exc.code() if hasattr(exc, "code") else None
    detail = (exc.details() if hasattr(exc, "details") else "") or ""
    return code in _TRANSIENT and "larger than max" not in detail


def pull(call: Callable[[pb.PullRequest], Iterable[bytes]], out: Path, request: pb.PullRequest, *,
         explain: Callable[[grpc.RpcError], Exception], lineage: str = "", address: str = "",
         report: Progress | None = None, patience_s: float = 300.0, backoff_s: float = 0.5,
         max_backoff_s: float = 10.0) -> pb.PullHeader:
    """Pull into ``out``, resuming after every break, until done or ``patience_s`` pass with no
    byte arriving; returns the header of the version written.

    ``call`` opens the stream (raw PullChunk messages); ``explain`` turns a gRPC error into the
    exception the caller raises. A try that breaks off keeps what arrived; a pull given up keeps
    it too, for the same command run again.
    """
    report = report or Quiet()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with Partial(out) as partial:
        failures, last_progress = 0, time.monotonic()
        while True:
            del request.resume[:]
            request.resume.extend(partial.resume_points(request.format, request.since))
            held = sum(r.offset for r in request.resume)
            stream = None
            try:
                stream = call(request)
                header = _receive(stream, partial, request, lineage, address, report)
                partial.commit(header)
                report.finish(header)
                return header
            except grpc.RpcError as exc:
                if not _transient(exc):
                    raise explain(exc) from None
                reason = str(explain(exc))
            except _Retry as exc:
                reason = str(exc)
            finally:
                if hasattr(stream, "cancel"):
                    stream.cancel()  # a try given up: the server stops sending now, not at the deadline
            if sum(r.offset for r in partial.resume_points(request.format, request.since)) > held:
                failures, last_progress = 0, time.monotonic()  # it got somewhere: patience starts again
            delay = min(backoff_s * 2 ** failures, max_backoff_s)
            failures += 1
            if time.monotonic() + delay - last_progress > patience_s:
                raise PullError(f"{reason}; no byte arrived for {patience_s:.0f} s, so the pull stops here. "
                                f"What arrived is kept in {partial.dir}: run the same pull again to resume")
            report.retry(reason, delay)
            time.sleep(delay)
