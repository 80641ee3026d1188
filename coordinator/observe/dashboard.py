"""The dashboard's data: what the web page shows, built from the same summaries as `nomoat status`.

:func:`snapshot` takes :func:`coordinator.observe.status.overview` (jobs, workers, versions) and adds
what only the page shows: each job's progress and ETA, the held-out-loss curve (one point per
version), the adapters each version folded with their weights and workers, and the newest
refusals with their reasons (coordinator.ledger.counters). :func:`to_json` turns it into the
JSON the page reads; every field of a status summary goes through as it is, so a field another
part adds to one (a worker's trust or kind) reaches the page without a change here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict

from coordinator.observe import status
from coordinator.ledger import Ledger, Refusal
from coordinator.settings import Settings
from nomoat.v1 import nomoat_pb2 as pb

RECENT_JOBS = 20  # finished jobs shown beside the running ones
RECENT_VERSIONS = 30  # versions whose contributions are listed
LOSS_POINTS = 200  # the newest versions the loss curve shows (a page: the history is not read at every refresh)
RECENT_REFUSALS = 50
GONE_WORKERS = 20  # workers no longer heard from, shown after the active ones


@dataclass(frozen=True)
class JobView:
    job: status.JobSummary
    progress: float  # finished tasks (done or failed) / all tasks, 0..1
    eta_s: float | None  # seconds until every task is finished, at the pace so far; None while unknown


@dataclass(frozen=True)
class LossPoint:
    version: int
    loss: float
    measured_as: str  # "fold": the version's own held-out loss; "base": a job's loss before its first fold


@dataclass(frozen=True)
class Contribution:
    adapter_id: str
    weight: float
    worker: str  # worker id, "" when none was credited
    tokens: int
    train_loss: float


@dataclass(frozen=True)
class VersionView:
    version: status.VersionSummary
    contributions: list[Contribution]


@dataclass(frozen=True)
class Snapshot:
    at: float
    jobs: list[JobView]
    workers: list[status.WorkerSummary]
    versions: list[VersionView]  # the newest RECENT_VERSIONS, newest first
    loss_curve: list[LossPoint]  # each of the newest LOSS_POINTS versions that has a loss, oldest first
    refusals: list[Refusal]
    tokens_per_s: float  # the active workers' measured speeds, summed


def eta_s(job: status.JobSummary, now: float) -> float | None:
    """Seconds until the job's every task is finished, at the pace it kept since it was submitted:
    elapsed × unfinished / finished. 0 once it is no longer running; None before a task finished."""
    if job.state != "running":
        return 0.0
    finished = job.tasks.get("done", 0) + job.tasks.get("failed", 0)
    if finished <= 0 or job.total_tasks <= 0:
        return None
    return max(0.0, now - job.created) * max(0, job.total_tasks - finished) / finished


def progress(job: status.JobSummary) -> float:
    if job.total_tasks <= 0:
        return 1.0 if job.state != "running" else 0.0
    return min(1.0, (job.tasks.get("done", 0) + job.tasks.get("failed", 0)) / job.total_tasks)


def loss_curve(jobs: list[status.JobSummary], versions: list[status.VersionSummary]) -> list[LossPoint]:
    """One point per version with a held-out loss: its own, or, for a version nothing was folded
    into (version 0, the base model), the loss a job measured on it before its first fold."""
    base = {j.base_version: j.base_loss for j in sorted(jobs, key=lambda j: j.created)
            if j.base_version >= 0 and math.isfinite(j.base_loss)}
    points = []
    for v in versions:
        if math.isfinite(v.eval_loss):
            points.append(LossPoint(v.version, v.eval_loss, "fold"))
        elif v.version in base:
            points.append(LossPoint(v.version, base[v.version], "base"))
    return points


def _contributions(ledger: Ledger, version: status.VersionSummary) -> list[Contribution]:
    """The adapters a version folded, with the weight each had in its fold."""
    return [Contribution(a.adapter_id, a.weight or 0.0, a.worker, a.tokens, a.train_loss)
            for a in ledger.adapters.many(version.adapter_ids)]


def snapshot(ledger: Ledger, settings: Settings, now: float | None = None) -> Snapshot:
    """Everything the page shows, read from the ledger now."""
    now = time.time() if now is None else now
    # The running jobs and active workers whole, the newest of what is over: one page of each.
    view = status.overview(ledger, settings, limit=RECENT_JOBS, versions_limit=LOSS_POINTS)
    running = [j for j in view.jobs if j.state == "running"]
    finished = sorted((j for j in view.jobs if j.state != "running"), key=lambda j: -j.created)[:RECENT_JOBS]
    jobs = [JobView(j, progress(j), eta_s(j, now)) for j in sorted(running, key=lambda j: -j.created) + finished]
    active = sorted((w for w in view.workers if w.state == "active"), key=lambda w: w.name)
    gone = sorted((w for w in view.workers if w.state != "active"), key=lambda w: -w.last_seen)[:GONE_WORKERS]
    recent = [VersionView(v, _contributions(ledger, v)) for v in reversed(view.versions[-RECENT_VERSIONS:])]
    return Snapshot(
        at=now, jobs=jobs, workers=active + gone, versions=recent, loss_curve=loss_curve(view.jobs, view.versions),
        refusals=ledger.counters.recent_refusals(RECENT_REFUSALS),
        tokens_per_s=sum(w.tokens_per_s for w in active),
    )


def card(serialized: bytes) -> dict[str, Any]:
    """A worker's registered Card message as a plain dict (empty when it registered none)."""
    return MessageToDict(pb.Card.FromString(serialized), preserving_proto_field_name=True) if serialized else {}


def _plain(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null (JSON has neither), bytes a Card, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _worker(w: status.WorkerSummary) -> dict[str, Any]:
    fields = {f.name: getattr(w, f.name) for f in dataclasses.fields(w)}
    fields["card"] = card(w.card)
    return fields


def to_json(s: Snapshot) -> dict[str, Any]:
    """The snapshot as the page reads it (coordinator/gateway/web/app.js)."""
    return _plain({
        "at": s.at,
        "tokens_per_s": s.tokens_per_s,
        "jobs": [{**dataclasses.asdict(j.job), "progress": j.progress, "eta_s": j.eta_s} for j in s.jobs],
        "workers": [_worker(w) for w in s.workers],
        "versions": [{**dataclasses.asdict(v.version), "contributions": [dataclasses.asdict(c) for c in v.contributions]}
                     for v in s.versions],
        "loss_curve": [dataclasses.asdict(p) for p in s.loss_curve],
        "refusals": [dataclasses.asdict(r) for r in s.refusals],
    })
