"""Retention: what the blob store and the ledger keep, and the sweeper that frees the rest.

Like BOINC's file deleter, the sweeper deletes only what nothing needs. The policy
(:class:`Policy`, defaults below) keeps:

- every version's patch (and plain delta and model card): small, and with the snapshots they
  rebuild any version, exactly;
- the snapshot folders of version 0, of every ``snapshot_every``-th version, of every rollback
  (its weights are the target's bit for bit, which its negated chain reproduces only up to
  rounding) and of the newest ``keep_versions``; other versions' folders are dropped, and rebuilt
  from their snapshot and patches if someone pulls them again;
- every adapter a version holds or may still hold (buffered, held for replicas, folded: an
  unmerge needs its factors), and refused ones for ``keep_days``;
- a running job's dataset and records; a finished job's for ``keep_days``, after which its
  original file is freed, its records blob shrinks to the held-out slice (rollbacks and unmerges
  evaluate on it), and its tasks' ledger records are summarised into the job and removed;
- any blob written in the last ``grace_s`` (a version being published writes its blobs before
  its record, which is written last: a young blob that nothing names yet is left alone).

:func:`plan_folders` is the pure decision about folders; :func:`sweep` reads the ledger, decides,
and (unless ``dry_run``) frees, returning what it freed (or would) as sentences and figures.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.ledger import Ledger
from coordinator.ledger.records import AdapterState, JobState, VersionRecord
from coordinator.model import modelcard
from coordinator.model.store import Store
from nomoat.logs import fields

log = logging.getLogger("nomoat.retention")
DAY = 86400.0


@dataclass(frozen=True)
class Policy:
    keep_versions: int = 5  # the newest N versions keep their folders
    snapshot_every: int = 50  # and every K-th (with version 0): where rebuilds start
    keep_days: float = 7.0  # refused adapters, finished jobs' datasets and task records
    grace_s: float = 3600.0  # unreferenced blobs younger than this are left alone (being written)

    @classmethod
    def of(cls, settings) -> Policy:
        return cls(settings.keep_versions, settings.keep_snapshot_every, settings.keep_days)


@dataclass
class Report:
    dry_run: bool
    versions: list[int] = field(default_factory=list)  # versions whose folders are dropped
    jobs: list[str] = field(default_factory=list)  # finished jobs retired
    adapters: int = 0  # refused adapters' records expired
    records: int = 0  # ledger keys removed
    blobs: int = 0
    bytes: int = 0
    uploads: int = 0  # stale upload objects (an object store's) removed

    def lines(self) -> list[str]:
        would = "would free" if self.dry_run else "freed"
        out = [f"{would} {self.blobs} blobs ({self.bytes / 1e6:.1f} MB)"]
        if self.versions:
            out.append(f"{would} the folders of {len(self.versions)} versions "
                       f"({_ranges(self.versions)}); their patches stay, so each can be rebuilt")
        if self.jobs:
            out.append(f"{would} the datasets and task records of {len(self.jobs)} finished jobs "
                       f"({', '.join(self.jobs[:5])}{', ...' if len(self.jobs) > 5 else ''})")
        if self.adapters:
            out.append(f"{would} the records of {self.adapters} refused adapters")
        if self.uploads:
            out.append(f"{would} {self.uploads} abandoned uploads")
        if self.records:
            out.append(f"{would} {self.records} ledger records")
        return out


def plan_folders(policy: Policy, latest: int, snapshots: Iterable[tuple[int, str]]) -> list[int]:
    """Pure: of the versions with a folder, given as (version, operation), those whose folder goes."""
    newest = latest - policy.keep_versions
    return sorted(v for v, operation in snapshots
                  if v != 0 and v <= newest and v % max(1, policy.snapshot_every) != 0 and operation != "rollback")


def sweep(ledger: Ledger, store: Store, policy: Policy, *, versions_dir: Path | None = None,
          now: float | None = None, dry_run: bool = False) -> Report:
    """Free what ``policy`` lets go (or, with ``dry_run``, say what that would be)."""
    now = time.time() if now is None else now
    report = Report(dry_run)
    records = ledger.versions.all()
    latest = records[-1].version if records else -1
    drop = set(plan_folders(policy, latest, ((r.version, r.operation) for r in records if r.files)))
    report.versions = sorted(drop)
    live: set[str] = set()
    for record in records:
        live |= _version_blobs(record, keep_folder=record.version not in drop)
    _jobs(ledger, store, policy, now, report, live)
    _adapters(ledger, policy, now, report, live)
    if not dry_run:
        for v in sorted(drop):
            ledger.versions.set_files(v, {})
            if versions_dir is not None:
                shutil.rmtree(Path(versions_dir) / str(v), ignore_errors=True)
    for blob in list(store.list()):
        if blob.sha256 not in live and blob.modified < now - policy.grace_s:
            report.blobs += 1
            report.bytes += blob.size
            if not dry_run:
                store.delete(blob.sha256)
    for upload in list(store.uploads()):
        if upload.modified < now - max(policy.grace_s, DAY):
            report.uploads += 1
            if not dry_run:
                store.delete_upload(upload.sha256)
    if not dry_run and (report.blobs or report.versions or report.jobs or report.adapters):
        log.info("retention sweep: %s", "; ".join(report.lines()),
                 extra=fields("retention.swept", blobs=report.blobs, bytes=report.bytes,
                              versions=len(report.versions), jobs=len(report.jobs), records=report.records))
    return report


def sweep_under(settings, ledger: Ledger, store: Store, versions_dir: Path | None, lock=None, *,
                dry_run: bool = False) -> Report:
    """:func:`sweep` by the settings' policy, holding ``lock`` (the folder's: no version is folded
    or rebuilt meanwhile) when one is given."""
    with lock if lock is not None else contextlib.nullcontext():
        return sweep(ledger, store, Policy.of(settings), versions_dir=versions_dir, dry_run=dry_run)


def _version_blobs(record: VersionRecord, keep_folder: bool) -> set[str]:
    out = {sha for sha in (record.patch, record.delta) if sha}
    out |= set(modelcard.files_of(record).values())
    if keep_folder:
        out |= set(record.files.values())
    return out


def _jobs(ledger: Ledger, store: Store, policy: Policy, now: float, report: Report, live: set[str]) -> None:
    """Running jobs and those finished within keep_days keep everything; older ones are retired:
    their original file freed, their records shrunk to the held-out slice, their tasks summarised."""
    for job_id in ledger.jobs.ids():
        job = ledger.jobs.get(job_id)
        if job is None:
            continue
        expired = job.state is not JobState.RUNNING and job.finished and job.finished < now - policy.keep_days * DAY
        if not expired:
            # the records index too: a running job's shards are read by byte range through it
            live |= {sha for sha in (job.dataset, job.records, ledger.jobs.records_index(job_id)) if sha}
            continue
        if ledger.jobs.swept(job_id):
            live.add(job.records)  # already the held-out slice
            continue
        report.jobs.append(job_id)
        if report.dry_run:
            if job.n_validation >= job.n_records:
                live.add(job.records)  # the slice is the whole blob; else a new, small one replaces it
            report.records += len(ledger.tasks.ids(job_id)) + 1
            continue
        lines = store.get(job.records).splitlines(keepends=True)
        held_out = store.put(b"".join(lines[: job.n_validation]))
        live.add(held_out)
        summary = {"tasks": ledger.tasks.counts(job_id)}
        report.records += ledger.jobs.sweep(job_id, summary, held_out, job.n_validation)


def _adapters(ledger: Ledger, policy: Policy, now: float, report: Report, live: set[str]) -> None:
    """Refused adapters are kept keep_days (for their volunteer to see why); every other adapter a
    version holds or may hold (buffered, held, folded, unmerged: a redo needs its factors)."""
    expired = []
    for adapter in ledger.adapters.many(ledger.adapters.ids()):
        if adapter.state is AdapterState.REJECTED and adapter.accepted < now - policy.keep_days * DAY:
            expired.append(adapter.adapter_id)
        else:
            live.add(adapter.sha256)
    report.adapters = len(expired)
    report.records += len(expired)
    if not report.dry_run:
        ledger.adapters.expire(expired)


def _ranges(numbers: list[int]) -> str:
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)
