"""Bytes straight to and from an object store, by the presigned URLs the coordinator hands out.

When the coordinator's blob store is S3-compatible, a pull's header, a shard fetch and an upload
name URLs instead of carrying bytes: a GET for one blob (read from any byte on with Range, so a
broken transfer resumes) or a PUT for one upload object, each signed for that object alone and
only for a while. Whoever holds the URL needs no credentials, and the coordinator's process never
touches the bytes. The callers check every byte's sha256 as they would over gRPC.

Plain HTTP(S) from the standard library: nothing to install on a volunteer's machine.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

CHUNK = 1 << 20
TIMEOUT_S = 60.0  # per socket operation: a stalled store is a broken try, resumed by the caller


class DirectError(RuntimeError):
    """A transfer with the store broke off or was refused (an expired URL reads 403)."""


def get(url: str, start: int = 0, chunk: int = CHUNK, timeout: float = TIMEOUT_S) -> Iterator[bytes]:
    """The object's bytes from ``start`` on, a block at a time."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # a URL the coordinator signed
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # nothing left after start: the file was already whole
            return
        raise DirectError(f"the object store answered {exc.code} {exc.reason}") from None
    except OSError as exc:
        raise DirectError(f"cannot reach the object store ({exc})") from None
    with response:
        if start and response.status != 206:
            raise DirectError("the object store ignored the byte range asked for")
        try:
            while block := response.read(chunk):
                yield block
        except OSError as exc:
            raise DirectError(f"the download broke off ({exc})") from None


def get_all(url: str, sha256: str, size: int, limit: int) -> bytes:
    """The whole object, checked against its ``size`` and ``sha256``."""
    if size > limit:
        raise DirectError(f"the object is {size} bytes; at most {limit} are expected")
    data = b"".join(get(url))
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
        raise DirectError("the object store's copy does not match its sha256")
    return data


def put(url: str, data: bytes, timeout: float = TIMEOUT_S, pace: Callable[[int], object] | None = None) -> None:
    """PUT ``data`` as the URL's object. ``pace(n)`` is called once per chunk before it is sent
    (an upload limit waits there)."""
    def body() -> Iterator[bytes]:
        for i in range(0, len(data), CHUNK):
            if pace is not None:
                pace(len(data[i : i + CHUNK]))
            yield data[i : i + CHUNK]

    request = urllib.request.Request(url, data=body() if pace is not None else data, method="PUT")
    request.add_header("Content-Length", str(len(data)))
    request.add_header("Content-Type", "")  # signed URLs name no content type
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except urllib.error.HTTPError as exc:
        raise DirectError(f"the object store refused the upload: {exc.code} {exc.reason}") from None
    except OSError as exc:
        raise DirectError(f"the upload to the object store broke off ({exc})") from None
