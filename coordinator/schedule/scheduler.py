"""Schedule: pending tasks are sized into runs for the cards that are free, leased and dispatched;
expired or failed ones go back in the queue; stragglers near a job's end are run twice.

The ledger is the source of truth; the dispatcher (Ray here) is how a leased task reaches a card.
One round (:meth:`Scheduler.tick`):

1. expire leases whose deadline passed: the dispatcher cancels their runs as a whole, and the
   other units those runs still held go back in the queue (without spending an attempt); an
   expired lease spends no attempt either: its holder's volunteer pays in trust (abandoned);
2. collect finished units: failures are released (while attempts are left) and a failure for want
   of memory raises the task's VRAM floor on the card it failed on (only there, and never past
   that card); successes add to the worker's tokens per second as the coordinator's own clock
   measures it (lease granted to upload seen accepted, the shard's tokens; never the worker's
   report), and cancel the speculative partner run if there is one;
3. give every free card a run: the oldest pending task that fits it (its plan in 16 bits, or on
   a card whose worker loads a 4-bit base, in 4 bits where 16 do not fit: :class:`Need`), plus
   following units of the same job (each at the batch and lr the fold policy sizes it for: the job's batch divided by
   the adapters the next fold will average, ``coordinator.fold.policy``), as many as the card gets through in about ``target_task_seconds`` at its measured
   speed as the ledger holds it (one unit while its speed is unknown). Fast cards take big runs, slow cards small ones,
   and every unit keeps its own lease, fence and adapter, so idempotency is unchanged;
4. near a job's end (cards idle, nothing pending that fits them) issue the outstanding tasks
   expected to finish last to idle cards that would finish them sooner (``Leases.speculate``);
5. warn on a job whose pending tasks fit no card in the cluster;
6. update job states: a job ends once none of its tasks is pending or leased, no twin of one
   still runs (its result would complete the task), and its last adapters are folded.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from coordinator.ledger import (
    JobConfig,
    JobRecord,
    JobState,
    Ledger,
    TaskRecord,
    TaskState,
    is_twin,
    new_secret,
)
from coordinator.ledger.leaders import Fence, NotLeader, Term
from coordinator.schedule import standing
from coordinator.schedule.figures import (
    SpeedClock,
    card_key,
    charge_abandoned,
    memory_floor,
    units_for,
    waiting_for_a_card,
)
from coordinator.schedule.holder import hand_back
from coordinator.schedule.inbox_dispatch import is_outbound
from coordinator.fold.policy import FoldPolicy, TaskTraining
from coordinator.settings import Settings
from coordinator.schedule.transport import Dispatcher, Finished, Need, Node, roomiest, run_resources, submit_all
from nomoat import card as cards
from nomoat.logs import fields
from nomoat.spec import LoraConfig, TaskSpec, TrainConfig
from nomoat.v1 import nomoat_pb2 as pb

log = logging.getLogger("nomoat.scheduler")


@dataclass
class Scheduler:
    settings: Settings
    ledger: Ledger
    dispatcher: Dispatcher
    worker_token: str
    task_need: Any  # callable(JobConfig) -> Need (coordinator.schedule.ray_dispatch.task_need)
    _configs: dict[str, JobConfig] = field(default_factory=dict)
    _needs: dict[str, Need] = field(default_factory=dict)
    _total_tasks: dict[str, int] = field(default_factory=dict)
    # The runs dispatched lately, (node id, units, tokens): what sizing did, for logs and tests.
    runs: deque = field(default_factory=lambda: deque(maxlen=1000))
    # The cards the latest round saw: how many of them fit a job sizes its tasks (training()).
    _nodes: list[Node] = field(default_factory=list)
    # Settles replicated tasks each round (coordinator.schedule.replication.Replication); None: none are.
    replication: Any = None
    # Cards' speeds by this scheduler's clock (coordinator.schedule.figures; made in __post_init__).
    _clock: SpeedClock = field(init=False)
    # The fence this round's writes carry (shared with the outbound dispatcher, which places runs).
    term: Term = field(default_factory=Term)
    # Finished units whose handling failed (Redis away): handled again next round, not dropped.
    _unhandled: list[Finished] = field(default_factory=list)
    # The oldest pending tasks as this round read them (None: not read yet this round).
    _window: list[TaskRecord] | None = None

    def __post_init__(self) -> None:
        self._clock = SpeedClock(self.ledger)

    def config(self, job_id: str) -> JobConfig:
        if job_id not in self._configs:
            job = self.ledger.jobs.get(job_id)
            self._configs[job_id], self._total_tasks[job_id] = job.config, job.total_tasks
        return self._configs[job_id]

    def total_tasks(self, job_id: str) -> int:
        self.config(job_id)
        return self._total_tasks[job_id]

    def need(self, job_id: str) -> Need:
        """What a card needs for a task of the job (computed once per job, as its config is read)."""
        if job_id not in self._needs:
            self._needs[job_id] = self.task_need(self.config(job_id))
        return self._needs[job_id]

    def need_gb(self, task: TaskRecord, node: Node | None = None) -> float:
        """The VRAM a card needs to be given ``task``: its job's plan for ``node`` (Need.on; without
        a node, in 16 bits), or, on a card the task ran out of memory on, more than that card."""
        need = self.need(task.job)
        if node is None:
            return need.vram_gb
        return max(need.on(node.vram_gb, node.loads_4bit), task.vram_floors.get(card_key(node), 0.0))

    def fits(self, task: TaskRecord, node: Node) -> bool:
        return self.need_gb(task, node) <= node.vram_gb

    def fits_some(self, task: TaskRecord, room: tuple[float, float]) -> bool:
        """Whether ``task`` fits one of the cards whose :func:`roomiest` is ``room``."""
        largest, largest_4bit = room
        return self.need_gb(task) <= largest or self.smallest_gb(task) <= largest_4bit

    def smallest_gb(self, task: TaskRecord) -> float:
        """The least VRAM a card may have and be given ``task``: one that loads a 4-bit base."""
        return self.need(task.job).smallest

    def speeds(self, nodes: list[Node]) -> dict[str, float]:
        """Node id -> the measured tokens/s of its worker, as the ledger holds it (the one source:
        a restarted coordinator sizes runs as its predecessor did). A node that names its worker
        takes that worker's speed, so a card whose Ray node was replaced keeps it."""
        return self.ledger.workers.speeds_by_node({n.node_id: n.worker_id for n in nodes})

    def tick(self, now: float | None = None, leader: Fence | None = None) -> set[str]:
        """One round; returns the running jobs with nothing left to train (ready for a last fold).

        ``leader``: the scheduler's fence, which every lease granted and run placed this round
        carries; a round whose fence stopped leading stops at its first write (NotLeader)."""
        now = now or time.time()
        self.term.fence = leader
        self._window = None
        expired = self.ledger.leases.expire(now)
        for task_id in expired:
            log.warning("the lease of task %s expired; it goes back in the queue", task_id,
                        extra=fields("lease.expired", task=task_id))
            if is_twin(task_id):
                self.ledger.leases.retire_twin(task_id)
            self._cancel(task_id, f"its run was stopped when the lease of {task_id} expired")
        charge_abandoned(self.ledger, expired)
        self._handle([*self._unhandled, *self.dispatcher.poll()], now)
        if self.replication is not None:
            self.replication.sweep(now)
        nodes = self.dispatcher.nodes()
        speeds = self.speeds(nodes)
        idle = self._dispatch(now, nodes, speeds)
        if self.settings.speculate and idle:
            self._speculate(now, idle, speeds)
        return self._review_jobs(nodes)

    def _handle(self, finished: list[Finished], now: float | None = None) -> None:
        """Each finished unit on its own: one that cannot be handled now (Redis went away) is
        kept for the next round, and the rest of this round goes on. Handling is safe to redo:
        every step names the unit's fence, and a fence no longer current changes nothing."""
        self._unhandled = []
        for done in finished:
            try:
                self._finished(done, now)
            except NotLeader:
                raise
            except Exception as exc:  # noqa: BLE001  (one unit must not cost the round)
                log.warning("the result of task %s could not be handled (%s); trying again next round",
                            done.task_id, exc)
                self._unhandled.append(done)

    def _finished(self, done: Finished, now: float | None = None) -> None:
        if done.handed_back:  # the volunteer paused before it started: queued again, no attempt spent
            hand_back(self.ledger, done.task_id, done.fence, done.worker_id, done.error)
            return
        if done.error:
            state = self.ledger.leases.release(done.task_id, done.fence, done.error, self.settings.max_attempts)
            if state:
                log.warning("task %s failed on worker %s: %s; %s", done.task_id, done.worker_id or "?", done.error,
                            "it goes back in the queue" if state is TaskState.PENDING else "no attempts are left",
                            extra=fields("task.failed", task=done.task_id, worker=done.worker_id or None,
                                         fence=done.fence, reason=done.error, now=state.value))
            if state is TaskState.PENDING and done.needs_vram_gb > 0:
                self._floor(done)
            return
        task = self.ledger.tasks.get(done.task_id)
        self._clock.measure(done, task, now or time.time())
        partner = task.partner if task else ""
        if partner:  # the first result won; stop the other run (it would also stop by itself)
            self._cancel(partner, f"{done.task_id} finished first", only_alone=True)

    def _floor(self, done: Finished) -> None:
        """The memory need a unit reported, as a floor on its own card (figures.memory_floor)."""
        node = next((n for n in self._nodes if n.node_id == done.node_id), None)
        card = self.card_of(done.worker_id)
        memory_floor(self.ledger, done, node.vram_gb if node is not None else card.vram_gb if card else 0.0)

    def _cancel(self, task_id: str, why: str, only_alone: bool = False) -> None:
        """Stop the run holding ``task_id``. A run stops as a whole (Ray kills its process), so
        every unit of it still leased, one not yet trained or one mid-way, goes back in the queue
        now rather than when its own lease runs out; units already uploaded are done and stay so."""
        for unit, fence in self.dispatcher.cancel(task_id, only_alone=only_alone):
            if unit != task_id and self.ledger.leases.requeue(unit, fence, why):
                log.warning("task %s goes back in the queue: %s", unit, why,
                            extra=fields("task.requeued", task=unit, fence=fence, reason=why))

    def training(self, config: JobConfig, noise_scale: float | None = None, tasks: int | None = None) -> TaskTraining:
        """The batch and lr a task of a job with ``config`` trains at: with keep_global_batch,
        the job's batch divided by K = min(fold_every, the cards seen that fit the job), at
        ``lr_scale(K)`` times its lr (coordinator.fold.policy), so what one fold averages adds up
        to the job's batch; the same tokens per task, K times the steps. ``noise_scale``: the
        job's gradient noise scale, which sizes the global batch with --size-from-noise."""
        need = self.task_need(config)
        cards = sum(1 for n in self._nodes if n.vram_gb >= need.on(n.vram_gb, n.loads_4bit))
        return FoldPolicy.of(self.settings).task_training(config.batch_size, config.learning_rate, cards,
                                                          noise_scale, tasks)

    def job_training(self, job_id: str) -> TaskTraining:
        """What the job's next task trains at (its noise scale read only when it sizes tasks)."""
        noise = self.ledger.jobs.noise(job_id).b_simple() if self.settings.size_from_noise else None
        return self.training(self.config(job_id), noise, self.total_tasks(job_id))

    def spec(self, task: TaskRecord, fence: int, base_version: int, node: Node,
             training: TaskTraining | None = None, secret: str = "",
             card: cards.Card | None | str = "read") -> TaskSpec:
        """What the worker on ``node`` needs to train ``task`` under ``fence`` (at ``training``,
        by default the job's :meth:`job_training`; for ``card``, by default the one its worker
        registered, read now), holding its lease with ``secret``."""
        config = self.config(task.job)
        training = training or self.job_training(task.job)
        # The seed is the task's index: the folder replays the block order it seeds (the shard proof).
        return TaskSpec(
            task_id=task.task_id, job_id=task.job, fence=fence, base_version=base_version,
            tokens=task.tokens, coordinator=self.settings.join_address, token=self.worker_token,
            lora=LoraConfig(config.lora_rank, config.lora_alpha, tuple(config.target_modules)),
            train=TrainConfig(seq_len=config.seq_len, batch_size=training.batch_size,
                              learning_rate=training.learning_rate, epochs=config.epochs,
                              seed=task.index, plan_model=config.plan_model, warm_start=config.warm_start),
            lease_ttl_s=self.settings.lease_ttl_s, worker_id=node.worker_id,
            card=self.card_of(node.worker_id) if card == "read" else card, lease_secret=secret,
        )

    def cards_of(self, worker_ids: list[str]) -> dict[str, cards.Card | None]:
        """:meth:`card_of` for each worker, in one round trip."""
        ids = [w for w in dict.fromkeys(worker_ids) if w]
        return {w: cards.from_message(pb.Card.FromString(raw)) if raw else None
                for w, raw in zip(ids, self.ledger.workers.cards(ids))}

    def card_of(self, worker_id: str) -> cards.Card | None:
        """The card ``worker_id`` registered (the run plans for it); None if the ledger has none."""
        record = self.ledger.workers.get(worker_id) if worker_id else None
        if record is None or not record.card:
            return None
        return cards.from_message(pb.Card.FromString(record.card))

    def standings(self, nodes: list[Node]) -> dict[str, tuple[str, standing.Standing]]:
        """Node id -> (its volunteer, where that volunteer's trust stands: coordinator.schedule.standing)."""
        volunteers = self.ledger.trust.of_workers(n.worker_id for n in nodes)
        records = self.ledger.trust.many(volunteers.values())
        return {n.node_id: (volunteers.get(n.worker_id, ""), standing.standing(records.get(volunteers.get(n.worker_id, ""))))
                for n in nodes}

    def _dispatch(self, now: float, nodes: list[Node], speeds: dict[str, float]) -> list[Node]:
        """Give each free card a run sized for it, trusted and fastest cards first (a volunteer
        whose work keeps failing the checks gets smaller runs, then none); returns the cards left idle."""
        self._nodes = list(nodes)
        standing = self.standings([n for n in nodes if not n.busy])
        free = sorted((n for n in nodes if not n.busy),
                      key=lambda n: (-standing[n.node_id][1].share, -speeds.get(n.node_id, 0.0)))
        slots = self.settings.max_in_flight - self.dispatcher.in_flight()
        if not free or slots <= 0:
            return free
        # Pending tasks no free card can hold (their job fits nowhere now) must not crowd out the rest.
        room = roomiest(free)
        queue = [t for t in self._pending_window() if self.fits_some(t, room)]
        queue = queue[: len(free) * self.settings.max_units_per_run * 2]
        base_version = self.ledger.versions.latest() or 0
        idle: list[Node] = []
        planned: list[tuple[Node, list[TaskRecord], TaskTraining]] = []
        trainings: dict[str, TaskTraining] = {}
        for node in free:
            volunteer, stands = standing[node.node_id]
            if slots <= 0 or not stands.eligible:
                idle.append(node)
                continue
            run = self._take_run(queue, node, speeds.get(node.node_id, 0.0), volunteer, stands.share)
            if not run:
                idle.append(node)
                continue
            job = run[0].job
            if job not in trainings:
                trainings[job] = self.job_training(job)
            planned.append((node, run, trainings[job]))
            slots -= 1
        if planned:
            idle += self._place(now, base_version, planned)
        return idle

    def _place(self, now: float, base_version: int, planned: list[tuple[Node, list[TaskRecord], TaskTraining]]) -> list[Node]:
        """Lease the round's planned runs and hand them to the dispatcher, in a few round trips
        whatever their number: every lease in one pipeline (each still its own atomic script),
        the cards in one read, what each unit trains at in one write, the runs in one hand-off.
        Returns the cards whose run got no lease."""
        # Each lease is its run's on that card from now on: its worker and a secret only its spec carries.
        grants = [(t.task_id, node.worker_id, new_secret()) for node, run, _ in planned for t in run]
        secrets_of = {task_id: secret for task_id, _, secret in grants}
        # Until its first heartbeat: a Ray task may wait in Ray's queue for a card; a run in an
        # outbound volunteer's inbox is taken within a poll and its first unit heartbeats before
        # any work, or its volunteer is gone (and that unit's expiry cancels the whole run). Later
        # units wait for the earlier ones to train: the queue's timeout.
        deadlines = [now + (self.settings.claim_timeout_s if is_outbound(node.node_id) and k == 0
                            else self.settings.queue_timeout_s)
                     for node, run, _ in planned for k in range(len(run))]
        fences = iter(self.ledger.leases.lease_many(grants, deadlines, base_version, self.settings.max_attempts,
                                                    now=now, leader=self.term.fence))
        registered = self.cards_of([node.worker_id for node, _, _ in planned])
        runs: list[tuple[list[TaskSpec], dict[str, float], Node]] = []
        idle, trained = [], []
        for node, run, training in planned:
            specs = []
            for task in run:
                fence = next(fences)
                if fence > 0:
                    # a replica run trains on the version its task was given (pinned)
                    version = task.base_version if task.pinned else base_version
                    specs.append(self.spec(task, fence, version, node, training, secrets_of[task.task_id],
                                           registered.get(node.worker_id)))
                    again = f" again (attempt {task.attempts + 1})" if task.attempts else ""
                    log.info("task %s of job %s leased%s to worker %s (fence %d)", task.task_id, task.job, again,
                             node.worker_id or node.node_id[:12], fence,
                             extra=fields("task.reissued" if task.attempts else "task.leased", task=task.task_id,
                                          job=task.job, worker=node.worker_id or None, fence=fence,
                                          attempt=task.attempts + 1, base_version=version))
                elif fence < 0:
                    log.warning("task %s failed: no attempts left", task.task_id,
                                extra=fields("task.failed", task=task.task_id, job=task.job,
                                             reason="no attempts left"))
            if not specs:
                idle.append(node)
                continue
            trained += [(s.task_id, s.train.batch_size, s.train.learning_rate, training.fold_width) for s in specs]
            runs.append((specs, run_resources(max(self.need_gb(t, node) for t in run)), node))
        if trained:
            self.ledger.tasks.set_training(trained)
        failed = self._submit(runs)
        for specs, _, node in runs:
            if node in failed:
                idle.append(node)
            else:
                self.runs.append((node.node_id, len(specs), sum(s.tokens for s in specs)))
        return idle

    def _submit(self, runs: list[tuple[list[TaskSpec], dict[str, float], Node]]) -> list[Node]:
        """Dispatch the round's leased runs, all at once where the transport can. A lease and its
        dispatch are two steps, so a run whose dispatch failed gives its units back to the queue at
        once (without spending their attempts) instead of stranding them until the queue timeout;
        returns those runs' cards, and the round goes on with the rest."""
        if not runs:
            return []
        failures = submit_all(self.dispatcher, [(specs, resources, node.node_id) for specs, resources, node in runs])
        failed = []
        for (specs, _, node), failure in zip(runs, failures):
            if failure is not None:
                self._undispatched(specs, node, failure)
                failed.append(node)
        return failed

    def _undispatched(self, specs: list[TaskSpec], node: Node, exc: Exception) -> None:
        where = node.worker_id or node.node_id[:12]
        why = f"its run could not be dispatched to worker {where}: {exc}"
        log.warning("the run of task(s) %s could not be dispatched to worker %s (%s); its units go back in "
                    "the queue", ", ".join(s.task_id for s in specs), where, exc,
                    extra=fields("run.undispatched", worker=node.worker_id or None, reason=str(exc)))
        for spec in specs:
            try:
                self.ledger.leases.requeue(spec.task_id, spec.fence, why)
            except Exception:  # noqa: BLE001  (then its lease runs out, as before)
                log.warning("task %s stays leased until its lease runs out", spec.task_id)

    def _take_run(self, queue: list[TaskRecord], node: Node, speed: float, volunteer: str = "",
                  share: float = 1.0) -> list[TaskRecord]:
        """Take from ``queue`` the oldest task that fits ``node`` and the following units of its
        job that fit, as many as the card's ``speed`` warrants, cut to the volunteer's ``share``
        (coordinator.schedule.standing); a replica run never goes to a volunteer whose run it checks."""
        def fits(t: TaskRecord) -> bool:
            return not is_twin(t.task_id) and self.fits(t, node) and volunteer not in t.avoid

        first = next((t for t in queue if fits(t)), None)
        if first is None:
            return []
        n = units_for(speed, first.tokens, self.settings.target_task_seconds, self.settings.max_units_per_run)
        # Lazily, stopping at n: scanning the whole queue for every free card made a round with a
        # thousand cards (outbound volunteers) quadratic.
        fitting = (t for t in queue if t.job == first.job and fits(t))
        run = list(itertools.islice(fitting, standing.units(n, share)))
        for task in run:
            queue.remove(task)
        return run

    def _speculate(self, now: float, idle: list[Node], speeds: dict[str, float]) -> None:
        """Issue the outstanding tasks expected to finish last to idle cards that would beat them."""
        where = self.dispatcher.placement()
        ids = [lease.task_id for lease in self.ledger.leases.leased()
               if not is_twin(lease.task_id) and lease.task_id in where]
        outstanding = []
        for task in self.ledger.tasks.many(ids):
            if task.state is not TaskState.LEASED or task.twin or task.replica_of:
                continue  # a replica run is not raced: its twin could land on a volunteer it checks
            node_id, ahead = where[task.task_id]
            speed = speeds.get(node_id, 0.0)
            eta = (task.leased_at or now) + ahead / speed if speed > 0 else math.inf
            outstanding.append((eta, task))
        outstanding.sort(key=lambda e: -e[0])  # expected last first
        # Only a trusted volunteer races another's task: a twin is a unit beyond one at a time, and
        # the first accepted result wins, so a newcomer on probation (or a throttled one) answering
        # at once with anything would take the honest run's place (bench/adversary.py, other-data).
        stands = self.standings(idle)
        cards = sorted((n for n in idle if stands[n.node_id][1].level is standing.Level.TRUSTED),
                       key=lambda n: -speeds.get(n.node_id, 0.0))
        for eta, task in outstanding:
            card = next((c for c in cards if self.fits(task, c) and speeds.get(c.node_id, 0.0) > 0), None)
            if card is None:
                continue
            own_eta = now + task.tokens / speeds[card.node_id]
            if own_eta >= eta:
                continue  # the run it would race is expected to finish first
            secret = new_secret()
            claim_s = self.settings.claim_timeout_s if is_outbound(card.node_id) else self.settings.queue_timeout_s
            twin, fence = self.ledger.leases.speculate(task.task_id, now + claim_s,
                                                       card.worker_id, secret, now=now, leader=self.term.fence)
            if fence <= 0:
                continue
            log.info("task %s runs long; also issued as %s to worker %s", task.task_id, twin, card.worker_id or "?",
                     extra=fields("task.speculated", task=task.task_id, job=task.job, twin=twin,
                                  worker=card.worker_id or None, fence=fence))
            twin_task = replace(task, task_id=twin)
            if self._submit([([self.spec(twin_task, fence, self.ledger.versions.latest() or 0, card, secret=secret)],
                               run_resources(self.need_gb(task, card)), card)]):
                continue
            cards.remove(card)
            if not cards:
                return

    def _review_jobs(self, nodes: list[Node]) -> set[str]:
        """One pass over the running jobs, from their task counters (one read per job, however
        many tasks it has): say when a job's pending tasks fit no card, and end the jobs with
        nothing left to train. Returns the jobs whose last adapters still wait in the fold buffer
        (ready for a last fold)."""
        room = roomiest(nodes)
        idle: set[str] = set()
        job_ids = self.ledger.jobs.running_ids()
        buffered: set[str] | None = None
        unsettled: set[str] | None = None
        for job_id, counts in zip(job_ids, self.ledger.tasks.counts_of(job_ids)):
            job = self.ledger.jobs.get(job_id)
            if not job or job.state is not JobState.RUNNING:
                continue
            self._warn(job_id, job, counts, nodes, room)
            if counts["pending"] or counts["leased"] or self.ledger.tasks.twins_running(job_id):
                continue
            if unsettled is None:  # the open replica groups, read once a round
                unsettled = {g.job for g in self.ledger.replicas.open_groups()}
            if job_id in unsettled:
                continue  # a replicated task's adapters are held until its replicas settle
            # Read after the counts: every adapter of the job is then either in the buffer or
            # already counted by the job record read next.
            if buffered is None:
                buffered = {a.job for a in self.ledger.adapters.buffered()}
            if job_id in buffered:
                idle.add(job_id)
            else:
                self._end(job_id, self.ledger.jobs.get(job_id) or job, counts)
        return idle

    def _pending_window(self) -> list[TaskRecord]:
        """The oldest pending tasks (``pending_window`` of them), read at most once a round."""
        if self._window is None:
            ids = [i for i in self.ledger.leases.pending(self.settings.pending_window) if not is_twin(i)]
            self._window = self.ledger.tasks.many(ids)
        return self._window

    def _warn(self, job_id: str, job: JobRecord, counts: dict[str, int], nodes: list[Node],
              room: tuple[float, float]) -> None:
        """A job whose pending tasks fit no card in the cluster says so (JobInfo.warning). Its
        pending tasks are judged by those among the oldest pending (the queue's window), so the
        check costs the same however long the queue is."""
        warning = ""
        if nodes and counts["pending"]:
            pending = [t for t in self._pending_window() if t.job == job_id and t.state is TaskState.PENDING]
            if pending and not any(self.fits_some(t, room) for t in pending):
                warning = waiting_for_a_card(min(self.need_gb(t) for t in pending),
                                             min(self.smallest_gb(t) for t in pending), len(nodes), *room)
            elif not pending:
                warning = job.warning  # none in the window: as it was
        if warning != job.warning:
            self.ledger.jobs.set_warning(job_id, warning)
            if warning:
                log.warning("job %s: %s", job_id, warning, extra=fields("job.waiting", job=job_id, reason=warning))

    def _end(self, job_id: str, job: JobRecord, counts: dict[str, int]) -> None:
        """A job with nothing pending, leased or buffered is done, or failed if nothing of it folded."""
        if counts["done"] == 0:
            state, error = JobState.FAILED, "every task failed; see `nomoat status`"
        elif job.adapters_folded == 0:
            state, error = JobState.FAILED, "no adapter of this job passed the checks to be folded"
        else:
            state, error = JobState.DONE, ""
        self.ledger.jobs.finish(job_id, state, error)
        extra = fields(f"job.{state.value}", job=job_id, tasks_done=counts["done"], tasks_failed=counts["failed"],
                       adapters_folded=job.adapters_folded, adapters_rejected=job.adapters_rejected, reason=error or None)
        if error:
            log.warning("job %s failed: %s", job_id, error, extra=extra)
        else:
            log.info("job %s done: %d tasks trained, %d adapters folded, %d refused", job_id, counts["done"],
                     job.adapters_folded, job.adapters_rejected, extra=extra)

