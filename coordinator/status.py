"""Status: what `nomoat status` and `submit --wait` show, summarised from the ledger.

Jobs with their task counts and latest run notes, workers with whether they are still heard
from, and the versions of the running model. Plain records; the service turns them into
messages.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from coordinator.errors import NotFound
from coordinator.ledger import Ledger, count_states
from coordinator.settings import Settings
from coordinator.workers import is_active

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


@dataclass(frozen=True)
class WorkerSummary:
    worker_id: str
    name: str
    card: bytes  # the serialized Card message it registered with
    last_seen: float
    tasks_done: int
    state: str  # active | gone


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


def _float(value: str | None, default: float = float("nan")) -> float:
    try:
        return float(value) if value not in (None, "") else default
    except ValueError:
        return default


def job(ledger: Ledger, job_id: str) -> JobSummary | None:
    record = ledger.job(job_id)
    if record is None:
        return None
    tasks = ledger.tasks(job_id)
    events = [(t, f"{task['task_id']}: {e}") for task in tasks for t, e in json.loads(task.get("events") or "[]")]
    return JobSummary(
        job_id=job_id,
        name=record.get("name", ""),
        state=record.get("state", ""),
        tasks=count_states(tasks),
        total_tasks=int(record.get("total_tasks", 0)),
        adapters_folded=int(record.get("adapters_folded", 0)),
        adapters_rejected=int(record.get("adapters_rejected", 0)),
        error=record.get("error", ""),
        created=_float(record.get("created"), 0.0),
        tokens=int(record.get("tokens", 0)),
        dataset_sha256=record.get("dataset", ""),
        base_loss=_float(record.get("base_loss")),
        warning=record.get("warning", ""),
        events=[e for _, e in sorted(events)[-MAX_JOB_EVENTS:]],
    )


def workers(ledger: Ledger, settings: Settings) -> list[WorkerSummary]:
    now = time.time()
    out = []
    for w in ledger.workers():
        seen = _float(w.get("last_seen"), 0.0)
        out.append(WorkerSummary(
            worker_id=w["worker_id"], name=w.get("name", ""), card=bytes.fromhex(w.get("card") or ""),
            last_seen=seen, tasks_done=int(w.get("tasks_done", 0)),
            state="active" if is_active(seen, now, settings) else "gone"))
    return out


def versions(ledger: Ledger) -> list[VersionSummary]:
    return [
        VersionSummary(version=v["version"], parent=v["parent"], eval_loss=v["eval_loss"],
                       adapters=len(v.get("adapters", [])), created=_float(v.get("created"), 0.0),
                       job_id=v.get("job_id", ""), adapter_ids=[a["id"] for a in v.get("adapters", [])],
                       operation=v.get("metrics", {}).get("operation", ""))
        for v in ledger.versions()
    ]


def overview(ledger: Ledger, settings: Settings, job_id: str = "") -> Overview:
    """One job (or every job when ``job_id`` is empty), every worker and every version."""
    ids = [job_id] if job_id else ledger.job_ids()
    jobs = [j for j in (job(ledger, i) for i in ids) if j is not None]
    if job_id and not jobs:
        raise NotFound(f"there is no job {job_id!r}")
    return Overview(jobs, workers(ledger, settings), versions(ledger))


def progress(ledger: Ledger, job_id: str) -> Progress:
    """Where a job stands against the newest version; finished once it is no longer running."""
    summary = job(ledger, job_id)
    if summary is None:
        raise NotFound(f"there is no job {job_id!r}")
    latest = ledger.latest_version() or 0
    record = ledger.version(latest) or {}
    return Progress(summary, current_version=latest, eval_loss=record.get("eval_loss", 0.0),
                    finished=summary.state != "running")
