"""The ledger's typed records: what the rest of the coordinator sees of Redis.

Redis stores every field as a string. These frozen dataclasses are what the rest of the
coordinator sees: numbers are numbers, states are enums, JSON documents are parsed. The
conversion happens in :mod:`coordinator.ledger.codec` and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from coordinator.schedule.noise import NoiseScale, Sample


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
    HELD = "held"  # a run of a replicated task: waits until its replicas settle (coordinator.schedule.replication)
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
    SHARD = "shard"  # it did not learn from its own shard (FoldPolicy.learned_from_shard)
    COPY = "copy"  # its bytes are another task's adapter, already handed in


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
    # Card (its worker id, or its node id when it names none) -> the VRAM the task needs there,
    # more than that card has: it ran out of memory on it. A floor for that card only, so one
    # worker's report strands the task nowhere else (coordinator.schedule.scheduler).
    vram_floors: dict[str, float] = field(default_factory=dict)
    events: tuple[tuple[float, str], ...] = ()
    twin: str = ""  # a speculative second lease on this task (see Leases.speculate)
    twin_of: str = ""  # set on the twin: the task it races
    holder_worker: str = ""  # the worker the newest lease was placed on ("" when its node named none)
    # What the newest lease's run trains at (coordinator.fold.policy.FoldPolicy.task_training: the
    # job's batch and lr, or its batch / K at a scaled lr); 0 until the task is first leased.
    batch_size: int = 0
    learning_rate: float = 0.0
    # A replica run of a replicated task (coordinator.schedule.replication): the task it repeats, the
    # volunteers it may not go to (those whose runs it checks), and base_version fixed (pinned)
    # at creation so that every run of the task trains from the same version.
    replica_of: str = ""
    avoid: tuple[str, ...] = ()
    pinned: bool = False
    fold_width: int = 1  # K: the adapters whose fold its batch was divided for

    @property
    def min_vram_gb(self) -> float:
        """The most any card's floor asks (0: none ran out of memory)."""
        return max(self.vram_floors.values(), default=0.0)

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
    kind: str = "outbound"  # how it takes work, fixed when it registered: "ray" or "outbound"


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
    (what :func:`coordinator.schedule.standing.standing` reads), oldest first."""

    volunteer: str
    counts: dict[str, int] = field(default_factory=dict)  # outcome ("accepted", "agreed", a Check) -> count
    recent: tuple[TrustEvent, ...] = ()
    versions: dict[int, int] = field(default_factory=dict)  # version -> its adapters folded into it
    held: int = 0  # its adapters held in replica groups, waiting to be checked
    probation: bool = False  # minted by the join code: on probation until it has earned trust
    banned: bool = False  # an operator banned it (coordinator.schedule.roster.ban)

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
