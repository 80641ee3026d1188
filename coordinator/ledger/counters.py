"""Counters: what happened since the ledger began (leases, expiries, re-issues, uploads, folds),
and the newest refusals with their reasons.

They live in Redis, not in a process, for two reasons: a restarted coordinator goes on counting
from where its predecessor stopped, and several gRPC frontends sharing one ledger all report the
same figures (Prometheus then takes ``max`` across them, not ``sum``). The lease counters are
added by the lease scripts themselves (coordinator.ledger.leases), in the same atomic step as the
transition they count, so they never drift from the tasks' states. :meth:`Counters.tally` reads
them all as one typed :class:`Tally` (coordinator.observe.metrics turns it into Prometheus families).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import redis

from coordinator.ledger import keys

# The counter names in keys.COUNTERS that the lease scripts add to (their Lua names them as these).
LEASES, REISSUES, LEASES_EXPIRED, SPECULATIONS = "leases", "reissues", "leases_expired", "speculations"
UPLOAD_BYTES = "upload_bytes"
# "held": accepted by the ledger but held in a replicated task's group until its replicas agree
# (coordinator.schedule.replication), so neither buffered for a fold nor refused.
UPLOAD_OUTCOMES = ("accepted", "held", "duplicate", "refused")
FOLD_OUTCOMES = ("published", "nothing")  # a fold that published a version, or one whose every adapter was dropped
# Upper bounds (seconds) of the fold-duration histogram's buckets; +Inf is implied.
FOLD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Bytes this coordinator's gateways moved themselves, by what: model files pulled, shards fetched,
# adapters received. With an object store clients move them by presigned URLs, and these stay 0.
GATEWAY_KINDS = ("pull", "shard", "upload")
MAX_REFUSALS = 200  # the newest refusals kept for the dashboard
# Ledger-wide totals kept where the state changes, so /metrics reads them instead of every job:
# "tasks:<state>" (coordinator.ledger.tasks.COUNT), "jobs:<done|failed>" (Jobs.finish),
# "adapters:<folded|rejected>"; TOTALS_COUNTED marks a ledger whose totals were counted once from
# its history (Ledger.index).
TOTALS_COUNTED = "totals:counted"


@dataclass(frozen=True)
class Refusal:
    """An upload refused, or an adapter a fold gate rejected: what, whose, and why."""

    at: float
    stage: str  # "upload" or "fold"
    kind: str  # a short, fixed code (coordinator.collect.accept's REFUSED_*, or "gate"): a Prometheus label
    reason: str  # the sentence the worker (or the status) was given
    task: str = ""
    worker: str = ""
    job: str = ""


@dataclass(frozen=True)
class Histogram:
    """Counts per bucket (not cumulative) for FOLD_BUCKETS and +Inf, their sum and count."""

    buckets: tuple[int, ...]
    total: float = 0.0
    count: int = 0

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), +Inf last: Prometheus' ``le`` buckets."""
        out, running = [], 0
        for bound, n in zip((*FOLD_BUCKETS, math.inf), self.buckets):
            running += n
            out.append((bound, running))
        return out


@dataclass(frozen=True)
class Tally:
    leases: int = 0  # leases granted (first leases and re-issues)
    reissues: int = 0  # leases of a task that had been leased before (its lease expired, failed or was stopped)
    leases_expired: int = 0
    speculations: int = 0  # second leases given to a straggler (Leases.speculate)
    uploads: dict[str, int] = field(default_factory=dict)  # outcome -> uploads
    upload_bytes: int = 0  # bytes of adapters accepted
    refusals: dict[tuple[str, str], int] = field(default_factory=dict)  # (stage, kind) -> refusals
    folds: dict[str, int] = field(default_factory=dict)  # outcome -> folds
    fold_seconds: Histogram = field(default_factory=lambda: Histogram((0,) * (len(FOLD_BUCKETS) + 1)))
    gateway_bytes: dict[str, int] = field(default_factory=dict)  # GATEWAY_KINDS -> bytes through a gateway


def _bucket(seconds: float) -> int:
    return next((i for i, bound in enumerate(FOLD_BUCKETS) if seconds <= bound), len(FOLD_BUCKETS))


class Counters:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def upload(self, outcome: str, size: int, refusal: Refusal | None = None) -> None:
        """Count one upload's answer (``UPLOAD_OUTCOMES``); an accepted (or held) one adds its bytes, a
        refused one is kept among the recent refusals."""
        if outcome not in UPLOAD_OUTCOMES:
            raise ValueError(f"unknown upload outcome {outcome!r}")
        pipe = self.r.pipeline(transaction=True)
        pipe.hincrby(keys.COUNTERS, f"uploads:{outcome}", 1)
        if outcome in ("accepted", "held"):
            pipe.hincrby(keys.COUNTERS, UPLOAD_BYTES, max(0, int(size)))
        if refusal is not None:
            self._refuse(pipe, refusal)
        pipe.execute()

    def refuse(self, refusal: Refusal, pipe: redis.client.Pipeline | None = None) -> None:
        """Count a refusal and keep it among the recent ones (in ``pipe`` when given: the caller's
        transaction, so it is counted with the change it explains)."""
        if pipe is not None:
            self._refuse(pipe, refusal)
            return
        own = self.r.pipeline(transaction=True)
        self._refuse(own, refusal)
        own.execute()

    @staticmethod
    def _refuse(pipe: redis.client.Pipeline, refusal: Refusal) -> None:
        pipe.hincrby(keys.COUNTERS, f"refusals:{refusal.stage}:{refusal.kind}", 1)
        pipe.lpush(keys.REFUSALS, json.dumps(asdict(refusal)))
        pipe.ltrim(keys.REFUSALS, 0, MAX_REFUSALS - 1)

    def fold(self, seconds: float, published: bool) -> None:
        """Count one fold (gates, evaluations and publishing) that took ``seconds``."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hincrby(keys.COUNTERS, f"folds:{FOLD_OUTCOMES[0] if published else FOLD_OUTCOMES[1]}", 1)
        pipe.hincrby(keys.COUNTERS, f"fold_seconds:bucket:{_bucket(seconds)}", 1)
        pipe.hincrbyfloat(keys.COUNTERS, "fold_seconds:sum", max(0.0, seconds))
        pipe.hincrby(keys.COUNTERS, "fold_seconds:count", 1)
        pipe.execute()

    def gateway(self, kind: str, n: int) -> None:
        """Count ``n`` bytes a gateway moved itself (``GATEWAY_KINDS``)."""
        if kind not in GATEWAY_KINDS:
            raise ValueError(f"unknown gateway byte kind {kind!r}")
        if n > 0:
            self.r.hincrby(keys.COUNTERS, f"gateway_bytes:{kind}", int(n))

    def recent_refusals(self, limit: int = 50) -> list[Refusal]:
        """The newest refusals, newest first."""
        return [Refusal(**json.loads(raw)) for raw in self.r.lrange(keys.REFUSALS, 0, limit - 1)]

    def totals(self) -> dict[str, int]:
        """The ledger-wide totals (tasks by state, finished jobs, adapters folded and rejected),
        one read: name -> count, those never written as 0."""
        names = [f"tasks:{s}" for s in ("pending", "leased", "done", "failed")]
        names += ["jobs:done", "jobs:failed", "adapters:folded", "adapters:rejected"]
        return {n: max(0, int(v or 0)) for n, v in zip(names, self.r.hmget(keys.COUNTERS, names))}

    def tally(self) -> Tally:
        """Every counter, typed (counters never written read as 0)."""
        raw = {k.decode(): v.decode() for k, v in self.r.hgetall(keys.COUNTERS).items()}

        def n(name: str) -> int:
            return int(float(raw.get(name, 0)))

        refusals = {}
        for name in raw:
            if name.startswith("refusals:"):
                _, stage, kind = name.split(":", 2)
                refusals[(stage, kind)] = n(name)
        return Tally(
            leases=n(LEASES), reissues=n(REISSUES), leases_expired=n(LEASES_EXPIRED), speculations=n(SPECULATIONS),
            uploads={o: n(f"uploads:{o}") for o in UPLOAD_OUTCOMES}, upload_bytes=n(UPLOAD_BYTES),
            refusals=refusals, folds={o: n(f"folds:{o}") for o in FOLD_OUTCOMES},
            fold_seconds=Histogram(tuple(n(f"fold_seconds:bucket:{i}") for i in range(len(FOLD_BUCKETS) + 1)),
                                   float(raw.get("fold_seconds:sum", 0.0)), n("fold_seconds:count")),
            gateway_bytes={k: n(f"gateway_bytes:{k}") for k in GATEWAY_KINDS},
        )

