"""Leases as a worker meets them: who holds one, renewing it, and reading the task's shard.

A task's lease is (task, fence) in the ledger; a run renews it by heartbeat and may read its
shard of the job's records only while it holds it. The ledger decides atomically whether a
fence still holds the lease; this module decides *who* the caller is for that check (the
worker id and token it may act as) and turns the ledger's answers into replies and errors.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import dataclass

from coordinator.gateway.auth import Identity
from coordinator.errors import NotPermitted, WrongState
from coordinator.ledger import Ledger
from coordinator.settings import Settings
from coordinator.model.store import Store
from nomoat.logs import fields

log = logging.getLogger("nomoat.leases")
MAX_EVENT_CHARS = 1000  # a heartbeat's event note, as kept in the ledger


@dataclass(frozen=True)
class Beat:
    """The answer to a heartbeat: the new deadline and the version to train on, or why not."""

    ok: bool
    deadline: float = 0.0
    reason: str = ""
    base_version: int = 0


def holder(ledger: Ledger, identity: Identity, worker_id: str) -> tuple[str, str]:
    """(worker id, token hash) for the lease checks: a worker token acts only for its own tasks.

    Admin is exempt (an empty hash checks nothing). A worker id registered with another token is
    dropped, so no token is seen or credited as another's worker. (Dropped, not refused: in Ray
    mode a task calls with the coordinator's worker token while its worker may have joined with
    a token of its own; its work still counts, only not towards that worker.)
    """
    if identity.role == "admin":
        return worker_id, ""
    if worker_id:
        registered = ledger.workers.get(worker_id)
        if registered is not None and registered.token != identity.token_hash:
            log.warning("a call named worker %s, which was registered with another token; ignoring the name",
                        worker_id)
            return "", identity.token_hash
    return worker_id, identity.token_hash


def heartbeat(ledger: Ledger, settings: Settings, identity: Identity, worker_id: str, task_id: str,
              fence: int, event: str = "") -> Beat:
    """Renew (task, fence)'s lease for one more lease lifetime and record the run's note.

    The first heartbeat of a run fixes its base version (the newest one then), so a task that
    waited in Ray's queue does not start from a stale model; later ones repeat it. All of it is
    one step in the ledger: a lease lost meanwhile is answered as lost, never as renewed.
    """
    deadline = time.time() + settings.lease_ttl_s
    worker_id, token_hash = holder(ledger, identity, worker_id)
    beat = ledger.leases.heartbeat(task_id, fence, deadline, worker_id, token_hash, event[:MAX_EVENT_CHARS])
    if not beat.ok:
        return Beat(ok=False, reason=beat.reason)
    if beat.started:
        log.info("task %s started on worker %s, from version %d", task_id, worker_id or "?", beat.base_version,
                 extra=fields("task.started", task=task_id, worker=worker_id or None, fence=fence,
                              base_version=beat.base_version))
    if event:
        log.info("task %s (worker %s): %s", task_id, worker_id or "?", event[:MAX_EVENT_CHARS],
                 extra=fields("task.note", task=task_id, worker=worker_id or None, fence=fence, note=event))
    return Beat(ok=True, deadline=beat.deadline, base_version=beat.base_version)


def hand_back(ledger: Ledger, task_id: str, fence: int, worker_id: str, reason: str,
              identity: Identity | None = None) -> bool:
    """A worker gives back a leased unit it has not started (its volunteer paused it:
    worker.controls): back in the queue without spending an attempt, since nothing failed.

    With ``identity`` (a call over the network) only the lease's holder may; without (the Ray
    dispatcher's results) nothing is checked. False when (task, fence) no longer held the lease.
    """
    if ledger.leases.problem(task_id, fence):
        return False  # finished, expired or re-issued meanwhile: nothing to give back
    if identity is not None:
        worker_id, token_hash = holder(ledger, identity, worker_id)
        problem = ledger.leases.hold(task_id, fence, worker_id, token_hash)
        if problem:
            raise NotPermitted(problem)
    if not ledger.leases.requeue(task_id, fence, reason):
        return False
    log.info("task %s handed back by worker %s (%s); it goes back in the queue", task_id, worker_id or "?", reason,
             extra=fields("task.handed_back", task=task_id, worker=worker_id or None, fence=fence, reason=reason))
    return True


@dataclass(frozen=True)
class Shard:
    """A task's records: the bytes (a folder store streams them), or where to GET them."""

    data: bytes = b""
    url: str = ""  # a presigned GET of the shard's own object (a direct store)
    sha256: str = ""
    size: int = 0


def shard(ledger: Ledger, store: Store, identity: Identity, task_id: str, fence: int, ttl_s: float) -> Shard:
    """The task's shard for the current holder of its lease: with a direct store, written as an
    object of its own (by content: once per shard) and named by a URL that reads it alone, so a
    lease's URL never opens the rest of the dataset; else its bytes. Raises as :func:`fetch_shard`."""
    data = fetch_shard(ledger, store, identity, task_id, fence)
    if not store.direct:
        return Shard(data=data)
    sha = hashlib.sha256(data).hexdigest()
    if not store.has(sha):
        store.put(data)
    return Shard(url=store.presign_get(sha, ttl_s), sha256=sha, size=len(data))


@functools.lru_cache(maxsize=2)
def _records(store: Store, sha256: str) -> list[bytes]:
    """A job's records blob split into lines, kept for the next fetches (the tasks of one job come
    one after another, and an object store's read of the whole blob is not free)."""
    return store.get(sha256).splitlines(keepends=True)


def fetch_shard(ledger: Ledger, store: Store, identity: Identity, task_id: str, fence: int) -> bytes:
    """The task's records (JSON lines), for the current holder of its lease only.

    Raises WrongState for a stale or unknown lease, NotPermitted when another token holds it.
    """
    problem = ledger.leases.problem(task_id, fence)
    if problem:
        raise WrongState(problem)
    _, token_hash = holder(ledger, identity, "")
    problem = ledger.leases.hold(task_id, fence, "", token_hash)
    if problem:
        raise NotPermitted(problem)
    task = ledger.tasks.get(task_id)
    job = ledger.jobs.get(task.job)
    lines = _records(store, job.records) if store.direct else store.get(job.records).splitlines(keepends=True)
    return b"".join(lines[task.start : task.end])
