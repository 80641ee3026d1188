"""Replicated tasks and trust through the real collect and fold flow (no processes).

The upload workflow (``accept.upload``), the replica groups it holds adapters in, the sweep that
settles them, the real Folder folding into a real tiny model, and the real Scheduler placing runs
on tests/fakes.py's FakeDispatcher (Ray's stand-in). Volunteers are real worker tokens; honest
ones hand in the adapter their task's seed makes (two honest runs of one seed are the same, as
bench/replication.py measures the trainer's are), a malicious one the same scaled x50.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import pytest
import torch

from coordinator.collect import accept

from coordinator.observe import status

from coordinator.schedule import standing
from coordinator.gateway.auth import Identity
from coordinator.fold.folder import Folder
from coordinator.model.history import History
from coordinator.ledger import AdapterState, Check, Claim, TaskState
from coordinator.model.running import RunningModel
from coordinator.schedule.replication import Replication
from coordinator.schedule.scheduler import Scheduler
from coordinator.schedule.transport import Need
from coordinator.collect.partial_uploads import PartialUploads
from nomoat import adapter as adapter_format
from nomoat.tiny import read_fortunes, tiny_model_path
from tests import consistency
from tests.fakes import FakeCard, FakeDispatcher, node_of
from tests.rig import ALPHA, RANK, SECRET, TARGETS, Rig, published, rig, submit_job  # noqa: F401  (fixtures)

LIMIT = 1 << 24
TEXTS = [f"record {i}: {t}" for i, t in enumerate(read_fortunes()[1000:1200])]


@dataclass
class Volunteer:
    name: str
    worker_id: str
    identity: Identity
    scale: float = 1.0  # x50: malicious

    @property
    def id(self) -> str:
        return self.identity.token_hash


def volunteer(rig: Rig, name: str, scale: float = 1.0) -> Volunteer:
    token = rig.registry.create("worker", name=name)
    identity = rig.registry.lookup(token)
    _TOKENS[identity.token_hash] = token
    worker_id = f"w-{name}"
    rig.ledger.workers.register(worker_id, name=name, card=b"", token=identity.token_hash)
    return Volunteer(name, worker_id, identity, scale)


def result(rig: Rig, seed: int, scale: float = 1.0) -> bytes:
    """The adapter a run of the task with ``seed`` hands in: the same seed, the same adapter."""
    gen = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(RANK, d_in, generator=gen) * 0.01, torch.randn(d_out, RANK, generator=gen) * 0.01 * scale)
               for m, (d_out, d_in) in sorted(rig.deps.shapes.items()) if m.rsplit(".", 1)[-1] in TARGETS}
    return adapter_format.to_bytes(adapter_format.Adapter(factors, rank=RANK, alpha=ALPHA))


@pytest.fixture
def replicating(rig: Rig) -> Replication:
    """Every task replicated, so that each test meets a replica without hunting for a sampled id."""
    return Replication(replace(rig.deps.settings, replicate_fraction=1.0), rig.ledger, rig.store)


def run_of(rig: Rig, task_id: str, n: int) -> str:
    """The id of the n-th replica run of ``task_id`` (ids say nothing of what a run is: read the group)."""
    return rig.ledger.replicas.get(task_id).runs[n - 1]


def hand_in(rig: Rig, repl: Replication, who: Volunteer, task_id: str, seed: int,
            scale: float | None = None) -> accept.Accepted:
    """Lease ``task_id`` and upload the run's adapter as ``who``, through the Upload workflow."""
    task = rig.ledger.tasks.get(task_id)
    fence = rig.ledger.leases.lease(task_id, 1e12, task.base_version if task.pinned else 0, 5, who.worker_id, SECRET)
    assert fence > 0, f"{task_id} could not be leased"
    base = rig.ledger.tasks.get(task_id).base_version
    data = result(rig, seed, who.scale if scale is None else scale)
    m = accept.Manifest(task_id=task_id, fence=fence, base_version=base, rank=RANK, alpha=ALPHA, tokens=300,
                         train_loss=2.5, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                         worker_id=who.worker_id, lease_secret=SECRET)
    return accept.upload(rig.ledger, rig.store, rig.deps.shapes, PartialUploads(rig.tmp / "uploads"), who.identity,
                          m, 0, [data], max_bytes=LIMIT, replication=repl)


def folder(rig: Rig, **settings) -> Folder:
    s = replace(rig.deps.settings, **settings)
    return Folder(s, rig.ledger, rig.store, RunningModel(tiny_model_path()), History(rig.ledger, rig.store, rig.tmp))


def test_a_replicated_pair_that_agrees_is_folded_once(rig: Rig, replicating: Replication) -> None:
    alice, bob = volunteer(rig, "alice"), volunteer(rig, "bob")
    task = rig.ledger.tasks.ids(submit_job(rig).job_id)[0]
    first = hand_in(rig, replicating, alice, task, seed=0)
    assert first.status == "accepted"
    assert rig.ledger.adapters.get(first.detail).state is AdapterState.HELD
    assert rig.ledger.adapters.buffer_ids() == []  # held, not buffered
    replica = rig.ledger.tasks.get(run_of(rig, task, 1))
    assert (replica.state, replica.replica_of, replica.avoid, replica.pinned) == (
        TaskState.PENDING, task, (alice.id,), True)
    assert replicating.sweep() == []  # its replica has not run yet
    second = hand_in(rig, replicating, bob, run_of(rig, task, 1), seed=0)
    assert second.status == "accepted"
    assert replicating.sweep() == [task]
    assert rig.ledger.adapters.buffer_ids() == [first.detail]
    assert rig.ledger.adapters.get(second.detail).state is AdapterState.REPLICA
    assert replicating.sweep() == []  # settled once
    version = folder(rig).fold(rig.ledger.adapters.buffered())
    assert [a.id for a in rig.ledger.versions.get(version).adapters] == [first.detail]
    assert rig.ledger.trust.get(alice.id).counts == {"agreed": 1, "accepted": 1}
    assert rig.ledger.trust.get(alice.id).versions == {version: 1}
    assert rig.ledger.trust.get(bob.id).counts == {"agreed": 1}
    consistency.check(rig.ledger)


def test_a_pair_that_disagrees_is_held_until_a_third_settles_it(rig: Rig, replicating: Replication) -> None:
    alice, bob, carol = volunteer(rig, "alice"), volunteer(rig, "bob", scale=50.0), volunteer(rig, "carol")
    task = rig.ledger.tasks.ids(submit_job(rig).job_id)[0]
    first = hand_in(rig, replicating, alice, task, seed=0)
    second = hand_in(rig, replicating, bob, run_of(rig, task, 1), seed=0)
    assert replicating.sweep() == []
    third = rig.ledger.tasks.get(run_of(rig, task, 2))
    assert third.state is TaskState.PENDING and set(third.avoid) == {alice.id, bob.id}
    assert rig.ledger.adapters.buffer_ids() == []  # neither is folded meanwhile
    assert {rig.ledger.adapters.get(a).state for a in (first.detail, second.detail)} == {AdapterState.HELD}
    assert rig.ledger.replicas.unsettled(rig.ledger.tasks.get(task).job)
    consistency.check(rig.ledger)
    last = hand_in(rig, replicating, carol, run_of(rig, task, 2), seed=0)
    assert replicating.sweep() == [task]
    assert rig.ledger.adapters.buffer_ids() == [first.detail]
    outlier = rig.ledger.adapters.get(second.detail)
    assert outlier.state is AdapterState.REJECTED and "disagreed with 2 other runs" in outlier.reason
    assert rig.ledger.adapters.get(last.detail).state is AdapterState.REPLICA
    assert rig.ledger.trust.get(bob.id).counts == {Check.DISAGREED.value: 1}
    assert rig.ledger.trust.get(alice.id).counts == {"agreed": 1}
    assert rig.ledger.trust.get(carol.id).counts == {"agreed": 1}
    assert rig.ledger.jobs.get(rig.ledger.tasks.get(task).job).adapters_rejected == 1
    consistency.check(rig.ledger)


def test_a_task_is_replicated_only_when_another_volunteer_can_take_it(rig: Rig, replicating: Replication) -> None:
    alice = volunteer(rig, "alice")
    task = rig.ledger.tasks.ids(submit_job(rig).job_id)[0]
    alone = hand_in(rig, replicating, alice, task, seed=0)
    assert rig.ledger.adapters.get(alone.detail).state is AdapterState.BUFFERED
    assert rig.ledger.replicas.get(task) is None


def test_a_replica_no_one_runs_leaves_its_task_folded_unverified(rig: Rig) -> None:
    alice, _ = volunteer(rig, "alice"), volunteer(rig, "bob")
    repl = Replication(replace(rig.deps.settings, replicate_fraction=1.0, replica_timeout_s=60), rig.ledger, rig.store)
    task = rig.ledger.tasks.ids(submit_job(rig).job_id)[0]
    first = hand_in(rig, repl, alice, task, seed=0)
    opened = rig.ledger.replicas.get(task).opened
    assert repl.sweep(now=opened + 30) == []
    assert repl.sweep(now=opened + 61) == [task]
    assert rig.ledger.adapters.buffer_ids() == [first.detail]
    gone = rig.ledger.tasks.get(run_of(rig, task, 1))
    assert gone.state is TaskState.FAILED and "settled without it" in gone.error
    run = gone.task_id
    assert run not in rig.ledger.leases.pending()
    consistency.check(rig.ledger)


def test_a_check_failed_at_upload_counts_against_the_token(rig: Rig, replicating: Replication) -> None:
    mallory = volunteer(rig, "mallory")
    task = rig.ledger.tasks.ids(submit_job(rig).job_id)[0]
    fence = rig.lease(task)
    data = result(rig, 0)
    m = accept.Manifest(task_id=task, fence=fence, base_version=0, rank=RANK, alpha=ALPHA, tokens=300,
                         train_loss=2.5, sha256="0" * 64, size=len(data), worker_id=mallory.worker_id,
                         lease_secret=SECRET)
    refused = accept.upload(rig.ledger, rig.store, rig.deps.shapes, PartialUploads(rig.tmp / "uploads"),
                             mallory.identity, m, 0, [data], max_bytes=LIMIT, replication=replicating)
    assert refused.status == "refused" and refused.check is Check.CORRUPT
    assert rig.ledger.trust.get(mallory.id).reasons() == {"corrupt": 1}


# -- a malicious volunteer, end to end through the scheduler --------------------------------------


def test_an_adapter_scaled_x50_is_refused_by_the_norm_gate_and_costs_its_volunteer(rig: Rig) -> None:
    """Once adapters have been folded (the norm gate's reference), an adapter trained honestly and
    then scaled x50 is refused for its norm, counted against its volunteer, and the honest adapter
    of the same fold is folded."""
    alice, mallory = volunteer(rig, "alice"), volunteer(rig, "mallory", scale=50.0)
    tasks = rig.ledger.tasks.ids(submit_job(rig, texts=TEXTS).job_id)
    fold = folder(rig, fold_every=2)
    for i in (0, 1):
        assert hand_in(rig, None, alice, tasks[i], seed=i).status == "accepted"
    assert fold.fold(rig.ledger.adapters.buffered()) == 1
    honest = hand_in(rig, None, alice, tasks[2], seed=2).detail
    scaled = hand_in(rig, None, mallory, tasks[3], seed=3).detail  # accepted at upload: the gates are the fold's
    assert fold.fold(rig.ledger.adapters.buffered()) == 2
    assert rig.ledger.adapters.get(honest).state is AdapterState.FOLDED
    refused = rig.ledger.adapters.get(scaled)
    assert refused.state is AdapterState.REJECTED and "update norm" in refused.reason, refused.reason
    assert rig.ledger.trust.get(mallory.id).reasons() == {"norm": 1}


def test_a_malicious_volunteer_ends_with_no_tasks(rig: Rig) -> None:
    """Two honest volunteers work a job on the scheduler; once the first version is out, mallory
    joins and hands in every adapter scaled x50. The fold's gates refuse its adapters, its trust
    drops, it is put on probation (one task at a time, each replicated and outvoted), and it is
    excluded: its card gets no more runs. The honest ones finish the job; nothing of mallory's is
    folded, and nothing twice.

    (Had mallory been there for the first fold, two of its adapters would have been folded: with
    no recent norms the norm gate has nothing to compare with, and x50 of a small update does
    not cost the tiny model the 0.1 nats the loss gate asks for. Noted in the report.)"""
    settings = replace(rig.deps.settings, fold_every=4, fold_timeout_s=1e9, speculate=False, replicate_fraction=0.05,
                       max_units_per_run=1)
    people = {v.worker_id: v for v in (volunteer(rig, "alice"), volunteer(rig, "bob"),
                                       volunteer(rig, "mallory", scale=50.0))}
    mallory = people["w-mallory"]
    repl = Replication(settings, rig.ledger, rig.store)
    fold = folder(rig, fold_every=4, fold_timeout_s=1e9)
    job = submit_job(rig, texts=TEXTS).job_id
    partials = PartialUploads(rig.tmp / "uploads")

    def upload(spec, worker_id: str) -> str:
        who = people[worker_id]
        data = result(rig, spec.train.seed, who.scale)
        m = accept.Manifest(task_id=spec.task_id, fence=spec.fence, base_version=spec.base_version, rank=RANK,
                             alpha=ALPHA, tokens=spec.tokens, train_loss=2.5, sha256=hashlib.sha256(data).hexdigest(),
                             size=len(data), worker_id=worker_id, lease_secret=spec.lease_secret)
        got = accept.upload(rig.ledger, rig.store, rig.deps.shapes, partials, who.identity, m, 0, [data],
                             max_bytes=LIMIT, replication=repl)
        return "" if got.ok else got.detail

    cards = {w: FakeCard(f"node-{w}", 8.0, 300.0, worker=w) for w in people}
    fake = FakeDispatcher([cards["w-alice"], cards["w-bob"]], upload=upload)
    scheduler = Scheduler(settings, rig.ledger, fake, "", lambda config: Need(1.0),
                          replication=repl)
    excluded_at = None
    for _ in range(400):
        idle = scheduler.tick(fake.now)
        fold.maybe_fold(idle, now=fake.now)
        if rig.ledger.versions.latest() == 1 and mallory.worker_id not in {c.worker_id for c in fake.cards.values()}:
            fake.add_card(cards[mallory.worker_id])  # it joins a running coordinator
        for worker in people.values():  # they are heard from (status' "active")
            rig.ledger.r.zadd("nomoat:workers", {worker.worker_id: fake.now})
        if excluded_at is None and standing.standing(rig.ledger.trust.get(mallory.id)).level is standing.Level.EXCLUDED:
            excluded_at = len([r for r in fake.submitted if r.card.worker_id == mallory.worker_id])
            left = rig.ledger.tasks.counts(job)["pending"]
        if rig.ledger.jobs.get(job).state.value != "running":
            break
        fake.advance(1.0)
    runs = [r for r in fake.submitted if r.card.worker_id == mallory.worker_id]
    assert excluded_at is not None, f"mallory was never excluded: {rig.ledger.trust.get(mallory.id)}"
    assert left > 0, "the job had nothing left to give mallory by the time it was excluded"
    assert len(runs) == excluded_at, "mallory's card got runs after it was excluded"
    assert rig.ledger.jobs.get(job).state.value == "done"
    record = rig.ledger.trust.get(mallory.id)
    assert record.refused >= 4 and set(record.reasons()) <= {"norm", "loss", "fold", "disagreed"}
    assert record.accepted == 0 and record.versions == {}
    folded = [a.id for v in rig.ledger.versions.all() for a in v.adapters]
    assert folded and not any(rig.ledger.adapters.get(a).volunteer == mallory.id for a in folded)
    shown = {w.worker_id: w for w in status.workers(rig.ledger, settings)}
    assert shown[mallory.worker_id].trust == "excluded" and "failed the checks" in shown[mallory.worker_id].trust_reason
    assert shown["w-alice"].trust == "trusted"
    counts = consistency.check(rig.ledger)
    assert counts["tasks"] == rig.ledger.jobs.get(job).total_tasks


# -- what a volunteer sees: `nomoat worker stats`, and `nomoat status` ------------------------------


def test_worker_stats_show_what_a_volunteer_gave(rig: Rig, replicating: Replication) -> None:
    from click.testing import CliRunner

    from nomoat.cli import main

    alice, bob = volunteer(rig, "alice"), volunteer(rig, "bob", scale=50.0)
    rig.ledger.r.hincrby("nomoat:worker:w-alice", "tokens_trained", 600)
    tasks = rig.ledger.tasks.ids(submit_job(rig).job_id)
    first = hand_in(rig, replicating, alice, tasks[0], seed=0)
    hand_in(rig, replicating, bob, run_of(rig, tasks[0], 1), seed=0)  # x50: it disagrees
    hand_in(rig, replicating, alice, tasks[1], seed=1)
    replicating.sweep()  # tasks[0] asks a third; tasks[1] waits for its replica
    carol = volunteer(rig, "carol")
    hand_in(rig, replicating, carol, run_of(rig, tasks[0], 2), seed=0)
    replicating.sweep()
    folder(rig).fold(rig.ledger.adapters.buffered())
    assert rig.ledger.adapters.get(first.detail).state is AdapterState.FOLDED

    reply = rig.client(token=rig.registry.create("reader")).status()  # any role sees trust in status
    by_id = {w.worker_id: w for w in reply.workers}
    assert by_id["w-alice"].trust == "trusted" and by_id["w-bob"].trust == "trusted"  # one disagreement
    stats = rig.client(token=_token_of(rig, alice)).worker_stats()
    assert stats.volunteer == "alice" and [w.worker_id for w in stats.workers] == ["w-alice"]
    assert (stats.tasks_done, stats.tokens_trained, stats.adapters_folded, stats.replicas_agreed) == (2, 600, 1, 1)
    assert [(v.version, v.adapters) for v in stats.versions] == [(1, 1)]
    mine = rig.client(token=_token_of(rig, bob)).worker_stats()
    assert (mine.adapters_refused, mine.replicas_disagreed) == (1, 1)
    assert [(r.check, r.count) for r in mine.reasons] == [("disagreed", 1)]
    # An admin may look at any worker's volunteer; a worker token sees only its own.
    assert rig.client("admin").worker_stats("w-bob").volunteer == "bob"
    assert rig.client(token=_token_of(rig, bob)).worker_stats("w-alice").volunteer == "bob"

    out = CliRunner().invoke(main, ["--coordinator", rig.address, "--token", _token_of(rig, bob), "worker", "stats"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0] == "volunteer bob: trusted (trust 0.50)"
    assert "adapters folded 0, refused 1 (disagreed 1)" in lines
    assert "replicas agreed 0, disagreed 1" in lines and "in versions: none yet" in lines
    assert any("disagreed with 2 other runs" in line for line in lines)
    assert max(len(line) for line in lines[:6]) <= 80
    out = CliRunner().invoke(main, ["--coordinator", rig.address, "--token", _token_of(rig, alice), "worker", "stats"])
    assert "in versions: 1" in out.output and "adapters folded 1, refused 0" in out.output
    refused = CliRunner().invoke(main, ["--coordinator", rig.address, "--token", rig.tokens["submitter"], "worker",
                                        "stats"])
    assert refused.exit_code == 1 and "a submitter token may not call Stats" in refused.output
    # A trusted (Ray-mode) volunteer's token may read its own record too.
    assert rig.client("trusted-worker").worker_stats().workers == []


def test_status_says_when_a_volunteer_is_throttled_or_excluded_and_why(rig: Rig) -> None:
    import io

    from rich.console import Console

    from nomoat import statusview

    mallory = volunteer(rig, "mallory")
    for _ in range(7):
        rig.ledger.trust.record(mallory.id, Check.NORM.value, "the adapter's update norm 5.1 exceeds 20 x ...")
    reply = rig.client("reader").status()
    (shown,) = [w for w in reply.workers if w.worker_id == "w-mallory"]
    assert shown.trust == "excluded" and shown.trust_score == pytest.approx(2 / 9)
    assert shown.trust_reason.startswith("excluded (trust 0.22): 7 of its last 7 contributions failed the checks (norm)")
    console = Console(file=io.StringIO(), width=80, highlight=False)
    statusview.print_status(reply, console)
    text = console.file.getvalue()
    block = text[text.index("w-mallory"):]
    assert "mallory" in block.splitlines()[0]
    words = " ".join(block.split())
    assert "trust excluded (trust 0.22): 7 of its last 7 contributions failed the checks (norm)" in words, text
    assert "1 excluded" in text


_TOKENS: dict[str, str] = {}


def _token_of(rig: Rig, who: Volunteer) -> str:
    return _TOKENS[who.id]


def test_a_replica_run_keeps_its_tasks_version_and_avoids_its_volunteer(rig: Rig, replicating: Replication) -> None:
    alice, bob = volunteer(rig, "alice"), volunteer(rig, "bob")
    task = rig.ledger.tasks.ids(submit_job(rig).job_id)[0]
    hand_in(rig, replicating, alice, task, seed=0)
    rig.ledger.r.set("nomoat:versions:latest", 3)  # the model moved on meanwhile
    run = run_of(rig, task, 1)
    assert rig.ledger.leases.pending()[0] == run  # first in the queue: a held adapter waits on it
    scheduler = Scheduler(rig.deps.settings, rig.ledger, FakeDispatcher([]), "",
                          lambda c: Need(1.0))
    queue = rig.ledger.tasks.many(rig.ledger.leases.pending())
    for who, expected in ((alice, False), (bob, True)):  # alice's own task's replica is not hers to run
        node = node_of(FakeCard(f"n-{who.name}", 8.0, 0.0, worker=who.worker_id), False)
        taken = [t.task_id for t in scheduler._take_run(list(queue), node, 0.0, who.id)]
        assert (run in taken) is expected, taken
    fence = rig.ledger.leases.lease(run, 1e12, 3, 5, bob.worker_id, SECRET)
    beat = rig.ledger.leases.heartbeat(run, fence, 1e12, bob.worker_id, Claim(bob.worker_id, SECRET))
    assert beat.ok and beat.base_version == 0  # pinned: trained on the version its task was
    assert rig.ledger.tasks.get(run).base_version == 0


def test_replica_events_are_counted_and_logged(rig: Rig, replicating: Replication, caplog) -> None:
    # A held upload is neither buffered nor refused (counted "held"); an outvoted adapter is a fold
    # refusal of its own kind; each step of the group is one structured log line.
    import logging

    from nomoat.logs import record_fields

    alice, bob, carol = volunteer(rig, "alice"), volunteer(rig, "bob", scale=50.0), volunteer(rig, "carol")
    task = rig.ledger.tasks.ids(submit_job(rig).job_id)[0]
    with caplog.at_level(logging.INFO):
        first = hand_in(rig, replicating, alice, task, seed=0)
        second = hand_in(rig, replicating, bob, run_of(rig, task, 1), seed=0)
        assert first.held and second.held
        tally = rig.ledger.counters.tally()
        assert tally.uploads["held"] == 2 and tally.uploads["accepted"] == 0 and tally.uploads["refused"] == 0
        assert tally.upload_bytes > 0
        replicating.sweep()
        hand_in(rig, replicating, carol, run_of(rig, task, 2), seed=0)
        replicating.sweep()
    events = [record_fields(r) for r in caplog.records if record_fields(r).get("event", "").startswith("replica.")]
    assert [e["event"] for e in events] == ["replica.held", "replica.held", "replica.disagreed", "replica.held",
                                            "replica.settled"]
    assert events[2]["run"] == run_of(rig, task, 2) and events[-1]["adapter"] == first.detail
    assert events[-1]["rejected"] == [second.detail] and events[-1]["state"] == "settled"
    tally = rig.ledger.counters.tally()
    assert tally.refusals == {("fold", "disagreed"): 1}
    (refusal,) = rig.ledger.counters.recent_refusals()
    assert (refusal.task, refusal.worker, refusal.kind) == (run_of(rig, task, 1), bob.worker_id, "disagreed")


def test_an_agreeing_pair_logs_agreed(rig: Rig, replicating: Replication, caplog) -> None:
    import logging

    from nomoat.logs import record_fields

    alice, bob = volunteer(rig, "alice"), volunteer(rig, "bob")
    task = rig.ledger.tasks.ids(submit_job(rig).job_id)[0]
    with caplog.at_level(logging.INFO):
        hand_in(rig, replicating, alice, task, seed=0)
        hand_in(rig, replicating, bob, run_of(rig, task, 1), seed=0)
        replicating.sweep()
    events = [record_fields(r)["event"] for r in caplog.records if record_fields(r).get("event", "").startswith("replica.")]
    assert events == ["replica.held", "replica.held", "replica.agreed"]
    assert rig.ledger.counters.tally().refusals == {}


# -- unpredictable checks ----------------------------------------------------------------------------


def test_the_sampling_key_is_made_once_in_the_ledger_and_shared_by_every_process(rig: Rig) -> None:
    from coordinator.ledger import Ledger, keys
    from coordinator.schedule.replication import sampled

    one = Replication(rig.deps.settings, rig.ledger, rig.store)
    other = Replication(rig.deps.settings, Ledger(rig.ledger.r), rig.store)  # another coordinator process
    key = one.sampling_key()
    assert len(key) == 32 and other.sampling_key() == key
    ids = [f"j-1-t{i:08x}" for i in range(2000)]
    chosen = {t for t in ids if sampled(t, 0.05, key)}
    # A ledger with another key (what a volunteer would have to guess) picks other tasks.
    rig.ledger.r.delete(keys.SAMPLING_KEY)
    fresh = Replication(rig.deps.settings, rig.ledger, rig.store).sampling_key()
    assert fresh != key and len(chosen & {t for t in ids if sampled(t, 0.05, fresh)}) < 0.3 * len(chosen)


def test_a_replica_run_looks_like_a_first_run_to_its_volunteer(rig: Rig, replicating: Replication) -> None:
    """The spec a replica run carries is a task spec like any other: an id made as every task id
    of its job is, the same fields, nothing that names the task it checks or says it is a check."""
    import json
    import re

    alice, bob, carol = volunteer(rig, "alice"), volunteer(rig, "bob"), volunteer(rig, "carol")
    job = submit_job(rig).job_id
    tasks = rig.ledger.tasks.ids(job)
    hand_in(rig, replicating, alice, tasks[0], seed=0)  # held: it opens a replica run, first in the queue
    run = run_of(rig, tasks[0], 1)
    cards = [FakeCard("n-bob", 8.0, 0.0, worker=bob.worker_id), FakeCard("n-carol", 8.0, 0.0, worker=carol.worker_id)]
    fake = FakeDispatcher(cards)
    Scheduler(replace(rig.deps.settings, max_units_per_run=1, speculate=False), rig.ledger, fake, "",
              lambda c: Need(1.0), replication=replicating).tick(fake.now)
    specs = {s.task_id: s for r in fake.submitted for s in r.specs}
    assert run in specs and len(specs) == 2
    replica, first = specs[run], next(s for t, s in specs.items() if t != run)
    assert first.task_id in tasks and rig.ledger.tasks.get(first.task_id).replica_of == ""
    shape = re.compile(rf"^{re.escape(job)}-t[0-9a-f]{{8}}$")
    assert shape.match(replica.task_id) and shape.match(first.task_id)
    a, b = replica.to_dict(), first.to_dict()
    assert a.keys() == b.keys() and a["train"].keys() == b["train"].keys()
    text = json.dumps(a)
    assert tasks[0] not in text and "replica" not in text.lower()
    # What differs is what differs between any two tasks of the job, and whose lease it is.
    assert {k for k in a if a[k] != b[k]} <= {"task_id", "fence", "tokens", "train", "lease_secret", "worker_id",
                                              "base_version"}
