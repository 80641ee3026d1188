"""A task's shard read from the job's records by byte range, streamed, never the whole blob.

A job's records are one JSON-lines blob (coordinator.schedule.submit); a task trains on the
records [start, end). Beside the blob the job keeps an index: the byte offset of every line's
start and of the blob's end, as little-endian uint64s (``OFFSET`` bytes each). A shard is then
two 8-byte reads of the index and one range of the records, sent in chunks: what a shard
fetch holds in memory does not grow with the job. A job recorded before there was an index is
read line by line (memory of one record; the reading still scans the blob).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from coordinator.model.store import CHUNK, BlobStore

OFFSET = 8  # bytes per offset in the index
_FORMAT = "<Q"


def index_of(lines: Iterable[bytes]) -> bytes:
    """The index of a records blob made of ``lines`` (each with its newline)."""
    offsets, at = [0], 0
    for line in lines:
        at += len(line)
        offsets.append(at)
    return struct.pack(f"<{len(offsets)}Q", *offsets)


def _offset(store: BlobStore, index: str, line: int) -> int:
    raw = b"".join(store.read_range(index, line * OFFSET, OFFSET))
    if len(raw) != OFFSET:
        raise ValueError(f"the records index has no entry {line}")
    return struct.unpack(_FORMAT, raw)[0]


def byte_range(store: BlobStore, index: str, start: int, end: int) -> tuple[int, int]:
    """(offset, length) in the records blob of the records [start, end)."""
    first = _offset(store, index, start)
    return first, _offset(store, index, end) - first


def shard(store: BlobStore, records: str, index: str, start: int, end: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """The bytes of the records [start, end) of the blob ``records``, ``chunk`` at a time."""
    if index:
        offset, length = byte_range(store, index, start, end)
        yield from store.read_range(records, offset, length, chunk)
        return
    yield from _scan(store, records, start, end, chunk)


def _scan(store: BlobStore, records: str, start: int, end: int, chunk: int) -> Iterator[bytes]:
    # Lines end at b"\n" only (json.dumps(ensure_ascii=False) may leave U+2028 inside a record).
    out = bytearray()
    with open(store.path(records), "rb") as fh:
        for number, line in enumerate(fh):
            if number >= end:
                break
            if number >= start:
                out += line
                if len(out) >= chunk:
                    yield bytes(out)
                    out.clear()
    if out:
        yield bytes(out)
