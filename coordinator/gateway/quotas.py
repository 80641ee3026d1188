"""Every caller's share: streams open at once, and a submitter's jobs, pending tasks and bytes a day.

A gateway's own limits (coordinator.gateway.lanes) protect the gateway; these protect everyone
from one caller, across every gateway: they are counted in the ledger (coordinator.ledger.quotas)
and keyed on the caller's identity id (:func:`owner_of`), so a volunteer with its own identity
has its own share (until then, every volunteer of the shared public worker token shares one).
The operator's roles (admin, trusted-worker) are not counted. A refusal is a LimitReached whose sentence
says which share is used up, how much of it is held, and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable

from coordinator.errors import LimitReached
from coordinator.gateway.auth import Identity
from coordinator.gateway.lanes import CALLS, Lanes
from coordinator.ledger import JobState, Ledger
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


# -- submits --------------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _unfinished(ledger: Ledger, owner: str) -> dict[str, int]:
    """The owner's jobs still running (job -> tasks); finished ones are forgotten on the way."""
    held = ledger.quotas.unfinished_jobs(owner)
    for job_id in list(held):
        job = ledger.jobs.get(job_id)
        if job is None or job.state != JobState.RUNNING:
            ledger.quotas.forget_job(owner, job_id)
            del held[job_id]
    return held


def check_submit(ledger: Ledger, settings: Settings, owner: str | None, size: int) -> None:
    """Before a dataset's bytes are read: refuse a submit that cannot fit the owner's share."""
    if owner is None:
        return
    used = ledger.quotas.submitted_today(owner)
    if used + size > settings.max_submit_bytes_per_day:
        raise LimitReached(f"this dataset ({_mib(size)}) and what your token submitted today ({_mib(used)}) pass "
                           f"the {_mib(settings.max_submit_bytes_per_day)} one submitter may send a day: "
                           f"submit it tomorrow (UTC) or ask the operator for more")
    jobs = _unfinished(ledger, owner)
    if len(jobs) >= settings.max_jobs_per_submitter:
        raise LimitReached(f"your token has {len(jobs)} jobs running, as many as one submitter may have: "
                           f"wait for one to finish")


def reserve_submit(ledger: Ledger, settings: Settings, owner: str | None, job_id: str, tasks: int,
                   size: int) -> None:
    """Count a new job against its owner's share, atomically with every other gateway's
    submits; LimitReached (a sentence) when it does not fit. Undo with :func:`release_submit`."""
    if owner is None:
        return
    _unfinished(ledger, owner)
    code, held = ledger.quotas.reserve_submit(owner, job_id, tasks, size, settings.max_jobs_per_submitter,
                                              settings.max_pending_tasks_per_submitter,
                                              settings.max_submit_bytes_per_day)
    if code == 1:
        raise LimitReached(f"your token has {held} jobs running, as many as one submitter may have: "
                           f"wait for one to finish")
    if code == 2:
        raise LimitReached(f"this dataset makes {tasks} tasks and your running jobs hold {held}; one submitter may "
                           f"have {settings.max_pending_tasks_per_submitter} pending: wait for a job to finish "
                           f"or submit a smaller dataset")
    if code == 3:
        raise LimitReached(f"this dataset ({_mib(size)}) and what your token submitted today ({_mib(held)}) pass "
                           f"the {_mib(settings.max_submit_bytes_per_day)} one submitter may send a day: "
                           f"submit it tomorrow (UTC) or ask the operator for more")


def release_submit(ledger: Ledger, owner: str | None, job_id: str, size: int) -> None:
    if owner is not None:
        ledger.quotas.release_submit(owner, job_id, size)
