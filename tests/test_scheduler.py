"""The real Scheduler and Ledger, over the session's real redis-server, with a fake cluster.

tests/fakes.py's FakeDispatcher stands in for Ray: cards with VRAM and a simulated speed, runs
that end when a test says so or when their simulated time has passed. Each test drives
``Scheduler.tick`` with the fake's clock through one behaviour: placement, throughput sizing,
speculation, re-issue of expired leases, failures, and how a job ends. No Ray, no processes:
each test takes milliseconds. The same behaviours on a real Ray cluster are tests/test_placement.py
(slow tier).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from coordinator.observe import status
from coordinator.ledger import (
    FoldedAdapter,
    JobConfig,
    JobRecord,
    Ledger,
    TaskRecord,
    VersionRecord,
    twin_id,
)
from coordinator.schedule.ray_dispatch import task_need
from coordinator.schedule.scheduler import Scheduler
from coordinator.schedule.transport import Need
from coordinator.settings import Settings
from tests import consistency
from tests.fakes import FakeCard, FakeDispatcher, Upload, unit_of
from worker.probe import VRAM_RESOURCE

# -- the ledger and task-spec fields these tests read: one place to adapt when they change ------

# What a task of a job needs, by the job's sequence length: in 16 bits, and with a 4-bit base on a
# card that loads one (the real planner's figures are tests/test_planner.py's business; here they
# only have to differ).
NEED_BY_SEQ_LEN = {64: Need(4.0), 512: Need(6.5, 2.1), 1024: Need(8.0), 8192: Need(30.0, 9.0)}


def need_of(config: JobConfig) -> Need:
    return NEED_BY_SEQ_LEN[config.seq_len]


def make_job(ledger: Ledger, job_id: str, tasks: int, tokens: int = 100, seq_len: int = 64,
             plan_model: str = "") -> list[str]:
    """Record a running job of ``tasks`` pending tasks of ``tokens`` tokens; returns their ids."""
    config = JobConfig(lora_rank=2, lora_alpha=4.0, target_modules=("q_proj",), seq_len=seq_len,
                       learning_rate=1e-3, batch_size=8, epochs=1, tokens_per_task=tokens, plan_model=plan_model)
    ids = [f"{job_id}-t{i:03d}" for i in range(tasks)]
    ledger.jobs.create(JobRecord(job_id=job_id, name=job_id, config=config, total_tasks=tasks),
                       [TaskRecord(task_id=t, job=job_id, index=i, start=i, end=i + 1, tokens=tokens)
                        for i, t in enumerate(ids)])
    return ids


def upload_to(ledger: Ledger) -> Upload:
    """What a worker's task does at its end: upload the adapter under the run's fence."""
    def upload(spec, worker_id: str) -> str:
        task_id, fence, tokens = unit_of(spec)
        sha = hashlib.sha256(f"{task_id}/{fence}".encode()).hexdigest()
        accepted = ledger.adapters.accept(task_id, fence, sha, tokens=tokens, worker_id=worker_id)
        return "" if accepted.ok else accepted.detail
    return upload


def state(ledger: Ledger, task_id: str) -> str:
    return ledger.tasks.get(task_id).state


def fence(ledger: Ledger, task_id: str) -> int:
    return ledger.tasks.get(task_id).fence


def heartbeat(ledger: Ledger, task_id: str, deadline: float) -> None:
    """What the service does with a worker's heartbeat: extend the run's lease to ``deadline``."""
    assert ledger.leases.heartbeat(task_id, fence(ledger, task_id), deadline).ok


def job_field(ledger: Ledger, job_id: str, name: str):
    return getattr(ledger.jobs.get(job_id), name)


def buffered_tasks(ledger: Ledger) -> list[str]:
    """The task (or twin) of every adapter in the fold buffer."""
    return [a.task for a in ledger.adapters.buffered()]


def fold(ledger: Ledger) -> list[str]:
    """What the folder does: publish every buffered adapter in the next version; their ids."""
    ids = [a.adapter_id for a in ledger.adapters.buffered()]
    number = ledger.versions.latest() + 1
    ledger.versions.publish(VersionRecord(version=number, parent=number - 1,
                                          adapters=tuple(FoldedAdapter(a, 1.0 / len(ids)) for a in ids)),
                            folded=[(a, 1.0 / len(ids)) for a in ids])
    return ids


def folded_ids(ledger: Ledger) -> list[str]:
    return [a.id for v in ledger.versions.all() for a in v.adapters]


# -- the rig -------------------------------------------------------------------------------------


SMALL = FakeCard("small", 6.0, 100.0, "GTX 1650")
BIG = FakeCard("big", 24.0, 1000.0, "RTX 4090")


@pytest.fixture
def make(ledger):
    """make(cards, **settings) -> (scheduler, fake): a scheduler over ``cards`` and version 0."""
    ledger.versions.publish(VersionRecord(version=0, parent=-1))

    def build(cards: list[FakeCard], **overrides) -> tuple[Scheduler, FakeDispatcher]:
        settings = Settings(data_dir=Path("unused"), **{"target_task_seconds": 1.0, **overrides})
        for card in cards:  # every card's worker registered first, as a joining worker is
            ledger.workers.register(card.worker_id, name=card.name, card=b"")
        fake = FakeDispatcher(cards, upload=upload_to(ledger))
        return Scheduler(settings, ledger, fake, "worker-token", need_of), fake

    yield build
    consistency.check(ledger)


def on(fake: FakeDispatcher, card: FakeCard) -> list[list[str]]:
    """The units of every run submitted to ``card``, in order."""
    return [run.task_ids for run in fake.submitted if run.card == card]


# -- placement -----------------------------------------------------------------------------------


def test_a_task_too_big_for_the_small_card_goes_to_the_big_one(ledger, make) -> None:
    scheduler, fake = make([SMALL, BIG])
    long = make_job(ledger, "long", 2, seq_len=1024)  # 8 GB: not the 6 GB card
    short = make_job(ledger, "short", 1, seq_len=64)  # 4 GB: any card
    scheduler.tick(fake.now)
    # The oldest task the small card can hold is the short job's, behind the long job's second.
    assert on(fake, BIG) == [[long[0]]] and on(fake, SMALL) == [[short[0]]]
    assert [r.resources[VRAM_RESOURCE] for r in fake.submitted if r.card == BIG] == [8.0]
    fake.complete(long[0])
    fake.complete(short[0])
    scheduler.tick(fake.now)
    assert on(fake, BIG) == [[long[0]], [long[1]]] and on(fake, SMALL) == [[short[0]]]
    assert fake.in_flight() == 1


def test_a_unit_out_of_memory_on_its_card_moves_to_one_with_more_vram(ledger, make) -> None:
    scheduler, fake = make([SMALL, BIG])
    (task,) = make_job(ledger, "j", 1, seq_len=64)  # planned at 4 GB, but 6 GB is not enough
    scheduler.tick(fake.now)
    assert on(fake, SMALL) == [[task]]
    first = fence(ledger, task)
    fake.oom(task)
    scheduler.tick(fake.now)
    assert on(fake, SMALL) == [[task]] and on(fake, BIG) == [[task]], "the small card was free yet not chosen"
    # The need the worker reported is a floor for its own card only: the big card plans as before.
    assert ledger.tasks.get(task).vram_floors == {SMALL.worker_id: SMALL.vram_gb + 0.01}
    assert fake.submitted[-1].resources[VRAM_RESOURCE] == 4.0
    assert fence(ledger, task) > first
    fake.complete(task)
    scheduler.tick(fake.now)
    assert state(ledger, task) == "done"


# -- 4-bit bases (QLoRA) --------------------------------------------------------------------------

# Two 6 GB cards: one a CUDA card whose worker has bitsandbytes, one that cannot load 4 bits.
QLORA = FakeCard("qlora", 6.0, 100.0, "RTX 2060", loads_4bit=True)
PLAIN = FakeCard("plain", 6.0, 100.0, "GTX 1660 Ti")


def test_a_small_card_that_loads_4bit_gets_a_task_that_fits_it_only_in_4_bits(ledger, make) -> None:
    scheduler, fake = make([PLAIN, QLORA])
    tasks = make_job(ledger, "j", 2, seq_len=512)  # 6.5 GB in 16 bits, 2.1 GB with a 4-bit base
    scheduler.tick(fake.now)
    assert on(fake, QLORA) == [[tasks[0]]] and on(fake, PLAIN) == []
    # Ray is asked for what the card's plan needs: the 4-bit one.
    assert fake.submitted[0].resources[VRAM_RESOURCE] == 2.1
    assert job_field(ledger, "j", "warning") == ""  # it waits for no card
    fake.complete(tasks[0])
    scheduler.tick(fake.now)
    assert on(fake, QLORA) == [[tasks[0]], [tasks[1]]] and on(fake, PLAIN) == []


def test_a_card_that_cannot_load_4bit_is_not_given_a_task_that_fits_it_only_in_4_bits(ledger, make) -> None:
    scheduler, fake = make([PLAIN])
    tasks = make_job(ledger, "j", 2, seq_len=512)
    scheduler.tick(fake.now)
    assert fake.submitted == [] and all(state(ledger, t) == "pending" for t in tasks)
    warning = job_field(ledger, "j", "warning")
    assert "at least 6.5 GB of VRAM (2.1 GB on a CUDA card whose worker has bitsandbytes" in warning
    assert "no such card is in the cluster" in warning
    fake.add_card(QLORA)
    scheduler.tick(fake.now)
    assert on(fake, QLORA) == [[tasks[0]]] and job_field(ledger, "j", "warning") == ""


def test_a_card_the_16bit_plan_fits_is_asked_for_that_plan_though_it_loads_4bit(ledger, make) -> None:
    roomy = FakeCard("roomy", 12.0, 100.0, "RTX 3060", loads_4bit=True)
    scheduler, fake = make([roomy])
    make_job(ledger, "j", 1, seq_len=512)
    scheduler.tick(fake.now)
    # The worker's planner takes the 16-bit plan where it fits (worker.planner.plan): ask for it.
    assert [r.resources[VRAM_RESOURCE] for r in fake.submitted] == [6.5]


def test_a_job_that_fits_no_card_even_in_4_bits_says_so(ledger, make) -> None:
    scheduler, fake = make([QLORA, BIG])
    tasks = make_job(ledger, "huge", 2, seq_len=8192)  # 30 GB in 16 bits, 9 GB in 4 bits
    scheduler.tick(fake.now)
    assert fake.submitted == []
    warning = job_field(ledger, "huge", "warning")
    assert "at least 30.0 GB of VRAM (9.0 GB on a CUDA card whose worker has bitsandbytes" in warning
    assert "the largest such card has 6 GB" in warning
    assert "the largest of the 2 cards in the cluster has 24 GB" in warning
    bigger = FakeCard("3060", 12.0, 100.0, "RTX 3060", loads_4bit=True)
    fake.add_card(bigger)
    scheduler.tick(fake.now)
    assert on(fake, bigger) == [[tasks[0]]] and fake.submitted[0].resources[VRAM_RESOURCE] == 9.0
    assert job_field(ledger, "huge", "warning") == ""


def test_the_real_plans_put_a_7b_task_on_a_12gb_card_only_where_it_loads_4bit(ledger, make) -> None:
    # The coordinator's own figures (nomoat.memory through coordinator.schedule.ray_dispatch.task_need): a 7B
    # base needs about 16 GB in bf16 and about 6 GB in NF4.
    need = task_need(None, JobConfig(lora_rank=2, lora_alpha=4.0, target_modules=("q_proj",), seq_len=512,
                                     learning_rate=1e-3, batch_size=8, epochs=1, tokens_per_task=100,
                                     plan_model="llama-2-7b"))
    assert need.vram_gb > 12.0 > need.vram_4bit_gb
    scheduler, fake = make([])
    scheduler.task_need = lambda config: task_need(None, config)
    small_4bit = FakeCard("q12", 12.0, 100.0, "RTX 3060", loads_4bit=True)
    small = FakeCard("p12", 12.0, 100.0, "RTX 3060")
    for card in (small, small_4bit):
        fake.add_card(card)
        ledger.workers.register(card.worker_id, name=card.name, card=b"")
    (task,) = make_job(ledger, "seven", 1, seq_len=512, plan_model="llama-2-7b")
    scheduler.tick(fake.now)
    assert on(fake, small_4bit) == [[task]] and on(fake, small) == []
    assert fake.submitted[0].resources[VRAM_RESOURCE] == need.vram_4bit_gb


# -- throughput sizing ---------------------------------------------------------------------------


def test_a_fast_card_gets_a_longer_run_than_a_slow_one(ledger, make) -> None:
    slow, fast = FakeCard("slow", 24.0, 100.0), FakeCard("fast", 24.0, 1000.0)
    scheduler, fake = make([slow, fast], target_task_seconds=1.0, max_units_per_run=16)
    tasks = make_job(ledger, "j", 30, tokens=100)
    scheduler.tick(fake.now)
    # Speeds unknown: one unit each.
    assert [len(r.specs) for r in fake.submitted] == [1, 1]
    # 100 tokens: 0.1 s on the fast card, 1 s on the slow one; the coordinator sees each finish
    # when a round finds its upload accepted (its own clock, not what the card says).
    fake.advance(0.1)
    scheduler.tick(fake.now)
    fake.advance(0.9)
    scheduler.tick(fake.now)
    (_, fast_run), (_, slow_run) = on(fake, fast), on(fake, slow)
    # About target_task_seconds at the measured speed: 1000 tokens/s x 1 s / 100 tokens a unit.
    assert len(fast_run) == 10 and len(slow_run) == 1
    # Every unit keeps its own lease and fence; a run takes the job's next tasks in order.
    assert fast_run == tasks[2:12] and slow_run == tasks[12:13]
    fences = [unit_of(s)[1] for s in fake.submitted[-2].specs + fake.submitted[-1].specs]
    assert len(set(fences)) == len(fences) and all(state(ledger, t) == "leased" for t in fast_run + slow_run)


def test_a_card_whose_ray_node_was_replaced_keeps_its_measured_speed(ledger, make) -> None:
    # The agent labels its Ray node with its worker id; after a Ray restart the same worker's card
    # is a new node, which no finished run has named yet.
    before = FakeCard("node-1", 24.0, 1000.0, worker="w-fast")
    after = FakeCard("node-2", 24.0, 1000.0, worker="w-fast")
    scheduler, fake = make([before], target_task_seconds=1.0, max_units_per_run=16)
    tasks = make_job(ledger, "j", 12, tokens=100)
    scheduler.tick(fake.now)
    fake.advance(0.1)  # one unit at 1000 tokens/s, recorded on node-1
    del fake.cards[before.node_id]  # the node is gone; the next tick finds the worker on node-2
    fake.add_card(after)
    scheduler.tick(fake.now)
    assert on(fake, after) == [tasks[1:11]], "the worker's first run on its new node was sized as a stranger's"


def test_a_run_whose_node_died_releases_each_of_its_units(ledger, make) -> None:
    scheduler, fake = make([BIG], target_task_seconds=0.3)
    tasks = make_job(ledger, "j", 4, tokens=100)
    scheduler.tick(fake.now)
    fake.advance(0.1)  # one unit at 1000 tokens/s: the card's speed is known from here on
    scheduler.tick(fake.now)
    run = fake.submitted[-1].task_ids
    assert run == tasks[1:4]
    before = {t: fence(ledger, t) for t in run}
    fake.crash(run[1])
    scheduler.tick(fake.now)  # every unit back in the queue, and out again, each with a new fence
    assert fake.submitted[-1].task_ids == run
    assert all(fence(ledger, t) > before[t] for t in run)


# -- keeping the global batch -------------------------------------------------------------------


@pytest.mark.parametrize("cards,fold_every,keep,batch,lr", [
    (1, 4, True, 8, 1e-3),                 # K = 1: one card, the job's own batch and lr
    (2, 4, True, 4, 1e-3 * 2 ** 0.5),      # K = 2 cards
    (4, 4, True, 2, 2e-3),                 # K = 4: the measured x2
    (6, 4, True, 2, 2e-3),                 # K = fold_every: a fold averages at most 4
    (4, 2, True, 4, 1e-3 * 2 ** 0.5),      # ... however many cards there are
    (4, 4, False, 8, 1e-3),                # keep_global_batch off: the job's
])
def test_a_task_trains_at_the_job_batch_over_the_adapters_a_fold_averages(
        ledger, make, cards: int, fold_every: int, keep: bool, batch: int, lr: float) -> None:
    # One run per card before the fold times out (1 s runs, 1 s timeout): K counts cards.
    scheduler, fake = make([FakeCard(f"c{i}", 24.0, 100.0) for i in range(cards)],
                           fold_every=fold_every, keep_global_batch=keep, fold_timeout_s=1.0)
    tasks = make_job(ledger, "j", cards, tokens=100)  # batch 8, lr 1e-3
    scheduler.tick(fake.now)
    specs = [s for run in fake.submitted for s in run.specs]
    assert len(specs) == cards
    for spec in specs:
        # The same tokens per task (so K times the steps), the job's batch over K, lr x sqrt(K).
        assert spec.tokens == 100
        assert spec.train.batch_size == batch
        assert spec.train.learning_rate == pytest.approx(lr)
    # The ledger and `nomoat status` say what the tasks train at.
    record = ledger.tasks.get(tasks[0])
    assert (record.batch_size, record.learning_rate) == (batch, pytest.approx(lr))
    shown = status.job(ledger, "j").training
    assert shown.startswith(f"batch {batch}, lr {lr:.3g}")
    assert ("over" in shown) == (batch != 8)


def test_a_card_too_small_for_the_job_does_not_count_towards_the_fold(ledger, make) -> None:
    # SMALL (6 GB) cannot hold a seq-len-1024 task (8 GB): only the two big cards work the job.
    scheduler, fake = make([SMALL, BIG, FakeCard("big2", 24.0, 1000.0)], fold_timeout_s=1.0)
    make_job(ledger, "long", 3, seq_len=1024)
    scheduler.tick(fake.now)
    specs = [s for run in fake.submitted for s in run.specs]
    assert [s.train.batch_size for s in specs] == [4, 4]
    assert all(s.train.learning_rate == pytest.approx(1e-3 * 2 ** 0.5) for s in specs)


# -- speculation near a job's end ----------------------------------------------------------------


@pytest.fixture
def straggling(ledger, make):
    """Three tasks on a fast and a slow card; the fast card runs two, the slow one's is last."""
    slow, fast = FakeCard("slow", 24.0, 10.0), FakeCard("fast", 24.0, 1000.0)
    scheduler, fake = make([fast, slow], target_task_seconds=0.1)
    tasks = make_job(ledger, "j", 3, tokens=100)
    scheduler.tick(fake.now)
    assert on(fake, fast) == [[tasks[0]]] and on(fake, slow) == [[tasks[1]]]
    fake.advance(0.1)
    scheduler.tick(fake.now)
    fake.advance(0.1)
    scheduler.tick(fake.now)  # the fast card is idle, nothing is pending: tasks[1] is raced
    return scheduler, fake, tasks, fast, slow


def test_a_straggler_is_raced_and_the_first_result_wins(ledger, straggling) -> None:
    scheduler, fake, tasks, fast, slow = straggling
    twin = twin_id(tasks[1])
    assert on(fake, fast) == [[tasks[0]], [tasks[2]], [twin]]
    fake.advance(0.1)  # the twin finishes long before the slow card would
    assert scheduler.tick(fake.now) == {"j"}  # nothing left to train; its adapters wait for a fold
    assert [r.task_ids for r in fake.cancelled] == [[tasks[1]]], "the slow run was not stopped"
    assert all(state(ledger, t) == "done" for t in tasks)
    assert sorted(buffered_tasks(ledger)) == sorted([tasks[0], twin, tasks[2]])
    fold(ledger)
    scheduler.tick(fake.now)
    assert job_field(ledger, "j", "state") == "done" and job_field(ledger, "j", "adapters_folded") == 3


def test_when_both_runs_of_a_raced_task_finish_only_the_first_is_folded(ledger, straggling) -> None:
    scheduler, fake, tasks, fast, slow = straggling
    twin = twin_id(tasks[1])
    fake.complete(tasks[1])  # the original uploads first ...
    fake.complete(twin)  # ... so the twin's upload is refused
    scheduler.tick(fake.now)
    assert sorted(buffered_tasks(ledger)) == sorted(tasks)
    assert twin not in ledger.leases.pending() and fake.in_flight() == 0
    fold(ledger)
    scheduler.tick(fake.now)
    assert len(set(folded_ids(ledger))) == len(folded_ids(ledger)) == 3
    assert job_field(ledger, "j", "state") == "done"


def test_a_slow_idle_card_does_not_race_a_fast_cards_run(ledger, make) -> None:
    slow, fast = FakeCard("slow", 24.0, 10.0), FakeCard("fast", 24.0, 1000.0)
    scheduler, fake = make([fast, slow], target_task_seconds=0.1)
    tasks = make_job(ledger, "j", 3, tokens=100)
    scheduler.tick(fake.now)
    fake.advance(10.0)  # both cards finish their unit; both speeds are known
    scheduler.tick(fake.now)  # the fast card takes the last task, the slow one stays idle
    assert on(fake, fast) == [[tasks[0]], [tasks[2]]] and on(fake, slow) == [[tasks[1]]]
    # 100 tokens: 0.1 s on the fast card, 10 s on the slow one. No twin.
    assert not ledger.tasks.get(tasks[2]).twin and fake.in_flight() == 1


def test_a_job_does_not_end_while_a_twin_of_its_task_still_runs(ledger, make) -> None:
    slow, fast = FakeCard("slow", 24.0, 10.0), FakeCard("fast", 24.0, 1000.0)
    scheduler, fake = make([fast, slow], target_task_seconds=0.1, max_attempts=1)
    tasks = make_job(ledger, "j", 2, tokens=100)
    scheduler.tick(fake.now)
    fake.advance(0.1)
    scheduler.tick(fake.now)  # the fast card is idle: tasks[1] is raced
    twin = twin_id(tasks[1])
    assert twin in fake.placement()
    fake.fail(tasks[1])  # the original fails on its last attempt; the twin still runs
    scheduler.tick(fake.now)
    fold(ledger)  # the job's first adapter
    scheduler.tick(fake.now)
    assert job_field(ledger, "j", "state") == "running", "the job ended while its twin still ran"
    fake.advance(0.1)
    assert scheduler.tick(fake.now) == {"j"}
    fold(ledger)
    scheduler.tick(fake.now)
    assert job_field(ledger, "j", "state") == "done" and job_field(ledger, "j", "adapters_folded") == 2


# -- leases --------------------------------------------------------------------------------------


def test_an_expired_lease_is_reissued_with_a_new_fence_and_the_old_one_refused(ledger, make) -> None:
    scheduler, fake = make([BIG])
    (task,) = make_job(ledger, "j", 1)
    scheduler.tick(fake.now)
    old = fence(ledger, task)
    fake.hang(task)
    fake.advance(scheduler.settings.queue_timeout_s + 1)
    scheduler.tick(fake.now)
    assert [r.task_ids for r in fake.cancelled] == [[task]]
    assert len(fake.submitted) == 2 and unit_of(fake.submitted[1].specs[0])[1] == fence(ledger, task) > old
    sha = hashlib.sha256(b"late").hexdigest()
    late = ledger.adapters.accept(task, old, sha, tokens=100, worker_id=SMALL.worker_id)
    assert not late.ok and "stale fence" in late.detail
    fake.complete(task)
    scheduler.tick(fake.now)
    assert state(ledger, task) == "done" and buffered_tasks(ledger) == [task]


def test_the_other_units_of_a_run_cancelled_for_an_expired_lease_go_back_in_the_queue(ledger, make) -> None:
    scheduler, fake = make([BIG], target_task_seconds=0.3)
    tasks = make_job(ledger, "j", 4)
    scheduler.tick(fake.now)
    fake.advance(0.1)
    scheduler.tick(fake.now)
    run = fake.submitted[-1].task_ids
    assert run == tasks[1:4]
    # The run starts its first unit and heartbeats it once, then hangs; the units behind it keep
    # the deadline they were dispatched with (queue_timeout_s from now).
    heartbeat(ledger, run[0], fake.now + scheduler.settings.lease_ttl_s)
    fake.hang(run[0])
    fake.advance(scheduler.settings.lease_ttl_s + 1)
    scheduler.tick(fake.now)
    assert state(ledger, run[0]) == "leased" and run[0] in fake.placement()  # re-issued
    held = fake.placement()
    stranded = [t for t in run[1:] if state(ledger, t) == "leased" and t not in held]
    assert stranded == [], f"{stranded} are leased to a run that was cancelled"


def test_the_other_units_of_a_cancelled_run_do_not_spend_an_attempt(ledger, make) -> None:
    scheduler, fake = make([BIG], target_task_seconds=0.3, max_attempts=1)
    tasks = make_job(ledger, "j", 4)
    scheduler.tick(fake.now)
    fake.advance(0.1)
    scheduler.tick(fake.now)
    run = fake.submitted[-1].task_ids
    heartbeat(ledger, run[0], fake.now + scheduler.settings.lease_ttl_s)
    fake.hang(run[0])
    fake.advance(scheduler.settings.lease_ttl_s + 1)
    scheduler.tick(fake.now)
    # The hung unit's lease was abandoned: it spent no attempt (its volunteer pays in trust, not
    # the task), and it runs again with the two behind it, which never trained.
    assert sorted(on(fake, BIG)[-1]) == sorted(run) and all(state(ledger, t) == "leased" for t in run)
    assert ledger.trust.get(ledger.trust.of_workers([BIG.worker_id])[BIG.worker_id]).reasons() == {"abandoned": 1}
    fake.advance(1.0)
    scheduler.tick(fake.now)
    assert [state(ledger, t) for t in tasks] == ["done", "done", "done", "done"]


def test_a_twin_whose_lease_expired_is_retired_never_rerun(ledger, straggling) -> None:
    scheduler, fake, tasks, fast, slow = straggling
    twin = twin_id(tasks[1])
    fake.hang(tasks[1])
    fake.hang(twin)
    fake.advance(scheduler.settings.queue_timeout_s + 1)
    scheduler.tick(fake.now)
    assert state(ledger, twin) == "failed" and twin not in ledger.leases.pending()
    assert all(twin not in r.task_ids for r in fake.running)
    assert state(ledger, tasks[1]) == "leased"  # the original, re-issued


# -- failures ------------------------------------------------------------------------------------


def test_a_failing_task_is_retried_until_its_attempts_run_out(ledger, make) -> None:
    scheduler, fake = make([BIG], max_attempts=3)
    (task,) = make_job(ledger, "j", 1)
    fences = []
    for _ in range(3):
        scheduler.tick(fake.now)
        fences.append(fence(ledger, task))
        fake.fail(task, "RuntimeError: the loss is nan")
    scheduler.tick(fake.now)
    assert len(fake.submitted) == 3 and fences == sorted(set(fences))
    assert state(ledger, task) == "failed" and "the loss is nan" in ledger.tasks.get(task).error
    assert job_field(ledger, "j", "state") == "failed"
    assert "every task failed" in job_field(ledger, "j", "error")


def test_one_failed_unit_of_a_run_is_its_own(ledger, make) -> None:
    scheduler, fake = make([BIG], target_task_seconds=0.3)
    tasks = make_job(ledger, "j", 4)
    scheduler.tick(fake.now)
    fake.advance(0.1)
    scheduler.tick(fake.now)
    assert fake.submitted[-1].task_ids == tasks[1:4]
    fake.fail(tasks[2])
    scheduler.tick(fake.now)
    assert [state(ledger, t) for t in tasks] == ["done", "done", "leased", "done"]


# -- job ends ------------------------------------------------------------------------------------


def test_a_job_is_done_once_its_last_adapters_are_folded(ledger, make) -> None:
    scheduler, fake = make([BIG])
    tasks = make_job(ledger, "j", 2)
    scheduler.tick(fake.now)
    fake.advance(1.0)
    assert scheduler.tick(fake.now) == set()  # one task still to train
    fake.advance(1.0)
    assert scheduler.tick(fake.now) == {"j"}  # ready for a last fold, not done before it
    assert job_field(ledger, "j", "state") == "running"
    assert all(state(ledger, t) == "done" for t in tasks)
    fold(ledger)
    assert scheduler.tick(fake.now) == set()
    assert job_field(ledger, "j", "state") == "done" and job_field(ledger, "j", "finished")


def test_a_job_whose_adapters_were_all_rejected_fails_with_a_sentence(ledger, make) -> None:
    scheduler, fake = make([BIG])
    make_job(ledger, "j", 1)
    scheduler.tick(fake.now)
    fake.advance(1.0)
    assert scheduler.tick(fake.now) == {"j"}
    (adapter,) = ledger.adapters.buffered()
    ledger.adapters.reject(adapter.adapter_id, "its held-out loss is worse than the current model's")
    scheduler.tick(fake.now)
    assert job_field(ledger, "j", "state") == "failed"
    assert job_field(ledger, "j", "error") == "no adapter of this job passed the checks to be folded"


def test_a_job_that_fits_no_card_says_so_until_a_bigger_card_joins(ledger, make) -> None:
    scheduler, fake = make([SMALL, BIG])
    tasks = make_job(ledger, "huge", 2, seq_len=8192)  # 30 GB
    scheduler.tick(fake.now)
    assert fake.submitted == [] and all(state(ledger, t) == "pending" for t in tasks)
    warning = job_field(ledger, "huge", "warning")
    assert "at least 30.0 GB" in warning and "the largest of the 2 cards in the cluster has 24 GB" in warning
    big = FakeCard("a100", 80.0, 2000.0, "A100")
    fake.add_card(big)
    scheduler.tick(fake.now)
    assert job_field(ledger, "huge", "warning") == ""
    assert on(fake, big) == [[tasks[0]]]

