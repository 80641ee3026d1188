"""Leases as a worker meets them: proving it holds one, renewing it, reading the task's shard.

A task's lease is (task, fence) in the ledger, placed on one worker with a secret that only the
run's spec carries (coordinator.ledger.leases). A run renews it by heartbeat and may read its
shard, resume and send its upload, and hand it back only while it holds it, and only as its
holder: a caller proves that with a :class:`~coordinator.ledger.Claim`, the worker it acts for
(one its credential registered) and the lease's secret. The ledger checks the claim in the same
atomic step that reads the lease; this module decides what claim a caller may make and turns
the ledger's answers into replies and errors. Anyone but the holder learns only that it holds
no such lease (NotFound): no fence, no holder, no state.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from coordinator.gateway.auth import Identity
from coordinator.errors import NotFound
from coordinator.ledger import Claim, Ledger
from coordinator.settings import Settings
from coordinator.model.store import Store
from coordinator.collect.partial_uploads import PartialUploads
from coordinator.schedule import shards
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


def owns(ledger: Ledger, identity: Identity, worker_id: str) -> bool:
    """Whether ``identity``'s credential registered ``worker_id``: a worker token acts only for its own."""
    return bool(worker_id) and ledger.workers.token_of(worker_id) == identity.token_hash


def claim_of(ledger: Ledger, identity: Identity, worker_id: str, secret: str) -> Claim | None:
    """The claim a caller makes on a lease: the worker it names, if its credential registered
    it, and the secret it sent. Admin makes none (None: nothing is checked).

    A worker id the caller does not own is kept as a name no lease is placed on, so the ledger
    refuses it like any other stranger (a lease placed on no named worker, from a Ray node that
    names none, is then held by its secret alone).
    """
    if identity.role == "admin":
        return None
    if worker_id and not owns(ledger, identity, worker_id):
        log.warning("a call named worker %s, which its credential did not register", worker_id)
        return Claim("!" + worker_id, secret)
    return Claim(worker_id, secret)


def heartbeat(ledger: Ledger, settings: Settings, identity: Identity, worker_id: str, task_id: str,
              fence: int, event: str = "", secret: str = "") -> Beat:
    """Renew (task, fence)'s lease for one more lease lifetime and record the run's note.

    The first heartbeat of a run fixes its base version (the newest one then), so a task that
    waited in Ray's queue does not start from a stale model; later ones repeat it. All of it is
    one step in the ledger: a lease lost meanwhile is answered as lost, never as renewed.
    """
    deadline = time.time() + settings.lease_ttl_s
    claim = claim_of(ledger, identity, worker_id, secret)
    worker_id = worker_id if claim is None or claim.worker_id == worker_id else ""
    beat = ledger.leases.heartbeat(task_id, fence, deadline, worker_id, claim, event[:MAX_EVENT_CHARS])
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
              claim: Claim | None = None) -> bool:
    """A worker gives back a leased unit it has not started (its volunteer paused it:
    worker.controls): back in the queue without spending an attempt, since nothing failed.

    With ``claim`` (a call over the network) only the lease's holder may; without (the
    dispatchers' results) nothing is checked. False when (task, fence) no longer held the lease,
    or the claim was not its holder's.
    """
    if ledger.leases.problem(task_id, fence, claim):
        return False  # finished, expired or re-issued meanwhile (or never this caller's): nothing to give back
    if not ledger.leases.requeue(task_id, fence, reason):
        return False
    log.info("task %s handed back by worker %s (%s); it goes back in the queue", task_id, worker_id or "?", reason,
             extra=fields("task.handed_back", task=task_id, worker=worker_id or None, fence=fence, reason=reason))
    return True


@dataclass(frozen=True)
class Shard:
    """A task's records: in blocks (a folder store streams them), or where to GET them."""

    blocks: Iterator[bytes] | None = None
    url: str = ""  # a presigned GET of the shard's own object (a direct store)
    sha256: str = ""
    size: int = 0


def shard(ledger: Ledger, store: Store, identity: Identity, task_id: str, fence: int, ttl_s: float,
          worker_id: str = "", secret: str = "") -> Shard:
    """The task's shard for the holder of its current lease: with a direct store, written as an
    object of its own (by content: once per shard) and named by a URL that reads it alone, so a
    lease's URL never opens the rest of the dataset; else its bytes, a block at a time. Raises
    as :func:`fetch_shard`."""
    blocks = fetch_shard(ledger, store, identity, task_id, fence, worker_id, secret)
    if not store.direct:
        return Shard(blocks=blocks)
    data = b"".join(blocks)  # one shard (a task's records), never the job's
    sha = hashlib.sha256(data).hexdigest()
    if not store.has(sha):
        store.put(data)
    return Shard(url=store.presign_get(sha, ttl_s), sha256=sha, size=len(data))


def fetch_shard(ledger: Ledger, store: Store, identity: Identity, task_id: str, fence: int,
                worker_id: str = "", secret: str = "") -> Iterator[bytes]:
    """The task's records (JSON lines) in chunks, read by byte range from the job's records
    (coordinator.schedule.shards), for the holder of its current lease only.

    The check is made before this returns: raises NotFound (it holds no such lease) for anyone
    else, and for a lease no longer current.
    """
    problem = ledger.leases.problem(task_id, fence, claim_of(ledger, identity, worker_id, secret))
    if problem:
        raise NotFound(problem)
    task = ledger.tasks.get(task_id)
    job = ledger.jobs.get(task.job)
    return shards.shard(store, job.records, ledger.jobs.records_index(task.job), task.start, task.end)


def upload_offset(ledger: Ledger, partials: PartialUploads, identity: Identity, task_id: str, fence: int,
                  sha256: str, worker_id: str = "", secret: str = "") -> int:
    """How many bytes of an upload the coordinator kept from a broken-off try: for the lease's
    holder, and 0 for anyone else (whose upload is then refused: it holds no such lease)."""
    answer = ledger.adapters.precheck(task_id, fence, sha256, claim_of(ledger, identity, worker_id, secret))
    if answer is not None and not answer.ok:
        return 0
    return partials.offset(task_id, fence, sha256)
