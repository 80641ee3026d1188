"""Replication: a sample of tasks is trained again by another volunteer, and the runs compared.

Which tasks: :func:`sampled` picks ``replicate_fraction`` of them (5 % by default), by an HMAC of
the task id under a secret key only the coordinator holds (made once in the ledger, so the choice
is the same on every coordinator process and after a restart, and no volunteer can compute which
tasks are checked and be honest only there); every task of a throttled volunteer is replicated (coordinator.schedule.standing.replicate_rate). A task is replicated only
when some other volunteer that may take tasks is active, since a replica must go to another one.

How: the first adapter of a replicated task is accepted *held* and opens a replica run
(coordinator.ledger.replicas): the same shard, seed (the task's index) and base version, leased
like any task to a volunteer other than the first. Two runs *agree* when

* the relative distance of their updates, ``‖ΔW_1 − ΔW_2‖_F / max(‖ΔW_1‖_F, ‖ΔW_2‖_F)`` over all
  modules (ΔW = s·B·A, from the factors, never densely: the difference is itself a rank-2r
  product), is at most ``replica_tolerance``, and
* their training losses on the shard differ by at most ``replica_loss_tolerance`` nats.

The tolerances come from runs of one task by the real trainer on the CPU (bench/replication.py,
the tiny model, 45 steps at the default job's per-task batch and lr): the same seed on the same
plan gives the same adapter bit for bit (distance 0, loss gap 0); the same seed at micro-batch 1
instead of 2 (what another card's memory plan does) is 1.0e-5 apart, loss gap 2.6e-8. An honest
run with another seed is 1.35 apart, the update scaled x50 0.98, a random update of its norm
1.41. ``replica_tolerance`` 0.05 is 5,000 times the honest gap, leaving room for cards whose
kernels and precision differ (bf16 compute on a GPU; not measured here, there was none), and 20
times below the nearest dishonest one. The losses cannot tell runs apart as well (another seed's
is only 3.4e-3 off): ``replica_loss_tolerance`` 0.02 nats catches a worker that reports a loss
it did not have, the distance does the rest.

Settling (:func:`decide`, pure): two runs that agree fold one of them (the first: a task is folded
once), the other is kept as a replica; both volunteers earn an "agreed". Two that disagree open
a third run, avoiding both volunteers; the majority of three settles it: one of the majority is
folded, the outlier is rejected and its volunteer's trust counts a disagreement. Three runs that
all disagree, a disagreement no third volunteer settled in time, are rejected without blame. A
task whose replica never ran (no other volunteer took it in ``replica_timeout_s``, or no
volunteer who may take it is left) is folded unverified: nothing is lost for want of a second
volunteer.

:meth:`Replication.sweep` does this once per scheduler round for every open group; it is the
only place groups are settled (one thread), and the ledger's settle is atomic and once only.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from coordinator.fold import folding

from coordinator.schedule import standing
from coordinator.ledger import (
    AdapterRecord,
    Check,
    Hold,
    Ledger,
    ReplicaGroup,
    Settlement,
    TaskRecord,
    TaskState,
    replica_id,
)
from coordinator.settings import Settings
from coordinator.model.store import BlobStore
from coordinator.schedule.registration import ACTIVE_TTLS
from nomoat import adapter as adapter_format
from nomoat.adapter import Adapter
from nomoat.logs import fields

log = logging.getLogger("nomoat.replication")
MAX_RUNS = 3  # the task, a replica, and a third to settle a disagreement


@dataclass(frozen=True)
class ReplicationPolicy:
    fraction: float = 0.05
    tolerance: float = 0.05
    loss_tolerance: float = 0.02
    timeout_s: float = 1800.0

    @classmethod
    def of(cls, settings: Settings) -> ReplicationPolicy:
        return cls(settings.replicate_fraction, settings.replica_tolerance, settings.replica_loss_tolerance,
                   settings.replica_timeout_s)


def sampled(task_id: str, rate: float, key: bytes) -> bool:
    """Whether ``task_id`` is among the ``rate`` of tasks replicated: HMAC-SHA256 of the id under
    the coordinator's secret ``key`` (Replicas.sampling_key), the same answer on every process
    that shares the ledger, and unpredictable to anyone without the key."""
    if rate <= 0:
        return False
    draw = int.from_bytes(hmac.new(key, task_id.encode(), hashlib.sha256).digest()[:8], "big") / 2.0**64
    return draw < rate


def distance(a: Adapter, b: Adapter) -> float:
    """``‖ΔW_a − ΔW_b‖_F / max(‖ΔW_a‖_F, ‖ΔW_b‖_F)`` over every module (0 when both are zero)."""
    larger = max(folding.delta_norm(a), folding.delta_norm(b))
    if larger == 0:
        return 0.0
    return folding.delta_norm(folding.build_patch([a, b], [1.0, -1.0])) / larger


def agree(a: Adapter, b: Adapter, loss_a: float, loss_b: float, policy: ReplicationPolicy) -> bool:
    """Whether two runs of one task came out the same, within the policy's tolerances."""
    if not distance(a, b) <= policy.tolerance:
        return False
    if math.isnan(loss_a) or math.isnan(loss_b):  # a worker that reports no loss is judged on its update
        return True
    return abs(loss_a - loss_b) <= policy.loss_tolerance


@dataclass(frozen=True)
class Run:
    """One run's result in a group: which run, its adapter, and whose it is."""

    run: str
    adapter_id: str
    volunteer: str


@dataclass(frozen=True)
class Verdict:
    """What :func:`decide` says to do with a group: wait, open a third run, or settle."""

    wait: bool = False
    third: bool = False
    settlement: Settlement | None = None


def decide(task_id: str, runs: Sequence[Run], agrees: Callable[[int, int], bool], waiting: bool,
           opened: int) -> Verdict:
    """The rule, on results in the order their runs were opened (the task's own first).

    ``agrees(i, j)``: runs i and j agree. ``waiting``: a run opened for the group may still hand
    in a result. ``opened``: how many runs the group has had (results or not), at most MAX_RUNS.
    """
    n = len(runs)
    if n == 0:
        return Verdict(wait=True)
    if n == 1:
        if waiting:
            return Verdict(wait=True)
        return Verdict(settlement=Settlement("unverified", fold=runs[0].adapter_id))
    if n == 2 and agrees(0, 1):
        return Verdict(settlement=_majority(task_id, runs, [0, 1], agrees))
    if n == 2:
        if opened < MAX_RUNS:
            return Verdict(third=True)
        if waiting:
            return Verdict(wait=True)
        why = f"its runs of task {task_id} disagreed, and no third volunteer settled it in time"
        return Verdict(settlement=Settlement("unsettled", rejected=tuple((r.adapter_id, why) for r in runs)))
    friends = [sum(1 for j in range(n) if j != i and agrees(i, j)) for i in range(n)]
    if max(friends) == 0:
        why = f"the {n} runs of task {task_id} all disagree with one another"
        return Verdict(settlement=Settlement("unsettled", rejected=tuple((r.adapter_id, why) for r in runs)))
    majority = [i for i in range(n) if friends[i] > 0]
    return Verdict(settlement=_majority(task_id, runs, majority, agrees))


def _majority(task_id: str, runs: Sequence[Run], majority: list[int], agrees: Callable[[int, int], bool]) -> Settlement:
    """Fold one of the runs that agree (the one most others agree with, the earliest of those);
    the rest of the majority are replicas of it, the others outliers."""
    n = len(runs)
    best = max(majority, key=lambda i: (sum(1 for j in majority if j != i and agrees(i, j)), -i))
    folded = runs[best]
    replicas = tuple((runs[i].adapter_id, f"a replica of task {task_id} that agreed with adapter "
                                          f"{folded.adapter_id}, which is folded instead") for i in majority if i != best)
    outliers = [i for i in range(n) if i not in majority]
    why = (f"it disagreed with {len(majority)} other runs of task {task_id} "
           "(same seed, shard and base version), which agreed with each other")
    outcomes = [(runs[i].volunteer, "agreed", f"task {task_id}: {len(majority)} runs agreed") for i in majority]
    outcomes += [(runs[i].volunteer, Check.DISAGREED.value, why) for i in outliers]
    return Settlement("agreed" if not outliers else "settled", fold=folded.adapter_id, replicas=replicas,
                      rejected=tuple((runs[i].adapter_id, why) for i in outliers), outcomes=tuple(outcomes))


class Replication:
    """The workflow around the rule: which uploads are held, and settling the groups."""

    def __init__(self, settings: Settings, ledger: Ledger, store: BlobStore) -> None:
        self.settings = settings
        self.ledger = ledger
        self.store = store
        self.policy = ReplicationPolicy.of(settings)
        self._agree: dict[tuple[str, str], bool] = {}  # (adapter, adapter) -> agree: a group waits many rounds
        self._key: bytes | None = None  # the sampling key (sampling_key)

    # -- collect: is this upload held? ----------------------------------------------------------

    def hold_for(self, task: TaskRecord, volunteer: str) -> Hold | None:
        """How the adapter ``volunteer`` hands in for ``task`` joins a replica group, or None
        when the task is not replicated."""
        if task.replica_of:
            return Hold(task.replica_of)
        origin = task.twin_of or task.task_id  # a speculative twin hands in its task's result
        if self.ledger.replicas.get(origin) is not None:
            return Hold(origin)
        rate = standing.replicate_rate(self.ledger.trust.get(volunteer), self.policy.fraction)
        if not sampled(origin, rate, self.sampling_key()) or not self._someone_else(volunteer):
            return None
        return Hold(origin, open=replica_id(task.job), avoid=(volunteer,))

    def sampling_key(self) -> bytes:
        """The ledger's sampling key, read once (it never changes)."""
        if self._key is None:
            self._key = self.ledger.replicas.sampling_key()
        return self._key

    def _someone_else(self, volunteer: str) -> bool:
        """Whether an active volunteer other than ``volunteer`` may take tasks."""
        return bool(self._eligible() - {volunteer})

    def _eligible(self) -> set[str]:
        """The active volunteers that may take tasks now."""
        now = time.time()
        workers = self.ledger.workers.active(now - ACTIVE_TTLS * self.settings.lease_ttl_s)  # not every worker ever
        active = {standing.volunteer_of(w.token, w.worker_id) for w in workers}
        records = self.ledger.trust.many(active)
        return {v for v in active if standing.eligible(records.get(v))}

    # -- the scheduler's round: settle what can be settled ----------------------------------------

    def sweep(self, now: float | None = None) -> list[str]:
        """Settle every group whose runs are in (or can no longer come); returns the tasks settled."""
        now = now or time.time()
        settled = []
        known: list[set[str]] = []

        def eligible() -> set[str]:  # read once a round, and only when a group waits on a run
            if not known:
                known.append(self._eligible())
            return known[0]

        for group in self.ledger.replicas.open_groups():
            try:
                if self._advance(group, now, eligible):
                    settled.append(group.task_id)
            except (adapter_format.AdapterFormatError, FileNotFoundError, ValueError) as exc:
                log.warning("replicated task %s cannot be compared yet: %s", group.task_id, exc)
        return settled

    def _advance(self, group: ReplicaGroup, now: float, eligible: Callable[[], set[str]]) -> bool:
        order = [r for r in group.results if r not in group.runs] + [r for r in group.runs if r in group.results]
        records = {r: self.ledger.adapters.get(group.results[r]) for r in order}
        runs = [Run(r, records[r].adapter_id, records[r].volunteer) for r in order if records[r] is not None]
        open_runs = [t for t in self.ledger.tasks.many(group.runs) if t.state in (TaskState.PENDING, TaskState.LEASED)]
        # A replica run waits for its volunteer only while one may come: when every volunteer
        # who could take it has been excluded (or none is left), the group settles now, so a
        # saboteur who fails replicas cannot hold an honest volunteer's work (on probation, its
        # every task) until the timeout.
        waiting = (bool(open_runs) and now - group.opened < self.policy.timeout_s
                   and bool(eligible() - {r.volunteer for r in runs}))
        verdict = decide(group.task_id, runs, self._agrees(runs, records), waiting, 1 + len(group.runs))
        if verdict.third:
            task = self.ledger.tasks.get(group.task_id)
            run = replica_id(group.job or (task.job if task else group.task_id))
            if self.ledger.replicas.add_run(group.task_id, run, [r.volunteer for r in runs]):
                log.warning("the runs of task %s disagree; %s settles it", group.task_id, run,
                            extra=fields("replica.disagreed", task=group.task_id, job=group.job or None,
                                         run=run, adapters=[r.adapter_id for r in runs]))
            return False
        if verdict.settlement is None:
            return False
        how = verdict.settlement
        if not self.ledger.replicas.settle(group, how, retire=[t.task_id for t in open_runs]):
            return False
        for pair in [p for p in self._agree if set(p) & set(group.results.values())]:
            del self._agree[pair]
        # "replica.agreed": every run agreed; "replica.settled": any other end (a majority with an
        # outlier rejected, no agreement at all, or no replica came in time).
        log.log(logging.INFO if how.state in ("agreed", "unverified") else logging.WARNING,
                "replicated task %s %s%s", group.task_id, how.state,
                f"; {len(how.rejected)} adapter(s) rejected" if how.rejected else "",
                extra=fields("replica.agreed" if how.state == "agreed" else "replica.settled", task=group.task_id,
                             job=group.job or None, state=how.state, adapter=how.fold or None,
                             runs=len(runs), rejected=[a for a, _ in how.rejected]))
        return True

    def _agrees(self, runs: list[Run], records: dict[str, AdapterRecord | None]) -> Callable[[int, int], bool]:
        cache: dict[str, Adapter] = {}

        def load(run: Run) -> Adapter:
            if run.adapter_id not in cache:
                cache[run.adapter_id] = adapter_format.from_bytes(self.store.get(records[run.run].sha256))
            return cache[run.adapter_id]

        def agrees(i: int, j: int) -> bool:
            a, b = runs[i], runs[j]
            pair = tuple(sorted((a.adapter_id, b.adapter_id)))
            if pair not in self._agree:
                self._agree[pair] = agree(load(a), load(b), records[a.run].train_loss, records[b.run].train_loss,
                                          self.policy)
            return self._agree[pair]

        return agrees
