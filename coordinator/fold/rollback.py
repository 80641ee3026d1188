"""History operations (admin): roll back to an earlier version, unmerge one folded adapter.

Each publishes a new version after the newest, as a fold does, so the ledger's history only
grows: a rollback is a snapshot whose weights are the target version's bit for bit, an unmerge
is the patch −w·s·B·A of one adapter. Both work on the folder's running model under its lock
(:class:`coordinator.fold.folder.Folder`), so they take turns with the folds; an operation cut
short halfway leaves the model resynced with the ledger's newest version.

An admin's request reaches whichever gateway the load balancer picked; the gateway queues it in
the ledger (coordinator.ledger.operations) and the folding leader carries it out between folds
(:func:`carry_out`), publishing under its fence: a process that no longer leads the folder cannot
publish a rollback, as it cannot publish a fold, so the two never interleave across processes.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from coordinator.fold import folding
from coordinator.ledger import AdapterState, FoldedAdapter
from coordinator.ledger.leaders import Fence, NotLeader
from coordinator.ledger.operations import ROLLBACK, UNMERGE, Operations, Request
from coordinator.model import folded
from nomoat import lora
from nomoat.logs import fields

if TYPE_CHECKING:
    from coordinator.fold.folder import Folder

log = logging.getLogger("nomoat.fold")


def _recent_jobs(folder: Folder, first: int, last: int) -> list[str]:
    jobs = set()
    for v in range(max(first, 1), last + 1):
        record = folder.ledger.versions.get(v)
        jobs.update(record.jobs if record else [])
    return sorted(j for j in jobs if folder.ledger.jobs.get(j))


def rollback(folder: Folder, target: int, leader: Fence | None = None) -> tuple[int, float]:
    """A new version whose weights equal version ``target``'s exactly, published under ``leader``
    (the folder's fence; NotLeader when it no longer leads)."""
    with folder.lock:
        folder._catch_up()
        current = folder.version
        if not 0 <= target < current:
            raise ValueError(f"cannot roll back to version {target}: choose one from 0 to {current - 1}")
        undo = lora.chain([folder.history.patch(v) for v in range(target + 1, current + 1)], sign=-1.0)
        jobs = _recent_jobs(folder, target + 1, current)
        folder._parent_losses = (None, "", {})
        try:  # in place: a second model in memory is what the coordinator cannot afford
            folder._dirty = True
            folder.model = folder.history.rebuild(target, into=folder.model)
            loss = folder._eval(jobs) if jobs else math.nan
            # A rollback is a snapshot: its weights are version `target`'s bit for bit, which
            # replaying the negated chain would only reproduce up to rounding.
            record = folder.ledger.versions.publish(folder._new_version(
                current, undo, [], loss, {"operation": "rollback", "target": target, "jobs": jobs}, "",
                snapshot=True), leader=leader)
        except Exception:
            folder._resync_now()  # half-loaded or unpublished weights: back to the ledger's newest
            raise
        folder.version, folder._dirty = record.version, False
        log.info("version %d rolls back to version %d: held-out loss %.4f", record.version, target, loss,
                 extra=fields("version.rollback", version=record.version, target=target, loss=loss, jobs=jobs))
        return record.version, loss


def unmerge(folder: Folder, adapter_id: str, leader: Fence | None = None) -> tuple[int, float]:
    """A new version without one adapter's contribution: W − w·s·B·A, exactly that product,
    published under ``leader`` (as :func:`rollback`)."""
    with folder.lock:
        entry = folder.ledger.adapters.get(adapter_id) or folded.from_versions(folder.ledger, adapter_id)
        if entry is None or entry.state is not AdapterState.FOLDED:
            state = entry.state if entry else "unknown"
            raise ValueError(f"adapter {adapter_id} is {state}; only a folded adapter can be unmerged")
        patch = folded.unmerge_patch(folder.ledger, folder.store, entry)  # from its version's patch
        folder._catch_up()
        current = folder.version
        try:
            folder._dirty = True
            folding.apply_patch(folder.model.master(patch.modules()), patch)
            folder._parent_losses = (None, "", {})
            jobs = _recent_jobs(folder, entry.version, current)
            loss = folder._eval(jobs) if jobs else math.nan
            record = folder.ledger.versions.publish(folder._new_version(
                current, patch, [FoldedAdapter(adapter_id, -entry.weight, 0)], loss,
                {"operation": "unmerge", "adapter": adapter_id, "jobs": jobs}, entry.job), leader=leader)
        except Exception:
            folder._resync_now()  # the unmerge went into the master but not into the ledger: undone
            raise
        folder.version, folder._dirty = record.version, False
        folder.ledger.adapters.mark_unmerged(adapter_id, record.version)
        log.info("version %d unmerges adapter %s (job %s): held-out loss %.4f", record.version, adapter_id,
                 entry.job, loss, extra=fields("version.unmerged", version=record.version, job=entry.job,
                                               worker=entry.worker or None, adapter=adapter_id, loss=loss))
        return record.version, loss


def carry_out(folder: Folder, operations: Operations, leader: Fence, now: float | None = None) -> int:
    """Carry out the admins' waiting requests, oldest first, under the folder's fence, answering
    each on its own list; returns how many were carried out. NotLeader (after answering the request
    it cut short) when this process stopped leading: the rest wait for the next leader."""
    done = 0
    while (request := operations.take()) is not None:
        if request.deadline < (now or time.time()):
            log.warning("a %s request (%s) waited past its caller's patience; dropped", request.kind, request.arg)
            continue
        operations.tell(request.id, {"state": "started", "leader": leader.token})
        try:
            answer = _answer(folder, request, leader)
        except NotLeader as exc:
            operations.tell(request.id, {"state": "lost", "reason": f"the folder stopped leading before it "
                                                                      f"published ({exc}); nothing changed: try again"})
            raise
        operations.tell(request.id, answer)
        done += 1
    return done


def _answer(folder: Folder, request: Request, leader: Fence) -> dict:
    """What the asking gateway is told: done (version, loss), refused or failed (a sentence)."""
    try:
        if request.kind == ROLLBACK:
            number, loss = rollback(folder, int(request.arg), leader=leader)
        elif request.kind == UNMERGE:
            number, loss = unmerge(folder, request.arg, leader=leader)
        else:
            return {"state": "refused", "reason": f"there is no history operation {request.kind!r}"}
    except ValueError as exc:  # not possible on this history (a version out of range, an adapter not folded)
        return {"state": "refused", "reason": str(exc)}
    except NotLeader:
        raise  # carry_out says so, and stops
    except Exception as exc:  # noqa: BLE001  (the caller hears of it; the model was resynced)
        log.exception("the %s of %s failed", request.kind, request.arg)
        return {"state": "failed", "reason": f"the {request.kind} failed on the folder: {exc}"}
    return {"state": "done", "version": number, "loss": loss}

