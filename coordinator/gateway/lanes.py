"""Lanes: the capacity an asyncio gateway gives each class of call, so one class cannot take another's.

The gRPC server runs on one event loop; a call that waits (a long-poll, a Watch between two
looks at the ledger, a client's next chunk) holds no thread. The domain's calls are synchronous
(Redis, tensors, files): they run in a thread pool of their lane's own:

* ``beats``: Heartbeat, Register, ReportRun, UploadOffset. Never refused, never behind a
  stream: no stream runs a single step in this lane's threads.
* ``calls``: every other short call (Status, Stats, the admin's, the long-poll's looks at the
  inbox, the token look-ups of calls outside ``beats``).
* ``streams``: Watch, Pull, FetchShard, Submit, Upload. Each kind has its own limit on streams
  held at once (an asyncio semaphore); past it the caller is told so at once
  (RESOURCE_EXHAUSTED with a sentence), except an Upload: a volunteer that finished a unit
  should not see an error because a thousand others finished theirs in the same second, so an
  Upload past the limit waits for a slot (``Limits.queue_s``, at most ``QUEUE_DEPTH`` waiting
  per slot: what a waiting stream holds is its HTTP/2 window, so the queue is bounded in
  memory too) and only then is refused, with a time to try again (``retry_after_s``, sent as
  the trailer ``RETRY_AFTER``: the worker's uploader waits that long, jittered). One caller
  holds at most a quarter of a kind's slots (``Limits.caller_share``), so that no one volunteer
  can take a kind from the rest. Submit and Upload read the client's chunks in a thread (the
  domain consumes them as an iterator), so this lane has a thread for each of them it admits,
  plus some for the short steps of the others.

One :class:`Lanes` per server, made on its loop (coordinator.gateway.aio_server).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from coordinator.errors import LimitReached
from coordinator.settings import Settings
from nomoat.client import RETRY_AFTER  # noqa: F401  (the trailer's name, shared with the client)

T = TypeVar("T")

QUEUE_DEPTH = 4  # streams of a queued kind that may wait, per slot of that kind
RETRY_AFTER_S = 5.0  # what a refusal for capacity tells the caller to wait (the trailer RETRY_AFTER)

BEATS, CALLS, STREAMS = "beats", "calls", "streams"

# Which lane each method's synchronous work runs in (by method name, as in the proto).
LANE_OF: dict[str, str] = {
    "Heartbeat": BEATS, "Register": BEATS, "ReportRun": BEATS, "UploadOffset": BEATS,
    "Watch": STREAMS, "Pull": STREAMS, "FetchShard": STREAMS, "Submit": STREAMS, "Upload": STREAMS,
}


@dataclass(frozen=True)
class Limits:
    """Threads per lane and streams of each kind one gateway holds at once."""

    beat_threads: int = 8
    call_threads: int = 16
    step_threads: int = 8  # the short steps of Watch, Pull and FetchShard
    streams: dict[str, int] = field(default_factory=lambda: {
        "Watch": 512, "Pull": 32, "FetchShard": 64, "Submit": 8, "Upload": 32,
    })
    caller_share: float = 0.25  # of each kind's streams, the most one caller holds at once (at least one)
    # How long a stream of each kind past its limit waits for a slot before it is refused (kinds
    # not named: refused at once).
    queue_s: dict[str, float] = field(default_factory=lambda: {"Upload": 30.0})

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(streams={
            "Watch": settings.max_watch_streams, "Pull": settings.max_pull_streams,
            "FetchShard": settings.max_shard_streams, "Submit": settings.max_submit_streams,
            "Upload": settings.max_upload_streams,
        }, caller_share=settings.stream_share_per_caller)


class _Gone(grpc.RpcError):
    """The client went away while the domain was reading its stream (see :class:`SyncRequests`)."""


class SyncRequests:
    """A client's request stream (an async iterator on the loop) as a plain iterator for a thread.

    Each ``next()`` waits on the loop for the client's next message. :meth:`close` (the call was
    cancelled) makes the waiting ``next()`` and every later one raise a ``grpc.RpcError``, which the
    domain treats as a stream that broke off.
    """

    def __init__(self, requests: AsyncIterator, loop: asyncio.AbstractEventLoop) -> None:
        self._requests = requests
        self._loop = loop
        self._pending: concurrent.futures.Future | None = None
        self._closed = threading.Event()

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self._closed.is_set():
            raise _Gone()
        self._pending = asyncio.run_coroutine_threadsafe(self._requests.__anext__(), self._loop)
        try:
            return self._pending.result()
        except StopAsyncIteration:
            raise StopIteration from None
        except concurrent.futures.CancelledError:
            raise _Gone() from None

    def close(self) -> None:
        self._closed.set()
        if self._pending is not None:
            self._pending.cancel()


class Lanes:
    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        uploads = self.limits.streams.get("Upload", 0) + self.limits.streams.get("Submit", 0)
        self._pools = {
            BEATS: concurrent.futures.ThreadPoolExecutor(self.limits.beat_threads, thread_name_prefix="rpc-beat"),
            CALLS: concurrent.futures.ThreadPoolExecutor(self.limits.call_threads, thread_name_prefix="rpc-call"),
            STREAMS: concurrent.futures.ThreadPoolExecutor(self.limits.step_threads + uploads,
                                                           thread_name_prefix="rpc-stream"),
        }
        # Made lazily, on the loop that uses them; the slots each caller holds (touched on the loop only).
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._held: dict[tuple[str, str | None], int] = {}
        self._waiting: dict[str, int] = {}  # streams of each kind waiting for a slot now

    async def run(self, lane: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in ``lane``'s threads; the loop goes on meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._pools[lane], fn, *args)

    def waiting(self, kind: str) -> int:
        """Streams of ``kind`` waiting for a slot now."""
        return self._waiting.get(kind, 0)

    def for_method(self, method: str) -> str:
        return LANE_OF.get(method.rsplit("/", 1)[-1], CALLS)

    @contextlib.asynccontextmanager
    async def stream(self, kind: str, owner: str | None = None):
        """Hold one of ``kind``'s stream slots for the block; LimitReached when none is free, or
        when ``owner`` (the caller's identity, coordinator.gateway.quotas.owner_of; None: the
        operator's) already holds its share of them (:meth:`share`)."""
        limit = self.limits.streams.get(kind, 0)
        if limit <= 0:
            yield
            return
        slots = self._slots.get(kind)
        if slots is None:
            slots = self._slots[kind] = asyncio.Semaphore(limit)
        held = self._held.get((kind, owner), 0)
        if owner is not None and held >= self.share(kind):
            raise LimitReached(f"you already hold {held} {kind} streams, the most one caller may hold of the "
                               f"{limit} this coordinator serves at once: wait for one of yours to end")
        if slots.locked():
            await self._wait_for_slot(kind, slots, limit)  # queued kinds wait; the others: LimitReached
        else:
            await slots.acquire()  # free: taken at once (no await point between the look and the take)
        self._held[(kind, owner)] = self._held.get((kind, owner), 0) + 1
        try:
            yield
        finally:
            slots.release()
            self._held[(kind, owner)] -= 1
            if not self._held[(kind, owner)]:
                del self._held[(kind, owner)]

    def share(self, kind: str) -> int:
        """How many of ``kind``'s slots one caller may hold: ``caller_share`` of them, at least one.
        Without it one caller (a volunteer's slow reads of 32 pulls) takes a whole kind from everyone."""
        return max(1, int(self.limits.streams.get(kind, 0) * self.limits.caller_share))

    async def _wait_for_slot(self, kind: str, slots: asyncio.Semaphore, limit: int) -> None:
        """Take one of ``kind``'s slots, waiting in its queue when it has one with room; LimitReached else."""
        wait_s = self.limits.queue_s.get(kind, 0.0)
        waiting = self._waiting.get(kind, 0)
        if wait_s <= 0:
            raise LimitReached(f"this coordinator is serving as many {kind} streams as it takes ({limit}); "
                               f"try again in a minute", retry_after_s=60.0)
        if waiting >= limit * QUEUE_DEPTH:
            raise LimitReached(f"this coordinator is receiving as many {kind}s as it takes ({limit}, and "
                               f"{waiting} waiting); try again in {RETRY_AFTER_S:.0f} s", retry_after_s=RETRY_AFTER_S)
        self._waiting[kind] = waiting + 1
        try:
            await asyncio.wait_for(slots.acquire(), wait_s)
        except asyncio.TimeoutError:
            raise LimitReached(f"this coordinator is receiving as many {kind}s as it takes ({limit}) and none "
                               f"ended within {wait_s:.0f} s; try again in {RETRY_AFTER_S:.0f} s",
                               retry_after_s=RETRY_AFTER_S) from None
        finally:
            self._waiting[kind] -= 1

    async def steps(self, iterator: Iterator[T]) -> AsyncIterator[T]:
        """A synchronous generator's items, each ``next()`` run in the streams lane."""
        done = object()
        while True:
            item = await self.run(STREAMS, next, iterator, done)
            if item is done:
                return
            yield item

    async def consume(self, requests: AsyncIterator, fn: Callable[[Iterator], T]) -> T:
        """``fn(messages)`` in the streams lane, where ``messages`` iterates the client's stream."""
        bridge = SyncRequests(requests, asyncio.get_running_loop())
        try:
            return await self.run(STREAMS, fn, bridge)
        finally:
            bridge.close()  # cancelled or done: a thread still reading stops at its next message

    def shutdown(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
