"""Every caller's share at the gateway: whose share a call counts against, and streams open at once.

A gateway's own limits (coordinator.gateway.lanes) protect the gateway; these protect everyone
from one caller, across every gateway: they are counted in the ledger (coordinator.ledger.quotas)
and keyed on the caller's identity id (:func:`owner_of`), so a volunteer with its own identity
has its own share (until then, every volunteer of the shared public worker token shares one).
The operator's roles (admin, trusted-worker) are not counted. A refusal is a LimitReached whose sentence
says which share is used up, how much of it is held, and what to do. A submitter's jobs, pending
tasks and bytes a day are checked where a job is submitted (coordinator.ledger.quotas's
``check_submit``/``reserve_submit``, called by coordinator.schedule.submit with :func:`owner_of`'s id).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable

from coordinator.errors import LimitReached
from coordinator.gateway.auth import Identity
from coordinator.gateway.lanes import CALLS, Lanes
from coordinator.ledger import Ledger
from coordinator.settings import Settings

STREAM_TTL_S = 300.0  # a stream's slot is renewed this often's third; a dead gateway's lapse after it


UNCOUNTED_ROLES = frozenset({"admin", "trusted-worker"})  # the operator and its own machines


def owner_of(identity: Identity | None) -> str | None:
    """Whose share a call counts against: the identity's id (its token's hash until identities
    have ids of their own); None for the operator's roles and a caller without identity."""
    if identity is None or identity.role in UNCOUNTED_ROLES:
        return None
    return getattr(identity, "id", "") or identity.token_hash


# -- streams --------------------------------------------------------------------------------------


async def stream_owner(lanes: Lanes, identity: Callable[[], Identity | None]) -> str | None:
    """The caller's :func:`owner_of`; ``identity`` is called in a lane's thread (it may read the ledger)."""
    return owner_of(await lanes.run(CALLS, identity))


@contextlib.asynccontextmanager
async def stream_slot(lanes: Lanes, ledger: Ledger, settings: Settings, owner: str | None) -> AsyncIterator[None]:
    """Hold one of ``owner``'s ``max_streams_per_caller`` stream slots for the block (renewed
    while it lasts); ``owner`` None (the operator's roles) holds none."""
    limit = settings.max_streams_per_caller
    if owner is None or limit <= 0:
        yield
        return
    stream_id = secrets.token_hex(8)
    if not await lanes.run(CALLS, ledger.quotas.open_stream, owner, stream_id, limit, STREAM_TTL_S):
        raise LimitReached(f"your token already holds {limit} streams (watches, pulls, shard fetches, uploads, "
                           f"submits), as many as one caller may hold at once: wait for one to end or close one")

    async def renew() -> None:
        while True:
            await asyncio.sleep(STREAM_TTL_S / 3)
            try:
                await lanes.run(CALLS, ledger.quotas.refresh_stream, owner, stream_id, STREAM_TTL_S)
            except Exception:  # noqa: BLE001  (Redis away: the slot lapses, the stream goes on)
                pass

    renewing = asyncio.create_task(renew())
    try:
        yield
    finally:
        renewing.cancel()
        await lanes.run(CALLS, ledger.quotas.close_stream, owner, stream_id)
