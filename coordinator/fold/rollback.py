"""History operations (admin): roll back to an earlier version, unmerge one folded adapter.

Each publishes a new version after the newest, as a fold does, so the ledger's history only
grows: a rollback is a snapshot whose weights are the target version's bit for bit, an unmerge
is the patch −w·s·B·A of one adapter. Both work on the folder's running model under its lock
(:class:`coordinator.fold.folder.Folder`), so they take turns with the folds; an operation cut
short halfway leaves the model resynced with the ledger's newest version.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from coordinator.fold import folding
from coordinator.ledger import AdapterState, FoldedAdapter
from nomoat import adapter as adapter_format
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


def rollback(folder: Folder, target: int) -> tuple[int, float]:
    """A new version whose weights equal version ``target``'s exactly."""
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
                snapshot=True))
        except Exception:
            folder._resync_now()  # half-loaded or unpublished weights: back to the ledger's newest
            raise
        folder.version, folder._dirty = record.version, False
        log.info("version %d rolls back to version %d: held-out loss %.4f", record.version, target, loss,
                 extra=fields("version.rollback", version=record.version, target=target, loss=loss, jobs=jobs))
        return record.version, loss


def unmerge(folder: Folder, adapter_id: str) -> tuple[int, float]:
    """A new version without one adapter's contribution: W − w·s·B·A, exactly that product."""
    with folder.lock:
        entry = folder.ledger.adapters.get(adapter_id)
        if entry is None or entry.state is not AdapterState.FOLDED:
            state = entry.state if entry else "unknown"
            raise ValueError(f"adapter {adapter_id} is {state}; only a folded adapter can be unmerged")
        adapter = adapter_format.from_bytes(folder.store.get(entry.sha256))
        patch = folding.build_patch([adapter], [-entry.weight])
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
                {"operation": "unmerge", "adapter": adapter_id, "jobs": jobs}, entry.job))
        except Exception:
            folder._resync_now()  # the unmerge went into the master but not into the ledger: undone
            raise
        folder.version, folder._dirty = record.version, False
        folder.ledger.adapters.mark_unmerged(adapter_id, record.version)
        log.info("version %d unmerges adapter %s (job %s): held-out loss %.4f", record.version, adapter_id,
                 entry.job, loss, extra=fields("version.unmerged", version=record.version, job=entry.job,
                                               worker=entry.worker or None, adapter=adapter_id, loss=loss))
        return record.version, loss
