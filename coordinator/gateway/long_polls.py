"""Long-polls for work that hold no thread: a worker's RequestWork waits on the event loop.

A poll looks at its worker's inbox (a short call in the ``calls`` lane), then waits on an asyncio
event until the scheduler places a run there: the placement publishes the worker's id
(coordinator.ledger.inbox, keys.INBOX_WAKE), one subscription per gateway (a thread of its own)
wakes the polls waiting on it. A message lost to a reconnection costs at most ``RECHECK_S``: a
poll looks again that often regardless. So 10,000 waiting volunteers cost a gateway no thread
and Redis about 10,000 / RECHECK_S short looks per second, not a blocked connection each.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import redis

from coordinator.gateway.auth import Identity
from coordinator.gateway.lanes import CALLS, Lanes
from coordinator.ledger import Ledger
from coordinator.schedule import inbox_dispatch
from coordinator.schedule.inbox_dispatch import LongPolls, Work
from coordinator.settings import Settings

log = logging.getLogger("nomoat.long_polls")
RECHECK_S = 5.0  # a waiting poll looks at its inbox at least this often (a wake-up may be lost)


class Wakeups:
    """The polls waiting on this gateway, by worker id, woken from the ledger's channel."""

    def __init__(self, ledger: Ledger, loop: asyncio.AbstractEventLoop) -> None:
        self.ledger = ledger
        self.loop = loop
        self._waiting: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="inbox-wakeups", daemon=True)
        self._thread.start()

    def register(self, worker_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._waiting[worker_id].add(event)
        return event

    def unregister(self, worker_id: str, event: asyncio.Event) -> None:
        events = self._waiting.get(worker_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._waiting[worker_id]

    def _wake(self, worker_id: str) -> None:  # on the loop
        for event in self._waiting.get(worker_id, ()):
            event.set()

    def _listen(self) -> None:
        sub = None
        while not self._stopping.is_set():
            try:
                if sub is None:
                    sub = self.ledger.inbox.wakeups()
                message = sub.get_message(timeout=1.0)
                if message and message.get("type") == "message":
                    worker_id = message["data"].decode() if isinstance(message["data"], bytes) else message["data"]
                    self.loop.call_soon_threadsafe(self._wake, worker_id)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                sub = None  # polls fall back on RECHECK_S until it is back
                self._stopping.wait(1.0)
            except RuntimeError:  # the loop closed under us: the server is stopping
                return
        if sub is not None:
            try:
                sub.close()
            except Exception:  # noqa: BLE001  (closing at shutdown; nothing to do about it)
                pass

    def stop(self) -> None:
        self._stopping.set()


async def request_work(lanes: Lanes, wakeups: Wakeups, polls: LongPolls, ledger: Ledger, settings: Settings,
                       identity: Callable[[], Identity], worker_id: str, wait_s: float) -> Work:
    """What coordinator.schedule.inbox_dispatch.request_work answers, waiting on the loop.

    ``identity`` is called in a lane's thread (it may read the ledger)."""
    def first_look() -> Work | None:
        return inbox_dispatch.first_look(ledger, identity(), worker_id)

    wait = max(0.0, min(wait_s, settings.long_poll_s))
    held = wait > 0 and polls.acquire()
    if not held:
        got = await lanes.run(CALLS, first_look)
        return got if got is not None else await lanes.run(CALLS, inbox_dispatch.poll_later, ledger, settings)
    event = wakeups.register(worker_id)
    try:
        end = time.monotonic() + wait
        got = await lanes.run(CALLS, first_look)
        while got is None:
            left = end - time.monotonic()
            if left <= 0:
                return Work()  # waited the whole poll: ask again at once
            try:
                await asyncio.wait_for(event.wait(), timeout=min(left, RECHECK_S))
            except asyncio.TimeoutError:
                pass
            event.clear()
            got = await lanes.run(CALLS, inbox_dispatch.take, ledger, worker_id)
        return got
    finally:
        wakeups.unregister(worker_id, event)
        polls.release()
