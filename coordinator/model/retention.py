"""Retention: what the blob store and the ledger keep, and the sweeper that frees the rest.

Like BOINC's file deleter, the sweeper deletes only what nothing needs. The policy
(:class:`Policy`, defaults below) keeps:

- every version's patch (and plain delta and model card): small, and with the snapshots they
  rebuild any version, exactly;
- the snapshot folders of version 0, of every ``snapshot_every``-th version, of every rollback
  (its weights are the target's bit for bit, which its negated chain reproduces only up to
  rounding) and of the newest ``keep_versions``; other versions' folders are dropped, and rebuilt
  from their snapshot and patches if someone pulls them again;
- every adapter a version may still hold (buffered, held for replicas), and refused ones for
  ``keep_days``; a folded (or unmerged) adapter's blob only while its version's patch cannot say
  where its factors are (coordinator.model.folded: an unmerge reads them from the patch);
- a running job's dataset and records; a finished job's for ``keep_days``, after which its
  original file is freed, its records blob shrinks to the held-out slice (rollbacks and unmerges
  evaluate on it), and its tasks' and adapters' ledger records are summarised into the job (counts
  by state) and removed, with its replica groups, events and adapter-bytes index (an unmerge of
  one of its adapters then reads the adapter from the versions: coordinator.model.folded); the
  retired job's own small record and held-out slice go after ``job_record_days``;
- a worker's records while it was seen in the last ``worker_days``; then its tasks and tokens are
  added to its volunteer's retired record (its credit stays) and its records go;
- a volunteer's trust record (one small hash, its newest outcomes bounded) for good, and the
  versions it is in for the newest ``trust_versions_kept`` of them (older ones summed);
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
from coordinator.ledger.records import AdapterRecord, AdapterState, JobState, VersionRecord
from coordinator.model import folded, modelcard
from coordinator.model.store import Store
from coordinator.schedule import standing
from nomoat.logs import fields

log = logging.getLogger("nomoat.retention")
DAY = 86400.0


@dataclass(frozen=True)
class Policy:
    keep_versions: int = 5  # the newest N versions keep their folders
    snapshot_every: int = 50  # and every K-th (with version 0): where rebuilds start
    keep_days: float = 7.0  # refused adapters, finished jobs' datasets and task records
    grace_s: float = 3600.0  # unreferenced blobs younger than this are left alone (being written)
    worker_days: float = 30.0  # a worker not seen for this long: summarised into its volunteer, expired
    job_record_days: float = 365.0  # a retired job's own record (its summary, its held-out slice)
    trust_versions_kept: int = 100  # versions listed per volunteer (older ones: a sum)

    @classmethod
    def of(cls, settings) -> Policy:
        return cls(settings.keep_versions, settings.keep_snapshot_every, settings.keep_days,
                   worker_days=settings.keep_worker_days, job_record_days=settings.keep_job_record_days)


@dataclass
class Report:
    dry_run: bool
    versions: list[int] = field(default_factory=list)  # versions whose folders are dropped
    jobs: list[str] = field(default_factory=list)  # finished jobs retired
    adapters: int = 0  # adapters' records expired (refused, and those of retired jobs)
    workers: int = 0  # gone workers' records summarised into their volunteers and expired
    forgotten: list[str] = field(default_factory=list)  # retired jobs whose own record went
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
            out.append(f"{would} the records of {self.adapters} adapters (refused, or of retired jobs)")
        if self.workers:
            out.append(f"{would} the records of {self.workers} workers gone for good (their work stays "
                       "counted for their volunteers)")
        if self.forgotten:
            out.append(f"{would} the records of {len(self.forgotten)} jobs retired long ago")
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
    adapters = ledger.adapters.many(ledger.adapters.ids())
    says: dict[int, bool] = {}  # version -> whether its patch says where its adapters are
    gone = _jobs(ledger, store, policy, now, report, live, adapters, says)
    _adapters(ledger, store, policy, now, report, live, [a for a in adapters if a.adapter_id not in gone], says)
    _workers(ledger, policy, now, report)
    _trust(ledger, policy, report)
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
    if not dry_run and (report.blobs or report.versions or report.jobs or report.adapters or report.workers):
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


def _jobs(ledger: Ledger, store: Store, policy: Policy, now: float, report: Report, live: set[str],
          adapters: list[AdapterRecord], says: dict[int, bool]) -> set[str]:
    """Running jobs and those finished within keep_days keep everything; older ones are retired:
    their original file freed, their records shrunk to the held-out slice, their tasks and adapters
    summarised; after job_record_days the retired job's own record goes too. Returns the ids of
    the adapters whose records went (or would)."""
    gone: set[str] = set()
    by_job: dict[str, list[AdapterRecord]] = {}
    for adapter in adapters:
        by_job.setdefault(adapter.job, []).append(adapter)
    for job_id in ledger.jobs.ids():
        job = ledger.jobs.get(job_id)
        if job is None:
            continue
        expired = job.state is not JobState.RUNNING and job.finished and job.finished < now - policy.keep_days * DAY
        if not expired:
            # the records index too: a running job's shards are read by byte range through it
            live |= {sha for sha in (job.dataset, job.records, ledger.jobs.records_index(job_id)) if sha}
            continue
        # A folded adapter whose version's patch cannot say where it is (a version made before
        # patches did) keeps its record and blob: an unmerge reads it.
        mine = [a for a in by_job.pop(job_id, []) if a.state not in _WAITING
                and (a.state is not AdapterState.FOLDED or _in_patch(ledger, store, a, says))]
        gone |= {a.adapter_id for a in mine}
        if ledger.jobs.swept(job_id):
            if job.finished < now - policy.job_record_days * DAY:
                report.forgotten.append(job_id)
                report.records += len(mine) + (0 if report.dry_run else ledger.jobs.forget(job_id))
                if not report.dry_run:
                    ledger.adapters.expire([a.adapter_id for a in mine])
                continue
            live.add(job.records)  # already the held-out slice
            report.adapters += len(mine)
            report.records += len(mine)
            if not report.dry_run:
                ledger.jobs.expire_adapters(job_id, _states(mine), [a.adapter_id for a in mine])
            continue
        report.jobs.append(job_id)
        report.adapters += len(mine)
        if report.dry_run:
            if job.n_validation >= job.n_records:
                live.add(job.records)  # the slice is the whole blob; else a new, small one replaces it
            report.records += len(ledger.tasks.ids(job_id)) + len(mine) + 1
            continue
        lines = store.get(job.records).splitlines(keepends=True)
        held_out = store.put(b"".join(lines[: job.n_validation]))
        live.add(held_out)
        summary = {"tasks": ledger.tasks.counts(job_id), "adapters": _states(mine)}
        report.records += ledger.jobs.sweep(job_id, summary, held_out, job.n_validation,
                                            [a.adapter_id for a in mine])
    return gone


def _adapters(ledger: Ledger, store: Store, policy: Policy, now: float, report: Report, live: set[str],
              adapters: list[AdapterRecord], says: dict[int, bool]) -> None:
    """Refused adapters are kept keep_days (for their volunteer to see why); an adapter waiting to
    be folded (buffered, held for replicas, a replica) keeps its blob; a folded or unmerged one
    keeps it only while its version's patch cannot say where its factors are."""
    expired = []
    for adapter in adapters:
        if adapter.state is AdapterState.REJECTED and adapter.accepted < now - policy.keep_days * DAY:
            expired.append(adapter.adapter_id)
        elif not _in_patch(ledger, store, adapter, says):
            live.add(adapter.sha256)
    report.adapters += len(expired)
    report.records += len(expired)
    if not report.dry_run:
        ledger.adapters.expire(expired)


def _in_patch(ledger: Ledger, store: Store, adapter: AdapterRecord, says: dict[int, bool]) -> bool:
    if adapter.state not in (AdapterState.FOLDED, AdapterState.UNMERGED) or adapter.version is None:
        return False
    if adapter.version not in says:
        record = ledger.versions.get(adapter.version)
        sha = folded.fold_delta(record) if record is not None else ""
        says[adapter.version] = bool(sha) and folded.says_members(store, sha)
    return says[adapter.version]


def _workers(ledger: Ledger, policy: Policy, now: float, report: Report) -> None:
    """Workers not seen for worker_days: their tasks and tokens go into their volunteer's retired
    record (so its credit and stats stay whole), their records are removed."""
    cutoff = now - policy.worker_days * DAY
    after = None
    while True:
        page, after = ledger.workers.gone(cutoff, 500, after)
        for worker in page:
            volunteer = standing.volunteer_of(worker.token, worker.worker_id)
            if report.dry_run or ledger.workers.retire(worker, volunteer, cutoff):
                report.workers += 1
                report.records += 1
        if after is None:
            return


def _trust(ledger: Ledger, policy: Policy, report: Report) -> None:
    """A volunteer's trust hash is one small record (its newest outcomes are bounded); the versions
    it is in are bounded here to the newest trust_versions_kept."""
    if report.dry_run:
        return
    for volunteer in ledger.trust.volunteers_with_versions():
        ledger.trust.trim_versions(volunteer, policy.trust_versions_kept)


_WAITING = (AdapterState.BUFFERED, AdapterState.HELD)


def _states(adapters: list[AdapterRecord]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in adapters:
        out[a.state.value] = out.get(a.state.value, 0) + 1
    return out


def _ranges(numbers: list[int]) -> str:
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)
