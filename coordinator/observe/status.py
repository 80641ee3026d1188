"""Status: what `nomoat status` and `submit --wait` show, summarised from the ledger.

Jobs with their task counts and latest run notes, workers with whether they are still heard
from, and the versions of the running model. Plain records; the service turns them into
messages.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from coordinator.schedule import standing
from coordinator.errors import NotFound
from coordinator.ledger import JobConfig, Ledger, TaskRecord, count_states
from coordinator.settings import Settings
from coordinator.schedule.registration import is_active

MAX_JOB_EVENTS = 20  # the newest task notes a job's status shows


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
class Overview:
    jobs: list[JobSummary]
    workers: list[WorkerSummary]
    versions: list[VersionSummary]


@dataclass(frozen=True)
class Progress:
    job: JobSummary
    current_version: int
    eval_loss: float
    finished: bool


def job(ledger: Ledger, job_id: str) -> JobSummary | None:
    record = ledger.jobs.get(job_id)
    if record is None:
        return None
    tasks = ledger.tasks.of_job(job_id)
    events = [(t, f"{task.task_id}: {e}") for task in tasks for t, e in task.events]
    return JobSummary(
        job_id=job_id,
        name=record.name,
        state=record.state.value,
        tasks=count_states(tasks) if tasks else ledger.jobs.summary(job_id).get("tasks") or count_states(tasks),
        total_tasks=record.total_tasks,
        adapters_folded=record.adapters_folded,
        adapters_rejected=record.adapters_rejected,
        error=record.error,
        created=record.created,
        tokens=record.tokens,
        dataset_sha256=record.dataset,
        base_loss=math.nan if record.base_loss is None else record.base_loss,
        warning=record.warning,
        events=[e for _, e in sorted(events)[-MAX_JOB_EVENTS:]],
        training=training(record.config, tasks),
        base_version=-1 if record.base_version is None else record.base_version,
        noise_scale=record.noise.b_simple() or 0.0,
    )


def training(config: JobConfig, tasks: list[TaskRecord]) -> str:
    """What the job's newest leased task trains at, beside the job's own batch and lr (they differ
    when the scheduler keeps the global batch: coordinator.fold.policy); "" before any lease."""
    leased = [t for t in tasks if t.batch_size > 0]
    if not leased:
        return ""
    newest = max(leased, key=lambda t: t.leased_at)
    text = f"batch {newest.batch_size}, lr {newest.learning_rate:.3g}"
    if (newest.batch_size, newest.learning_rate) != (config.batch_size, config.learning_rate):
        text += (f" (the job's batch {config.batch_size} over {newest.fold_width} "
                 f"adapters a fold, lr x{newest.learning_rate / config.learning_rate:.3g})")
    return text


def workers(ledger: Ledger, settings: Settings) -> list[WorkerSummary]:
    now = time.time()
    every = ledger.workers.all()
    volunteers = {w.worker_id: standing.volunteer_of(w.token, w.worker_id) for w in every}
    records = ledger.trust.many(volunteers.values())
    out = []
    for w in every:
        where = standing.standing(records.get(volunteers[w.worker_id]))
        out.append(WorkerSummary(
            worker_id=w.worker_id, name=w.name, card=w.card, last_seen=w.last_seen, tasks_done=w.tasks_done,
            state="active" if is_active(w.last_seen, now, settings) else "gone", tokens_per_s=w.tokens_per_s,
            trust=where.level.value, trust_score=where.score, trust_reason=where.why,
            kind="ray" if w.node_id else "outbound"))
    return out


def versions(ledger: Ledger) -> list[VersionSummary]:
    return [
        VersionSummary(version=v.version, parent=v.parent, eval_loss=v.eval_loss, adapters=len(v.adapters),
                       created=v.created, job_id=v.job_id, adapter_ids=[a.id for a in v.adapters],
                       operation=v.operation)
        for v in ledger.versions.all()
    ]


def overview(ledger: Ledger, settings: Settings, job_id: str = "") -> Overview:
    """One job (or every job when ``job_id`` is empty), every worker and every version."""
    ids = [job_id] if job_id else ledger.jobs.ids()
    jobs = [j for j in (job(ledger, i) for i in ids) if j is not None]
    if job_id and not jobs:
        raise NotFound(f"there is no job {job_id!r}")
    return Overview(jobs, workers(ledger, settings), versions(ledger))


def progress(ledger: Ledger, job_id: str) -> Progress:
    """Where a job stands against the newest version; finished once it is no longer running."""
    summary = job(ledger, job_id)
    if summary is None:
        raise NotFound(f"there is no job {job_id!r}")
    latest = ledger.versions.latest() or 0
    record = ledger.versions.get(latest)
    return Progress(summary, current_version=latest, eval_loss=record.eval_loss if record else 0.0,
                    finished=summary.state != "running")
