"""Pull's wire framing: a file's block as ``PullChunk(file=FileChunk(path, offset, data))``.

:func:`file_chunk` builds the message's bytes with one copy of the block (building the protobuf
message and serializing it copied them twice and ran at a third of loopback speed);
:func:`decode` reads one back with the block's bytes as a memoryview into the received message,
so they reach the file and the hash with no copy at all. Both are the protobuf wire format,
tested against the protobuf library (tests/test_transfer.py); anything else a protobuf library
may have written is parsed by the library.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from nomoat.v1 import nomoat_pb2 as pb


class PullError(RuntimeError):
    """A pull that cannot go on (the caller turns it into a user's sentence)."""


_FILE_TAG = b"\x12"  # PullChunk.file: field 2, length-delimited
_DATA_TAG = b"\x1a"  # FileChunk.data: field 3, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def file_chunk(path: str, offset: int, data: bytes) -> bytes:
    """The wire bytes of ``PullChunk(file=FileChunk(path, offset, data))``, with one copy of data."""
    head = pb.FileChunk(path=path, offset=offset).SerializeToString() + _DATA_TAG + _varint(len(data))
    return b"".join((_FILE_TAG, _varint(len(head) + len(data)), head, data))


def serialize(message: pb.PullChunk | bytes) -> bytes:
    """Pull's response serializer: a header message, or a chunk already framed by :func:`file_chunk`."""
    return message if isinstance(message, bytes) else message.SerializeToString()


@dataclass(frozen=True)
class Block:
    path: str
    offset: int
    data: memoryview


def _read_varint(view: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _file_block(view: memoryview) -> Block | None:
    """A FileChunk's fields, its data a view into ``view``; None for what this does not read."""
    path, offset, data, i = "", 0, view[0:0], 0
    while i < len(view):
        key, i = _read_varint(view, i)
        field, kind = key >> 3, key & 7
        if kind == 0:
            value, i = _read_varint(view, i)
            if field == 2:
                offset = value
        elif kind == 2:
            length, i = _read_varint(view, i)
            value = view[i : i + length]
            i += length
            if field == 1:
                path = bytes(value).decode()
            elif field == 3:
                data = value
        else:
            return None
    return Block(path, offset, data) if i == len(view) else None


def decode(raw: bytes) -> pb.PullHeader | Block:
    """One PullChunk off the wire; PullError when it is not one."""
    view = memoryview(raw)
    try:
        if raw[:1] == _FILE_TAG:
            length, start = _read_varint(view, 1)
            block = _file_block(view[start:]) if start + length == len(raw) else None
            if block is not None:
                return block
        chunk = pb.PullChunk.FromString(raw)  # anything else a protobuf library may have written
    except (IndexError, UnicodeDecodeError, DecodeError):
        raise PullError("the coordinator's pull stream was malformed") from None
    if chunk.HasField("header"):
        return chunk.header
    if chunk.HasField("file"):
        return Block(chunk.file.path, chunk.file.offset, memoryview(chunk.file.data))
    raise PullError("the coordinator's pull stream was malformed")
