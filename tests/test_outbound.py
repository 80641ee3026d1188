"""Outbound-only workers: the dispatcher and the long-poll hand-off against a real Redis, the
Ray token only for trusted tokens, and one real outbound worker (in a thread) running a job's
units over real gRPC on loopback through the same scheduler a Ray node would be placed by."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import pytest

from coordinator.gateway.auth import Identity
from coordinator.errors import InvalidRequest, NotFound, NotPermitted
from coordinator.ledger import TaskState
from coordinator.schedule.inbox_dispatch import (LongPolls, OutboundDispatcher, is_outbound, node_id_of, report_run,
                                                 request_work)
from coordinator.schedule import standing
from coordinator.schedule.scheduler import Scheduler
from coordinator.schedule.transport import Dispatchers, Need, Node
from nomoat.card import Card, to_message
from nomoat.client import NomoatError
from nomoat.spec import TaskSpec, UnitResult
from tests import consistency
from tests.rig import Rig, published, rig  # noqa: F401  (fixtures)
from worker.outbound import Backoff, OutboundWorker, parse_specs
from worker.probe import parse_simulated

CARD = parse_simulated("RTX 3060:12:13")


def volunteer(r: Rig, role: str = "worker", name: str = "volunteer") -> tuple[str, Identity]:
    """A worker registered over gRPC with a token of ``role``; (its id, the identity its calls carry)."""
    worker_id = r.client(role).register(name, to_message(CARD)).worker_id
    return worker_id, r.registry.lookup(r.tokens[role])


def scheduler(r: Rig, dispatcher, **changes) -> Scheduler:
    settings = replace(r.deps.settings, listen=r.address, speculate=False, **changes)
    return Scheduler(settings, r.ledger, dispatcher, r.tokens["worker"],
                     task_need=lambda config: Need(1.0))


def polls(n: int = 4) -> LongPolls:
    return LongPolls(n)


# -- the Ray token is for trusted tokens only ---------------------------------------------------------


def test_a_plain_worker_token_is_given_no_ray_token_and_a_trusted_one_is(rig: Rig) -> None:
    plain = rig.client("worker").register("public", to_message(CARD))
    assert plain.worker_id and plain.ray_address == "" and plain.ray_auth_token == ""
    trusted = rig.client("trusted-worker").register("lab", to_message(CARD))
    assert (trusted.ray_address, trusted.ray_auth_token) == ("10.0.0.1:6379", "ray-secret")


def test_ray_mode_with_a_plain_token_says_what_to_do(rig: Rig, tmp_path) -> None:
    from worker.agent import WorkerAgent

    agent = WorkerAgent(rig.client("worker"), CARD, name="x", cache_dir=tmp_path)
    with pytest.raises(NomoatError, match="Ray mode needs a trusted-worker token.*leave out --ray"):
        agent.start()
    assert agent.node is None  # no Ray node was started


# -- the dispatcher and the hand-off, through the ledger -----------------------------------------------


def test_a_worker_that_polls_is_a_card_and_one_gone_quiet_is_not(rig: Rig) -> None:
    worker_id, me = volunteer(rig)
    d = OutboundDispatcher(rig.ledger, liveness_s=60)
    assert d.nodes() == []  # registered, but it has not asked for work
    request_work(rig.ledger, rig.deps.settings, me, worker_id, 0, polls())
    (node,) = d.nodes()
    assert is_outbound(node.node_id) and node.worker_id == worker_id and node.vram_gb == 12.0 and not node.busy
    rig.ledger.inbox.seen(worker_id, now=time.time() - 61)  # its last poll, past the liveness timeout
    assert d.nodes() == []


def test_a_card_that_loads_4bit_says_so_in_its_registration_and_is_placed_as_such(rig: Rig) -> None:
    # Fake: a real CUDA card whose worker has bitsandbytes, as worker.probe would describe it.
    cuda = Card("NVIDIA GeForce RTX 2060", 6.0, 5.5, "7.5", False, True, "cuda", 25.8, loads_4bit=True)
    # A simulated card trains on the CPU: what it claims about 4 bits is not believed.
    claims = replace(CARD, loads_4bit=True)
    d = OutboundDispatcher(rig.ledger, liveness_s=60)
    ids = {}
    for name, card in (("cuda", cuda), ("plain", replace(cuda, loads_4bit=False)), ("simulated", claims)):
        ids[name] = rig.client("worker").register(name, to_message(card)).worker_id
        request_work(rig.ledger, rig.deps.settings, rig.registry.lookup(rig.tokens["worker"]), ids[name], 0, polls())
    nodes = {n.worker_id: n for n in d.nodes()}
    assert nodes[ids["cuda"]].loads_4bit and nodes[ids["cuda"]].vram_gb == 6.0
    assert not nodes[ids["plain"]].loads_4bit and not nodes[ids["simulated"]].loads_4bit
    # The card a run's spec names (what the worker plans for) carries it too.
    sched = scheduler(rig, d)
    assert sched.card_of(ids["cuda"]).loads_4bit and not sched.card_of(ids["simulated"]).loads_4bit


def test_a_run_crosses_the_ledger_as_data_and_its_report_comes_back(rig: Rig) -> None:
    worker_id, me = volunteer(rig)
    d = OutboundDispatcher(rig.ledger)
    request_work(rig.ledger, rig.deps.settings, me, worker_id, 0, polls())
    s = scheduler(rig, d)
    rig.submit()
    s.tick()
    (node,) = d.nodes()
    assert node.busy and d.in_flight() == 1
    work = request_work(rig.ledger, rig.deps.settings, me, worker_id, 1, polls())
    specs = parse_specs(list(work.specs))
    assert work.run_id and specs and all(isinstance(x, TaskSpec) for x in specs)
    assert all(x.token == "" and x.worker_id == worker_id for x in specs)  # the coordinator's token stays home
    assert all(rig.ledger.tasks.get(x.task_id).state is TaskState.LEASED for x in specs)
    # The first unit ran out of memory on every plan; the others were handed back unstarted.
    first, *rest = specs
    attempts = {x.task_id: rig.ledger.tasks.get(x.task_id).attempts for x in rest}
    report_run(rig.ledger, me, worker_id, work.run_id,
               [json.dumps(UnitResult(first.task_id, first.fence, "out of memory", needs_vram_gb=12.01).to_dict())],
               [x.task_id for x in rest], {x.task_id: x.lease_secret for x in specs})
    for x in rest:  # back in the queue now, no attempt spent
        task = rig.ledger.tasks.get(x.task_id)
        assert task.state is TaskState.PENDING and task.attempts == attempts[x.task_id] - 1
    (done,) = d.poll()
    assert (done.task_id, done.fence, done.needs_vram_gb, done.worker_id) == (first.task_id, first.fence, 12.01,
                                                                               worker_id)
    assert d.in_flight() == 0 and not d.nodes()[0].busy
    s._finished(done)
    assert rig.ledger.tasks.get(first.task_id).min_vram_gb == 12.01
    consistency.check(rig.ledger)


def test_a_report_names_only_the_callers_own_run_and_units(rig: Rig) -> None:
    worker_id, me = volunteer(rig)
    other_id, other = volunteer(rig, "trusted-worker", "other")
    d = OutboundDispatcher(rig.ledger)
    request_work(rig.ledger, rig.deps.settings, me, worker_id, 0, polls())
    rig.submit()
    scheduler(rig, d).tick()
    work = request_work(rig.ledger, rig.deps.settings, me, worker_id, 1, polls())
    spec = parse_specs(list(work.specs))[0]
    with pytest.raises(NotPermitted):  # another token may not report for this worker
        report_run(rig.ledger, other, worker_id, work.run_id, [], [])
    with pytest.raises(NotFound, match=f"worker {other_id} has no run"):  # nor pass its own worker off as this run's
        report_run(rig.ledger, other, other_id, work.run_id, [], [])
    with pytest.raises(InvalidRequest):  # a unit under another fence is not this run's
        report_run(rig.ledger, me, worker_id, work.run_id,
                   [json.dumps(UnitResult(spec.task_id, spec.fence + 99).to_dict())], [], {spec.task_id: spec.lease_secret})
    with pytest.raises(InvalidRequest, match="with the lease secret its spec carried"):  # nor one without its secret
        report_run(rig.ledger, me, worker_id, work.run_id, [json.dumps(UnitResult(spec.task_id, spec.fence).to_dict())],
                   [spec.task_id])
    with pytest.raises(InvalidRequest):
        report_run(rig.ledger, me, worker_id, work.run_id, ['{"task_id": 1}'], [])
    with pytest.raises(NotPermitted):  # nor may another token ask for this worker's work
        request_work(rig.ledger, rig.deps.settings, other, worker_id, 0, polls())
    assert rig.ledger.tasks.get(spec.task_id).state is TaskState.LEASED  # nothing changed


def test_an_expired_lease_withdraws_a_run_not_yet_handed_out_and_reissues_it(rig: Rig) -> None:
    worker_id, me = volunteer(rig)
    d = OutboundDispatcher(rig.ledger)
    request_work(rig.ledger, rig.deps.settings, me, worker_id, 0, polls())
    s = scheduler(rig, d, max_units_per_run=1)
    rig.submit()
    s.tick()
    (task_id, (node_id, _)), = d.placement().items()
    fence = rig.ledger.tasks.get(task_id).fence
    s.tick(now=time.time() + s.settings.queue_timeout_s + 1)  # the worker never came for it
    assert rig.ledger.tasks.get(task_id).state is TaskState.PENDING  # back in the queue, for a new fence
    work = request_work(rig.ledger, rig.deps.settings, me, worker_id, 0, polls())
    (spec,) = parse_specs(list(work.specs))  # the next run only: the expired one left the inbox
    assert spec.task_id != task_id
    assert "not leased" in rig.ledger.leases.heartbeat(task_id, fence, time.time() + 60).reason


def test_a_run_nobody_takes_goes_back_after_the_claim_timeout_not_the_queue_timeout(rig: Rig) -> None:
    """A volunteer that polled once and vanished (or left) is given a run nobody then takes. Its
    lease ends at claim_timeout_s, not queue_timeout_s (15 minutes: a "ghost placement" held a
    job's tail that long in bench/adversary.py): the task goes back without spending an attempt,
    and the vanished volunteer is charged an abandoned lease."""
    worker_id, me = volunteer(rig)
    d = OutboundDispatcher(rig.ledger)
    request_work(rig.ledger, rig.deps.settings, me, worker_id, 0, polls())  # one poll, then gone
    s = scheduler(rig, d, max_units_per_run=1, claim_timeout_s=30.0)
    assert s.settings.queue_timeout_s > 31
    rig.submit()
    t = time.time()
    s.tick(now=t)
    (task_id, _), = d.placement().items()
    first = rig.ledger.tasks.get(task_id)
    s.tick(now=t + 20)  # within the claim window: still its lease
    assert rig.ledger.leases.problem(task_id, first.fence) == ""
    s.tick(now=t + 31)  # past it, long before queue_timeout_s
    assert rig.ledger.leases.problem(task_id, first.fence) != ""  # that lease is over
    again = rig.ledger.tasks.get(task_id)
    assert again.state is TaskState.PENDING  # back in the queue (its volunteer, charged, is not given it again)
    assert again.attempts == first.attempts - 1  # the unclaimed lease is given back: no attempt spent
    record = rig.ledger.trust.get(rig.ledger.trust.of_workers([worker_id])[worker_id])
    assert record.reasons() == {standing.ABANDONED: 1}


def test_a_runs_later_units_wait_for_the_earlier_ones_past_the_claim_timeout(rig: Rig) -> None:
    """Only a run's first unit must be claimed within claim_timeout_s: the worker trains its units
    in order, so a later unit's first heartbeat comes when the earlier ones are done. A worker
    that took the run and keeps its first unit's lease alive loses none of the others."""
    worker_id, me = volunteer(rig)
    d = OutboundDispatcher(rig.ledger)
    request_work(rig.ledger, rig.deps.settings, me, worker_id, 0, polls())
    rig.ledger.workers.record_run(worker_id, node_id_of(worker_id), 10_000, 1.0)  # a fast card: runs of 2
    s = scheduler(rig, d, max_units_per_run=2, target_task_seconds=1e6, claim_timeout_s=30.0)
    rig.submit()
    t = time.time()
    s.tick(now=t)
    work = request_work(rig.ledger, rig.deps.settings, me, worker_id, 0, polls())
    first, second = parse_specs(list(work.specs))
    # the worker trains the first unit for a while: its heartbeats keep that lease
    assert rig.ledger.leases.heartbeat(first.task_id, first.fence, t + 200).ok
    s.tick(now=t + 100)  # past the claim timeout, the second unit not started yet
    assert rig.ledger.leases.problem(first.task_id, first.fence) == ""
    assert rig.ledger.leases.problem(second.task_id, second.fence) == ""


def test_cancel_of_a_run_being_trained_returns_its_units_and_its_late_report_is_ignored(rig: Rig) -> None:
    worker_id, me = volunteer(rig)
    d = OutboundDispatcher(rig.ledger)
    request_work(rig.ledger, rig.deps.settings, me, worker_id, 0, polls())
    rig.submit()
    scheduler(rig, d).tick()
    work = request_work(rig.ledger, rig.deps.settings, me, worker_id, 0, polls())
    specs = parse_specs(list(work.specs))
    stopped = d.cancel(specs[0].task_id)
    assert stopped == [(x.task_id, x.fence) for x in specs] and d.in_flight() == 0
    report_run(rig.ledger, me, worker_id, work.run_id, [], [])
    assert d.poll() == []


def test_a_full_frontend_answers_a_poll_at_once_with_when_to_ask_again(rig: Rig) -> None:
    worker_id, me = volunteer(rig)
    full = polls(1)
    assert full.acquire()  # the one long-poll slot is held
    started = time.monotonic()
    work = request_work(rig.ledger, rig.deps.settings, me, worker_id, 5, full)
    assert time.monotonic() - started < 2 and work.run_id == "" and 0.5 <= work.poll_again_s <= 45
    free = polls(1)
    started = time.monotonic()
    assert request_work(rig.ledger, rig.deps.settings, me, worker_id, 1, free).poll_again_s == 0
    assert time.monotonic() - started >= 0.9  # it waited the long-poll out


def test_the_composite_places_on_each_transport_and_cancels_in_the_one_holding_the_task(rig: Rig) -> None:
    a_id, a = volunteer(rig, name="a")
    b_id, b = volunteer(rig, name="b")
    one, two = OutboundDispatcher(rig.ledger), OutboundDispatcher(rig.ledger)
    one.nodes = lambda: [Node("outbound:" + a_id, 12.0, False, a_id)]  # each transport lists its own cards
    two.nodes = lambda: [Node("outbound:" + b_id, 12.0, False, b_id)]
    both = Dispatchers(one, two)
    s = scheduler(rig, both, max_units_per_run=1)
    rig.submit()
    s.tick()
    assert one.in_flight() == two.in_flight() == 1 and both.in_flight() == 2
    (task_b,) = two.placement()
    assert both.cancel(task_b) == [(task_b, rig.ledger.tasks.get(task_b).fence)]
    assert two.in_flight() == 0 and one.in_flight() == 1
    with pytest.raises(KeyError):
        both.submit([], {}, "nowhere")


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    b = Backoff(base=1.0, cap=8.0)
    delays = [b.next() for _ in range(6)]
    assert 0.5 <= delays[0] <= 1 and 4 <= delays[3] <= 8 and all(d <= 8 for d in delays)
    b.reset()
    assert b.next() <= 1


def test_malformed_units_of_a_run_are_left_out_not_run() -> None:
    good = TaskSpec.from_dict(json.loads(json.dumps({
        "task_id": "t-1", "job_id": "j", "fence": 3, "base_version": 0, "tokens": 10, "coordinator": "x:1",
        "token": "", "lora": {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj"]},
        "train": {"seq_len": 8, "batch_size": 1, "learning_rate": 0.1, "epochs": 1, "seed": 0},
        "lease_ttl_s": 30.0})))
    raw = [json.dumps(good.to_dict()), json.dumps({**good.to_dict(), "command": "rm -rf /"}), "not json",
           json.dumps({**good.to_dict(), "fence": "3"})]
    assert parse_specs(raw) == [good]


# -- a real outbound worker over gRPC -----------------------------------------------------------------


def test_an_outbound_worker_trains_a_jobs_units_through_the_scheduler(rig: Rig, tmp_path) -> None:
    """Register, long-poll, heartbeat, fetch, train the tiny model, upload, report: the whole
    loop of a volunteer behind a router, in a thread."""
    d = OutboundDispatcher(rig.ledger)
    s = scheduler(rig, Dispatchers(d), max_units_per_run=2, target_task_seconds=1e6)
    job_id = rig.submit().job_id
    worker = OutboundWorker(rig.client("worker"), CARD, name="home", cache_dir=tmp_path / "cache", threads=1,
                            poll_wait_s=1.0)
    worker.start()
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 240
        while worker.runs_done < 1:
            assert time.monotonic() < end and thread.is_alive(), "the outbound worker did not finish a run"
            s.tick()
            time.sleep(0.2)
        for _ in range(10):
            s.tick()
        tasks = rig.ledger.tasks.of_job(job_id)
        done = [t for t in tasks if t.state is TaskState.DONE]
        assert len(done) >= 1 and all(rig.ledger.adapters.get(t.adapter).worker == worker.worker_id
                                      for t in done if t.adapter)
        assert rig.ledger.workers.get(worker.worker_id).tokens_per_s > 0  # its report measured the card
    finally:
        worker.stop()
        thread.join(timeout=30)
    for _ in range(3):
        s.tick()
    consistency.check(rig.ledger)


def test_a_stopping_worker_hands_back_the_units_it_has_not_started(rig: Rig, tmp_path) -> None:
    d = OutboundDispatcher(rig.ledger)
    s = scheduler(rig, d, max_units_per_run=3, target_task_seconds=1e6)
    rig.submit()
    worker = OutboundWorker(rig.client("worker"), CARD, name="leaving", cache_dir=tmp_path / "cache")
    worker.start()
    request_work(rig.ledger, rig.deps.settings, rig.registry.lookup(rig.tokens["worker"]), worker.worker_id, 0,
                 polls())
    rig.ledger.workers.record_run(worker.worker_id, "", 1000, 1.0)  # a known speed: a run of several units
    s.tick()
    reply = worker.client.request_work(worker.worker_id, 1)
    specs = parse_specs(list(reply.task_specs))
    assert len(specs) == 3
    worker.stop()  # Ctrl-C as the run arrives
    worker._do_run(reply.run_id, list(reply.task_specs))
    for spec in specs:
        task = rig.ledger.tasks.get(spec.task_id)
        assert task.state is TaskState.PENDING and task.attempts == 0 and "handed it back" in task.error
    assert d.poll() == [] and d.in_flight() == 0  # nothing to release: they are already back in the queue
    consistency.check(rig.ledger)


def test_a_stop_ends_a_long_poll_at_once(rig: Rig, tmp_path) -> None:
    """Ctrl-C while the worker waits for work (no job: the poll would last its whole 20 s)."""
    worker = OutboundWorker(rig.client("worker"), CARD, name="idle", cache_dir=tmp_path / "cache", poll_wait_s=20.0)
    worker.start()
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    time.sleep(1.0)  # inside the long-poll now
    stopped = time.monotonic()
    worker.stop()
    thread.join(timeout=10)
    assert not thread.is_alive() and time.monotonic() - stopped < 2.0


def test_a_long_poll_nobody_waits_for_any_more_ends_and_frees_its_slot(rig: Rig, tmp_path) -> None:
    """The worker cancelled its poll, or the server is stopping: the handler stops waiting within
    a slice instead of holding a server thread and a slot for the rest of its 20 s."""
    worker = OutboundWorker(rig.client("worker"), CARD, name="gone", cache_dir=tmp_path / "cache")
    worker.start()
    slots, started = polls(1), time.monotonic()
    work = request_work(rig.ledger, rig.deps.settings, rig.registry.lookup(rig.tokens["worker"]), worker.worker_id,
                        20.0, slots, still_wanted=lambda: time.monotonic() < started + 1.5)
    assert not work.run_id and time.monotonic() - started < 4.0
    assert slots.acquire()  # the slot is free again


def test_ray_only_flags_without_ray_mode_are_a_sentence() -> None:
    from click.testing import CliRunner

    from nomoat.cli import main

    result = CliRunner().invoke(main, ["worker", "start", "--coordinator", "127.0.0.1:1", "--token", "t",
                                       "--ray-address", "10.0.0.1:6379", "--simulate-gpu", "RTX 3060:12"])
    assert result.exit_code == 1 and "add --ray" in result.output and "Traceback" not in result.output


def test_a_task_that_avoids_a_volunteer_is_placed_on_another_outbound_one(rig: Rig) -> None:
    """A replica run (coordinator.schedule.replication) must go to another volunteer whatever the
    transport: here both volunteers are outbound workers, and every task avoids alice."""
    from coordinator.schedule import standing

    alice, alice_id = volunteer(rig, name="alice")
    bob_token = rig.registry.create("worker", name="bob")
    bob = rig.client(token=bob_token).register("bob", to_message(CARD)).worker_id
    bob_id = rig.registry.lookup(bob_token)
    d = OutboundDispatcher(rig.ledger)
    for worker_id, me in ((alice, alice_id), (bob, bob_id)):
        request_work(rig.ledger, rig.deps.settings, me, worker_id, 0, polls())
    s = scheduler(rig, Dispatchers(d), max_units_per_run=2, target_task_seconds=1e6)
    job_id = rig.submit().job_id
    avoid = json.dumps([standing.volunteer_of(alice_id.token_hash, alice)])
    for task_id in rig.ledger.tasks.ids(job_id):
        rig.ledger.r.hset(f"nomoat:task:{task_id}", "avoid", avoid)
    s.tick()
    assert request_work(rig.ledger, rig.deps.settings, alice_id, alice, 0, polls()).run_id == ""
    work = request_work(rig.ledger, rig.deps.settings, bob_id, bob, 1, polls())
    specs = parse_specs(list(work.specs))
    assert work.run_id and specs and all(x.worker_id == bob for x in specs)
