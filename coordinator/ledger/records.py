"""The ledger's typed records, and their conversion to and from Redis hashes.

Redis stores every field as a string. These frozen dataclasses are what the rest of the
coordinator sees: numbers are numbers, states are enums, JSON documents are parsed. The
conversion happens here and nowhere else (``*_from_hash``, ``to_fields``), so no caller ever
calls ``int()`` or ``json.loads`` on a ledger value.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from coordinator.noise import NoiseScale, Sample


class _State(str, Enum):
    """A state stored as its plain string: it prints, formats and serializes as the value."""

    __str__ = str.__str__
    __format__ = str.__format__


class JobState(_State):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class TaskState(_State):
    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"


class AdapterState(_State):
    BUFFERED = "buffered"
    FOLDED = "folded"
    REJECTED = "rejected"
    UNMERGED = "unmerged"
    HELD = "held"  # a run of a replicated task: waits until its replicas settle (coordinator.replication)
    REPLICA = "replica"  # agreed with a replica that was folded instead (a task is folded once)


class Check(_State):
    """Why a volunteer's contribution failed a check: the kinds its trust record counts."""

    CORRUPT = "corrupt"  # the bytes do not match the manifest's size or sha256
    MALFORMED = "malformed"  # not a nomoat adapter of the job's LoRA config, or a manifest that lies
    NORM = "norm"  # its update norm is far beyond the recent median
    LOSS = "loss"  # adding it alone makes held-out loss worse
    FOLD = "fold"  # dropped as the worst contributor of a fold that was not publishable
    STALE = "stale"  # trained on a version too old to fold (the schedule's doing, not the volunteer's)
    DISAGREED = "disagreed"  # its replicas, run with the same seed and shard, came out otherwise


@dataclass(frozen=True)
class JobConfig:
    """How a job's tasks train: fixed at submission, the same for every task of the job."""

    lora_rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    seq_len: int
    learning_rate: float
    batch_size: int
    epochs: int
    tokens_per_task: int
    plan_model: str = ""  # see JobDefaults.plan_model
    # Each task continues from its worker's previous adapter of the job and uploads the exact
    # rank-2r difference (worker.warmstart); opt-in (bench/quality.py measured it no better).
    warm_start: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        return cls(**{**d, "target_modules": tuple(d["target_modules"])})


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    name: str
    config: JobConfig
    dataset: str = ""  # sha256 of the file as submitted
    records: str = ""  # sha256 of the shuffled records blob the tasks index into
    n_records: int = 0
    n_validation: int = 0  # the first n records of the blob are the held-out slice
    tokens: int = 0
    total_tasks: int = 0
    state: JobState = JobState.RUNNING
    created: float = 0.0
    finished: float = 0.0
    adapters_folded: int = 0
    adapters_rejected: int = 0
    error: str = ""
    warning: str = ""
    base_loss: float | None = None  # held-out loss of the version the job started from
    base_version: int | None = None
    noise: NoiseScale = NoiseScale()  # its gradient noise scale, from its accepted adapters


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    job: str
    index: int = 0
    start: int = 0  # [start, end): the records of the job's blob this task trains on
    end: int = 0
    tokens: int = 0
    state: TaskState = TaskState.PENDING
    fence: int = 0
    attempts: int = 0
    deadline: float = 0.0
    leased_at: float = 0.0
    base_version: int = -1  # the version the current lease's run trains on
    claimed: int = 0  # the fence whose first heartbeat fixed base_version (0: none yet)
    finished: float = 0.0
    error: str = ""
    adapter: str = ""  # the accepted adapter, once done
    min_vram_gb: float = 0.0  # raised past a card the task ran out of memory on
    events: tuple[tuple[float, str], ...] = ()
    twin: str = ""  # a speculative second lease on this task (see Leases.speculate)
    twin_of: str = ""  # set on the twin: the task it races
    holder_fence: int = 0
    holder_token: str = ""
    holder_worker: str = ""
    # What the newest lease's run trains at (coordinator.policy.FoldPolicy.task_training: the
    # job's batch and lr, or its batch / K at a scaled lr); 0 until the task is first leased.
    batch_size: int = 0
    learning_rate: float = 0.0
    # A replica run of a replicated task (coordinator.replication): the task it repeats, the
    # volunteers it may not go to (those whose runs it checks), and base_version fixed (pinned)
    # at creation so that every run of the task trains from the same version.
    replica_of: str = ""
    avoid: tuple[str, ...] = ()
    pinned: bool = False
    fold_width: int = 1  # K: the adapters whose fold its batch was divided for

    @property
    def partner(self) -> str:
        """The other run of a speculated task (its twin, or the original), "" when none."""
        return self.twin or self.twin_of


@dataclass(frozen=True)
class Lease:
    task_id: str
    deadline: float


@dataclass(frozen=True)
class AdapterRecord:
    adapter_id: str
    task: str
    fence: int
    sha256: str
    job: str = ""
    worker: str = ""  # the worker credited, "" when none was named
    base_version: int = 0
    rank: int = 0
    alpha: float = 0.0
    tokens: int = 0
    train_loss: float = math.nan
    size: int = 0
    state: AdapterState = AdapterState.BUFFERED
    accepted: float = 0.0
    reason: str = ""  # why it was rejected
    volunteer: str = ""  # whose work it is: the uploader's token id (or its worker id), for trust
    version: int | None = None  # the version it was folded into
    weight: float | None = None  # its weight in that fold
    unmerged_in: int | None = None
    gradients: Sample = Sample(0.0, 0.0, 0.0, 0.0)  # its worker's gradient noise measurement


@dataclass(frozen=True)
class FoldedAdapter:
    """One adapter of a version: its id, fold weight and staleness."""

    id: str
    weight: float
    tau: int = 0


@dataclass(frozen=True)
class VersionRecord:
    """A model version. Every version is built as one of these and published by
    :meth:`coordinator.ledger.versions.Versions.publish`; ``created`` is set there."""

    version: int
    parent: int
    patch: str = ""  # sha256 of the exact low-rank update from the parent ("" for version 0)
    files: dict[str, str] = field(default_factory=dict)  # a snapshot: path -> sha256, or empty
    adapters: tuple[FoldedAdapter, ...] = ()
    eval_loss: float = math.nan
    metrics: dict[str, Any] = field(default_factory=dict)
    job_id: str = ""  # the jobs folded, comma-separated
    delta: str = ""  # sha256 of the plain fold when an outer step made the patch
    created: float = 0.0

    @property
    def operation(self) -> str:
        """"rollback" or "unmerge" for a history operation, "" for a fold."""
        return self.metrics.get("operation", "")

    @property
    def jobs(self) -> list[str]:
        return list(self.metrics.get("jobs", []))


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    name: str = ""
    card: bytes = b""  # a serialized nomoat.v1.Card
    node_id: str = ""  # the Ray node it runs on, as last reported
    token: str = ""  # hash of the token that registered it
    registered: float = 0.0
    last_seen: float = 0.0
    tasks_done: int = 0
    tokens_trained: float = 0.0
    train_seconds: float = 0.0
    tokens_per_s: float = 0.0  # measured; 0 while unknown


@dataclass(frozen=True)
class TrustEvent:
    """One outcome of a volunteer's contribution: ``accepted`` (folded), ``agreed`` (a replica
    matched it), or the :class:`Check` it failed; with when and a sentence."""

    at: float
    outcome: str
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.outcome not in ("accepted", "agreed")


@dataclass(frozen=True)
class TrustRecord:
    """What a volunteer's contributions earned: counts per outcome, and the newest outcomes
    (what :func:`coordinator.trust.standing` reads), oldest first."""

    volunteer: str
    counts: dict[str, int] = field(default_factory=dict)  # outcome ("accepted", "agreed", a Check) -> count
    recent: tuple[TrustEvent, ...] = ()
    versions: dict[int, int] = field(default_factory=dict)  # version -> its adapters folded into it
    held: int = 0  # its adapters held in replica groups, waiting to be checked

    @property
    def accepted(self) -> int:
        return self.counts.get("accepted", 0)

    @property
    def agreed(self) -> int:
        return self.counts.get("agreed", 0)

    @property
    def disagreed(self) -> int:
        return self.counts.get(Check.DISAGREED.value, 0)

    @property
    def refused(self) -> int:
        """Contributions that failed a check, a disagreement included."""
        return sum(n for k, n in self.counts.items() if k not in ("accepted", "agreed"))

    def reasons(self) -> dict[str, int]:
        """Failed checks by kind, most frequent first."""
        failed = {k: n for k, n in self.counts.items() if k not in ("accepted", "agreed") and n}
        return dict(sorted(failed.items(), key=lambda kv: -kv[1]))


@dataclass(frozen=True)
class ReplicaGroup:
    """A replicated task: the runs that repeat it (with the same seed, shard and base version)
    and the adapter each run of it handed in, until the group is settled."""

    task_id: str
    job: str = ""
    base_version: int = 0
    state: str = "open"  # open | agreed | settled | unsettled | unverified
    opened: float = 0.0
    runs: tuple[str, ...] = ()  # the replica runs, in the order they were opened
    results: dict[str, str] = field(default_factory=dict)  # run (the task, its twin or a replica) -> adapter id
    settled: float = 0.0

    @property
    def open(self) -> bool:
        return self.state == "open"


# -- conversion ------------------------------------------------------------------------------


def decode(mapping: dict[bytes | str, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in mapping.items()
    }


def to_fields(fields: dict[str, Any]) -> dict[str, str]:
    """A record's fields as Redis hash values: JSON for documents, hex for bytes; None is left out."""
    out = {}
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, Enum):
            out[key] = value.value
        elif isinstance(value, JobConfig):
            out[key] = json.dumps(value.to_dict())
        elif isinstance(value, (dict, list, tuple)):
            out[key] = json.dumps(value)
        elif isinstance(value, bytes):
            out[key] = value.hex()
        elif isinstance(value, bool):
            out[key] = "1" if value else "0"
        else:
            out[key] = str(value)
    return out


def _num(data: dict[str, str], key: str, kind: type, default: Any = 0) -> Any:
    value = data.get(key)
    return default if value in (None, "") else kind(float(value) if kind is int else value)


def _maybe(data: dict[str, str], key: str, kind: type) -> Any:
    return _num(data, key, kind, None)


NOISE_FIELDS = ("noise_g2", "noise_trace", "noise_samples")  # a job's NoiseScale, in its hash


def noise_from_hash(data: dict[str, str | None]) -> NoiseScale:
    return NoiseScale(_num(data, "noise_g2", float), _num(data, "noise_trace", float),
                      _num(data, "noise_samples", int))


def job_from_hash(job_id: str, data: dict[str, str]) -> JobRecord:
    return JobRecord(
        job_id=job_id, name=data.get("name", ""), config=JobConfig.from_dict(json.loads(data["config"])),
        dataset=data.get("dataset", ""), records=data.get("records", ""),
        n_records=_num(data, "n_records", int), n_validation=_num(data, "n_validation", int),
        tokens=_num(data, "tokens", int), total_tasks=_num(data, "total_tasks", int),
        state=JobState(data.get("state", "running")), created=_num(data, "created", float),
        finished=_num(data, "finished", float), adapters_folded=_num(data, "adapters_folded", int),
        adapters_rejected=_num(data, "adapters_rejected", int), error=data.get("error", ""),
        warning=data.get("warning", ""), base_loss=_maybe(data, "base_loss", float),
        base_version=_maybe(data, "base_version", int),
        noise=noise_from_hash(data),
    )


def task_from_hash(data: dict[str, str]) -> TaskRecord:
    return TaskRecord(
        task_id=data["task_id"], job=data.get("job", ""), index=_num(data, "index", int),
        start=_num(data, "start", int), end=_num(data, "end", int), tokens=_num(data, "tokens", int),
        state=TaskState(data.get("state", "pending")), fence=_num(data, "fence", int),
        attempts=_num(data, "attempts", int), deadline=_num(data, "deadline", float),
        leased_at=_num(data, "leased_at", float), base_version=_num(data, "base_version", int, -1),
        claimed=_num(data, "claimed", int),
        finished=_num(data, "finished", float), error=data.get("error", ""), adapter=data.get("adapter", ""),
        min_vram_gb=_num(data, "min_vram_gb", float),
        events=tuple((float(t), e) for t, e in json.loads(data.get("events") or "[]")),
        twin=data.get("twin", ""), twin_of=data.get("twin_of", ""),
        holder_fence=_num(data, "holder_fence", int), holder_token=data.get("holder_token", ""),
        holder_worker=data.get("holder_worker", ""),
        batch_size=_num(data, "batch_size", int), learning_rate=_num(data, "learning_rate", float),
        replica_of=data.get("replica_of", ""), avoid=tuple(json.loads(data.get("avoid") or "[]")),
        pinned=data.get("pinned") == "1",
        fold_width=_num(data, "fold_width", int, 1),
    )


def new_task_fields(task: TaskRecord) -> dict[str, str]:
    """The hash of a task as a job creates it: its shard, pending, never leased."""
    return to_fields({"task_id": task.task_id, "job": task.job, "index": task.index, "start": task.start,
                      "end": task.end, "tokens": task.tokens, "state": TaskState.PENDING, "attempts": 0,
                      "fence": 0})


def new_job_fields(job: JobRecord, created: float) -> dict[str, str]:
    return to_fields({"name": job.name, "config": job.config, "dataset": job.dataset, "records": job.records,
                      "n_records": job.n_records, "n_validation": job.n_validation, "tokens": job.tokens,
                      "total_tasks": job.total_tasks, "state": JobState.RUNNING, "created": created,
                      "adapters_folded": 0, "adapters_rejected": 0})


def adapter_from_hash(adapter_id: str, data: dict[str, str]) -> AdapterRecord:
    return AdapterRecord(
        adapter_id=adapter_id, task=data.get("task", ""), fence=_num(data, "fence", int),
        sha256=data.get("sha256", ""), job=data.get("job", ""), worker=data.get("worker", ""),
        base_version=_num(data, "base_version", int), rank=_num(data, "rank", int),
        alpha=_num(data, "alpha", float), tokens=_num(data, "tokens", int),
        train_loss=_num(data, "train_loss", float, math.nan), size=_num(data, "size", int),
        state=AdapterState(data.get("state", "buffered")), accepted=_num(data, "accepted", float),
        reason=data.get("reason", ""), volunteer=data.get("volunteer", ""), version=_maybe(data, "version", int),
        weight=_maybe(data, "weight", float), unmerged_in=_maybe(data, "unmerged_in", int),
        gradients=Sample(_num(data, "grad_micro_sq", float), _num(data, "grad_batch_sq", float),
                         _num(data, "grad_micro_batch", float), _num(data, "grad_batch_size", float)),
    )


def version_from_hash(number: int, data: dict[str, str]) -> VersionRecord:
    return VersionRecord(
        version=number, parent=_num(data, "parent", int, -1), patch=data.get("patch", ""),
        files=json.loads(data["files"]) if data.get("files") else {},
        adapters=tuple(FoldedAdapter(a["id"], float(a["weight"]), int(a.get("tau", 0)))
                       for a in json.loads(data.get("adapters") or "[]")),
        eval_loss=_num(data, "eval_loss", float, math.nan),
        metrics=json.loads(data["metrics"]) if data.get("metrics") else {},
        job_id=data.get("job_id", ""), delta=data.get("delta", ""), created=_num(data, "created", float),
    )


def version_fields(record: VersionRecord) -> dict[str, str]:
    fields: dict[str, Any] = {
        "parent": record.parent, "adapters": [asdict(a) for a in record.adapters],
        "eval_loss": record.eval_loss, "job_id": record.job_id, "created": record.created,
    }
    for key in ("patch", "delta", "files", "metrics"):  # absent when empty, as they always were
        if getattr(record, key):
            fields[key] = getattr(record, key)
    return to_fields(fields)


def worker_from_hash(worker_id: str, data: dict[str, str], last_seen: float) -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id, name=data.get("name", ""), card=bytes.fromhex(data.get("card", "")),
        node_id=data.get("node_id", ""), token=data.get("token", ""), registered=_num(data, "registered", float),
        last_seen=last_seen, tasks_done=_num(data, "tasks_done", int),
        tokens_trained=_num(data, "tokens_trained", float), train_seconds=_num(data, "train_seconds", float),
        tokens_per_s=_num(data, "tokens_per_s", float),
    )


def trust_from_hash(volunteer: str, data: dict[str, str], versions: dict[str, float]) -> TrustRecord:
    counts = {k[2:]: int(float(v)) for k, v in data.items() if k.startswith("n:")}
    recent = tuple(TrustEvent(float(t), o, d) for t, o, d in json.loads(data.get("recent") or "[]"))
    return TrustRecord(volunteer, counts, recent, {int(v): int(n) for v, n in versions.items()},
                       held=_num(data, "held", int))


def replica_group_from_hash(task_id: str, data: dict[str, str]) -> ReplicaGroup:
    return ReplicaGroup(
        task_id=task_id, job=data.get("job", ""), base_version=_num(data, "base_version", int),
        state=data.get("state", "open"), opened=_num(data, "opened", float),
        runs=tuple(json.loads(data.get("runs") or "[]")), results=dict(json.loads(data.get("results") or "{}")),
        settled=_num(data, "settled", float),
    )
