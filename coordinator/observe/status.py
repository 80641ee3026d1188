"""Status: what `nomoat status` and `submit --wait` show, summarised from the ledger.

Jobs with their task counts and latest run notes, workers with whether they are still heard
from, and the versions of the running model. Plain records; the service turns them into
messages.

What it reads costs O(active work), never O(history): a job's counts are its counters and its
notes its own short list (not its tasks); the running jobs and active workers are listed whole,
while finished jobs, workers gone and versions come a page at a time (:class:`Page`), newest
first.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from dataclasses import dataclass, field

from coordinator.schedule import standing
from coordinator.errors import InvalidRequest, NotFound
from coordinator.ledger import JobConfig, Ledger, WorkerRecord
from coordinator.ledger.pages import Cursor
from coordinator.settings import Settings
from coordinator.schedule.registration import ACTIVE_TTLS, is_active

MAX_JOB_EVENTS = 20  # the newest task notes a job's status shows
PAGE = 20  # finished jobs, gone workers and versions a page lists by default
MAX_PAGE = 500


@dataclass(frozen=True)
class JobSummary:
    job_id: str
    name: str
    state: str  # running | done | failed
    tasks: dict[str, int]  # tasks per state
    total_tasks: int
    adapters_folded: int
    adapters_rejected: int
    error: str
    created: float
    tokens: int
    dataset_sha256: str
    base_loss: float  # nan until measured
    warning: str
    events: list[str]  # the newest notes of its tasks' runs, oldest first
    training: str = ""  # what its newest leased task trains at ("batch 2, lr 0.004"); "" before any
    base_version: int = -1  # the version base_loss was measured on; -1 until measured
    noise_scale: float = 0.0  # its gradient noise scale B_simple in sequences (coordinator.schedule.noise); 0: none yet


@dataclass(frozen=True)
class WorkerSummary:
    worker_id: str
    name: str
    card: bytes  # the serialized Card message it registered with
    last_seen: float
    tasks_done: int
    state: str  # active | gone
    tokens_per_s: float = 0.0  # measured over its finished runs; 0 while unknown
    trust: str = "trusted"  # its volunteer's standing: trusted | throttled | excluded (coordinator.schedule.standing)
    trust_score: float = 1.0
    trust_reason: str = ""  # why it is throttled or excluded
    # How it takes work: "ray" (a trusted machine, a node of the Ray cluster) or "outbound" (a
    # public volunteer asking over gRPC); a Ray worker registers with its node id.
    kind: str = "outbound"


@dataclass(frozen=True)
class VersionSummary:
    version: int
    parent: int
    eval_loss: float
    adapters: int
    created: float
    job_id: str
    adapter_ids: list[str]
    operation: str  # "", "rollback" or "unmerge"


@dataclass(frozen=True)
class Page:
    """Where a listing of history goes on: the cursor after the last finished job, gone worker
    and version a page listed (None: that listing is over, or starts at the newest)."""

    jobs: Cursor | None = None
    workers: Cursor | None = None
    versions: Cursor | None = None
    more: bool = field(default=False, compare=False)  # a later page (the active work is on the first)

    def token(self) -> str:
        """The page token a client sends back for the next page; "" when nothing is left."""
        if self.jobs is None and self.workers is None and self.versions is None:
            return ""
        return base64.urlsafe_b64encode(json.dumps([self.jobs, self.workers, self.versions]).encode()).decode()

    @classmethod
    def of(cls, token: str) -> Page:
        """The page a token names (the first page for "")."""
        if not token:
            return cls()
        try:
            parts = json.loads(base64.urlsafe_b64decode(token.encode()))
            cursors = [None if c is None else (float(c[0]), str(c[1])) for c in parts]
            jobs, workers, versions = cursors
        except (ValueError, TypeError, binascii.Error):
            raise InvalidRequest("the page token is not one this coordinator gave; ask for the first page "
                                 "(no token) and follow next_page_token") from None
        return cls(jobs, workers, versions, more=True)


@dataclass(frozen=True)
class Overview:
    jobs: list[JobSummary]
    workers: list[WorkerSummary]
    versions: list[VersionSummary]
    next_page: Page = Page()


@dataclass(frozen=True)
class Progress:
    job: JobSummary
    current_version: int
    eval_loss: float
    finished: bool


def _task_counts(ledger: Ledger, job_id: str) -> dict[str, int]:
    """The job's tasks by state: its counters, or the summary a retired job's tasks left
    (coordinator.model.retention removes their records)."""
    counts = ledger.tasks.counts(job_id)
    if any(counts.values()):
        return counts
    return ledger.jobs.summary(job_id).get("tasks") or counts


def job(ledger: Ledger, job_id: str) -> JobSummary | None:
    record = ledger.jobs.get(job_id)
    if record is None:
        return None
    return JobSummary(
        job_id=job_id,
        name=record.name,
        state=record.state.value,
        tasks=_task_counts(ledger, job_id),
        total_tasks=record.total_tasks,
        adapters_folded=record.adapters_folded,
        adapters_rejected=record.adapters_rejected,
        error=record.error,
        created=record.created,
        tokens=record.tokens,
        dataset_sha256=record.dataset,
        base_loss=math.nan if record.base_loss is None else record.base_loss,
        warning=record.warning,
        events=[e for _, e in ledger.jobs.events(job_id, MAX_JOB_EVENTS)],
        training=training(record.config, ledger.jobs.training(job_id)),
        base_version=-1 if record.base_version is None else record.base_version,
        noise_scale=record.noise.b_simple() or 0.0,
    )


def training(config: JobConfig, newest: tuple[int, float, int] | None) -> str:
    """What the job's newest leased task trains at, (batch, lr, fold width), beside the job's own
    batch and lr (they differ when the scheduler keeps the global batch: coordinator.fold.policy);
    "" before any lease."""
    if newest is None or newest[0] <= 0:
        return ""
    batch_size, learning_rate, fold_width = newest
    text = f"batch {batch_size}, lr {learning_rate:.3g}"
    if (batch_size, learning_rate) != (config.batch_size, config.learning_rate):
        text += (f" (the job's batch {config.batch_size} over {fold_width} "
                 f"adapters a fold, lr x{learning_rate / config.learning_rate:.3g})")
    return text


def active_since(settings: Settings, now: float) -> float:
    """The last-seen time after which a worker counts as active (coordinator.schedule.registration)."""
    return now - ACTIVE_TTLS * settings.lease_ttl_s


def workers(ledger: Ledger, settings: Settings, gone: int = PAGE) -> list[WorkerSummary]:
    """The active workers and the ``gone`` most recently seen of the others, least recently seen first."""
    return workers_page(ledger, settings, gone)[0]


def workers_page(ledger: Ledger, settings: Settings, gone: int = PAGE, after: Cursor | None = None,
                 active: bool = True) -> tuple[list[WorkerSummary], Cursor | None]:
    """The active workers (``active``), and a page of ``gone`` workers no longer heard from, most
    recently seen first after the cursor ``after``; least recently seen first, with the cursor
    of the next page of gone workers."""
    now = time.time()
    since = active_since(settings, now)
    found = ledger.workers.active(since) if active else []
    left, cursor = ledger.workers.gone(since, gone, after) if gone > 0 else ([], None)
    every = sorted(left, key=lambda w: w.last_seen) + found
    return summarise(ledger, settings, every, now), cursor


def summarise(ledger: Ledger, settings: Settings, every: list[WorkerRecord], now: float) -> list[WorkerSummary]:
    volunteers = {w.worker_id: standing.volunteer_of(w.token, w.worker_id) for w in every}
    records = ledger.trust.many(volunteers.values())
    out = []
    for w in every:
        where = standing.standing(records.get(volunteers[w.worker_id]))
        out.append(WorkerSummary(
            worker_id=w.worker_id, name=w.name, card=w.card, last_seen=w.last_seen, tasks_done=w.tasks_done,
            state="active" if is_active(w.last_seen, now, settings) else "gone", tokens_per_s=w.tokens_per_s,
            trust=where.level.value, trust_score=where.score, trust_reason=where.why, kind=w.kind))
    return out


def versions(ledger: Ledger, limit: int = PAGE) -> list[VersionSummary]:
    """The newest ``limit`` versions, oldest first."""
    return versions_page(ledger, limit)[0]


def versions_page(ledger: Ledger, limit: int = PAGE,
                  after: Cursor | None = None) -> tuple[list[VersionSummary], Cursor | None]:
    """A page of the versions, newest ``limit`` after the cursor, oldest first; with the next cursor."""
    found, cursor = ledger.versions.newest(limit, after) if limit > 0 else ([], None)
    return [
        VersionSummary(version=v.version, parent=v.parent, eval_loss=v.eval_loss, adapters=len(v.adapters),
                       created=v.created, job_id=v.job_id, adapter_ids=[a.id for a in v.adapters],
                       operation=v.operation)
        for v in reversed(found)
    ], cursor


def overview(ledger: Ledger, settings: Settings, job_id: str = "", limit: int = PAGE, page: Page = Page(),
             versions_limit: int | None = None) -> Overview:
    """One job (or, when ``job_id`` is empty, the running jobs and a page of the finished ones),
    the active workers and a page of the gone ones, and a page of the versions: ``limit`` of each
    history listing (``versions_limit`` of versions, when given), newest first from ``page``.
    The first page lists the active work whole; later pages only history."""
    limit = max(1, min(MAX_PAGE, limit or PAGE))
    if job_id:
        ids, job_cursor = [job_id], None
    else:
        running = [] if page.more else ledger.jobs.running_ids()
        finished, job_cursor = (ledger.jobs.finished(limit, page.jobs) if page.jobs or not page.more
                                else ([], None))
        ids = running + list(reversed(finished))
    jobs = sorted((j for j in (job(ledger, i) for i in ids) if j is not None), key=lambda j: j.created)
    if job_id and not jobs:
        raise NotFound(f"there is no job {job_id!r}")
    more_workers = page.workers is not None or not page.more
    found_workers, worker_cursor = workers_page(ledger, settings, limit if more_workers else 0, page.workers,
                                           active=not page.more)
    more_versions = page.versions is not None or not page.more
    found_versions, version_cursor = versions_page(ledger, (versions_limit or limit) if more_versions else 0, page.versions)
    return Overview(jobs, found_workers, found_versions, Page(job_cursor, worker_cursor, version_cursor))


def progress(ledger: Ledger, job_id: str) -> Progress:
    """Where a job stands against the newest version; finished once it is no longer running."""
    summary = job(ledger, job_id)
    if summary is None:
        raise NotFound(f"there is no job {job_id!r}")
    latest = ledger.versions.latest() or 0
    record = ledger.versions.get(latest)
    return Progress(summary, current_version=latest, eval_loss=record.eval_loss if record else 0.0,
                    finished=summary.state != "running")
