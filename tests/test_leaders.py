"""Leader leases with fences (coordinator.ledger.leaders), against a real redis-server: one
scheduler and one folder at a time, a standby taking over once the lease lapses, and every write
of a leader whose lease was lost (a process paused past its lease) refused in the same step.

A pause is made for real: a short lease is left to lapse (the leader does not renew it, as a
stopped process would not), another campaigner takes it, and the old leader then writes with the
fence it still holds.
"""

from __future__ import annotations

import time

import pytest
import torch

from coordinator.ledger import FoldedAdapter, Ledger, TaskState, VersionRecord, keys
from coordinator.ledger.leaders import Leadership, NotLeader, leader_of
from coordinator.schedule.inbox_dispatch import OutboundDispatcher
from coordinator.schedule.scheduler import Scheduler
from coordinator.schedule.transport import Need
from coordinator.settings import Settings
from nomoat.spec import LoraConfig, TaskSpec, TrainConfig
from tests import consistency
from tests.fakes import FakeCard, FakeDispatcher
from tests.test_history import Rig
from tests.test_ledger import make_job

TTL = 0.3  # seconds: short, so that a lease can be left to lapse within a test
LONG = 60.0  # the lease of the leader that takes over: it must not lapse while the test folds


def pair(ledger: Ledger, role: str) -> tuple[Leadership, Leadership]:
    """The leader to be paused (a short lease) and its standby (a long one)."""
    return Leadership(ledger.r, role, TTL, holder="old"), Leadership(ledger.r, role, LONG, holder="new")


def lapse(leadership: Leadership) -> None:
    """Leave ``leadership``'s lease to run out, as a leader paused past its lease would."""
    time.sleep(leadership.ttl_s + 0.1)


def test_one_campaigner_leads_and_a_standby_takes_over_under_a_higher_fence(ledger: Ledger) -> None:
    a, b = (Leadership(ledger.r, "scheduler", TTL, holder=h) for h in ("a", "b"))
    first = a.campaign()
    assert first is not None and b.campaign() is None
    assert a.campaign() == first  # renewed, same term
    assert leader_of(ledger.r, "scheduler") == (first.number, "a")
    lapse(a)
    second = b.campaign()
    assert second is not None and second.number > first.number
    assert a.campaign() is None and a.fence() is None  # a's renewal finds the lease is not its own
    b.resign()
    assert leader_of(ledger.r, "scheduler") is None
    # Each role has its own lease: the folder's is independent of the scheduler's.
    assert Leadership(ledger.r, "folder", TTL, holder="a").campaign() is not None


def test_a_leader_believes_its_own_clock_before_the_lease(ledger: Ledger) -> None:
    a = Leadership(ledger.r, "folder", TTL, holder="a")
    assert a.campaign() is not None and a.fence() is not None
    lapse(a)
    assert a.fence() is None  # past its TTL by its own clock: it stops writing before being told


def test_every_fenced_write_of_a_leader_whose_lease_was_taken_is_refused(ledger: Ledger) -> None:
    ids = make_job(ledger, n_tasks=3)
    old, new = (Leadership(ledger.r, "scheduler", TTL, holder=h) for h in ("old", "new"))
    stale = old.campaign()
    assert ledger.leases.lease(ids[0], time.time() + 60, 0, 3, leader=stale) > 0
    lapse(old)
    current = new.campaign()
    with pytest.raises(NotLeader):
        ledger.leases.lease(ids[1], time.time() + 60, 0, 3, leader=stale)
    with pytest.raises(NotLeader):
        ledger.leases.speculate(ids[0], time.time() + 60, leader=stale)
    with pytest.raises(NotLeader):
        ledger.inbox.place("r-stale", "w-1", [(ids[0], 1)], ["{}"], leader=stale)
    assert ledger.tasks.get(ids[1]).state is TaskState.PENDING and not ledger.r.exists(keys.inbox("w-1"))
    assert ledger.leases.lease(ids[1], time.time() + 60, 0, 3, leader=current) > 0
    # A lapsed lease that nobody has taken yet is no lease either.
    lapse(new)
    with pytest.raises(NotLeader):
        ledger.leases.lease(ids[2], time.time() + 60, 0, 3, leader=current)
    consistency.check(ledger)


def test_a_folder_whose_lease_was_taken_cannot_publish_or_reject(ledger: Ledger) -> None:
    (task,) = make_job(ledger, n_tasks=1)
    fence = ledger.leases.lease(task, time.time() + 60, 0, 3)
    adapter = ledger.adapters.accept(task, fence, "a" * 64, tokens=10).detail
    ledger.versions.publish(VersionRecord(version=0, parent=-1))
    old, new = pair(ledger, "folder")
    stale = old.campaign()
    lapse(old)
    current = new.campaign()
    with pytest.raises(NotLeader):
        ledger.versions.publish(VersionRecord(version=1, parent=0), folded=[(adapter, 1.0)], leader=stale)
    with pytest.raises(NotLeader):
        ledger.adapters.reject(adapter, "a stale folder's verdict", leader=stale)
    assert ledger.versions.latest() == 0 and ledger.adapters.buffer_ids() == [adapter]
    ledger.versions.publish(VersionRecord(version=1, parent=0, adapters=(FoldedAdapter(adapter, 1.0, 0),)),
                            folded=[(adapter, 1.0)], leader=current)
    assert ledger.adapters.reject(adapter, "too late: it is folded") is False  # a folded adapter stays folded
    consistency.check(ledger)


def test_two_schedulers_contend_and_only_the_leader_writes(ledger: Ledger) -> None:
    ids = make_job(ledger, n_tasks=6)
    settings = Settings(data_dir="/nonexistent", speculate=False, target_task_seconds=0.5)
    cards = [FakeCard("a", 24.0, 100.0), FakeCard("b", 24.0, 100.0)]
    fakes = [FakeDispatcher(cards[:1]), FakeDispatcher(cards[1:])]
    schedulers = [Scheduler(settings, ledger, f, "token", task_need=lambda config: Need(1.0)) for f in fakes]
    elections = list(pair(ledger, "scheduler"))
    for _ in range(2):  # each round: both campaign, and each ticks only as the leader
        for scheduler, election, fake in zip(schedulers, elections, fakes):
            fence = election.campaign()
            if fence is not None:
                scheduler.tick(fake.now, leader=fence)
    assert fakes[0].in_flight() == 1 and fakes[1].in_flight() == 0
    # The leader is paused past its lease; the standby takes over and schedules; the old leader
    # wakes up and ticks with the fence it still holds: refused at its first lease.
    stale = elections[0].fence()
    lapse(elections[0])
    schedulers[1].tick(fakes[1].now, leader=elections[1].campaign())
    assert fakes[1].in_flight() == 1
    before = {t: (ledger.tasks.get(t).state, ledger.tasks.get(t).fence) for t in ids}
    for task_id in list(fakes[0].placement()):  # its card is free again, so its next round leases
        fakes[0].complete(task_id)
    fakes[0].advance(1.0)
    with pytest.raises(NotLeader):
        schedulers[0].tick(fakes[0].now, leader=stale)
    after = {t: (ledger.tasks.get(t).state, ledger.tasks.get(t).fence) for t in ids}
    assert [t for t in ids if after[t] != before[t] and after[t][0] is TaskState.LEASED] == []
    assert fakes[0].in_flight() == 0
    consistency.check(ledger)


def test_a_paused_schedulers_runs_are_not_placed(ledger: Ledger) -> None:
    (task,) = make_job(ledger, n_tasks=1)
    old, new = pair(ledger, "scheduler")
    stale = old.campaign()
    fence = ledger.leases.lease(task, time.time() + 60, 0, 3, leader=stale)
    dispatcher = OutboundDispatcher(ledger)
    dispatcher.term.fence = stale
    lapse(old)
    new.campaign()
    spec = TaskSpec(task_id=task, job_id="j-test", fence=fence, base_version=0, tokens=10, coordinator="x:1",
                    lease_ttl_s=60, token="", lora=LoraConfig(2, 4.0, ("q_proj",)),
                    train=TrainConfig(seq_len=64, batch_size=2, learning_rate=1e-3, epochs=1, seed=0))
    with pytest.raises(NotLeader):
        dispatcher.submit([spec], {}, "outbound:w-1")
    assert ledger.r.llen(keys.inbox("w-1")) == 0


# -- folders -----------------------------------------------------------------------------------


@pytest.fixture
def two_folders(ledger, tmp_path):
    """Two folders on one ledger and store, as two processes would be (each its own model)."""
    from coordinator.fold.folder import Folder
    from coordinator.model.history import History

    rig = Rig(ledger, tmp_path)
    history = History(ledger, rig.store, tmp_path / "second")
    other = Folder(rig.settings, ledger, rig.store, history.rebuild(0), history)
    return rig, other


def test_a_folder_that_takes_over_catches_up_by_patch_before_it_folds(two_folders) -> None:
    rig, other = two_folders
    # The first leader's lease outlasts one fold (a few seconds on two cores), then lapses.
    first = Leadership(rig.ledger.r, "folder", 5.0, holder="first")
    second = Leadership(rig.ledger.r, "folder", LONG, holder="second")
    rig.offer(rig.adapter())
    rig.offer(rig.adapter())
    assert rig.folder.maybe_fold(set(), leader=first.campaign()) == 1
    assert other.maybe_fold(set(), leader=second.campaign()) is None  # not its turn: (it would be refused)
    lapse(first)
    rig.offer(rig.adapter(), base_version=1)
    rig.offer(rig.adapter(), base_version=1)
    assert other.maybe_fold(set(), leader=second.campaign()) == 2
    assert other.version == 2
    rebuilt = rig.history.rebuild(2).master(list(rig.targets))
    mine = other.model.master(list(rig.targets))
    for m, w in rebuilt.items():  # exactly the ledger's version 2, not version 1's fold on version 0's weights
        assert torch.equal(mine[m], w), m
    consistency.check(rig.ledger)


def test_a_paused_folder_is_refused_at_publish_and_resynced_to_the_ledger(two_folders) -> None:
    rig, other = two_folders
    old, new = pair(rig.ledger, "folder")
    stale = old.campaign()
    lapse(old)
    current = new.campaign()
    rig.offer(rig.adapter())
    rig.offer(rig.adapter())
    with pytest.raises(NotLeader):
        rig.folder.maybe_fold(set(), leader=stale)
    assert rig.ledger.versions.latest() == 0 and len(rig.ledger.adapters.buffer_ids()) == 2
    assert other.maybe_fold(set(), leader=current) == 1
    # The paused one, told so, is back in step at its next round, on the ledger's version 1.
    assert rig.folder.maybe_fold(set(), leader=None) is None
    assert rig.folder.version == 1
    rebuilt = rig.history.rebuild(1).master(list(rig.targets))
    assert all(torch.equal(rig.folder.model.master([m])[m], w) for m, w in rebuilt.items())
    consistency.check(rig.ledger)


def test_the_consistency_check_sees_a_version_published_out_of_fence_order(ledger: Ledger) -> None:
    a, b = (Leadership(ledger.r, "folder", LONG, holder=h) for h in ("a", "b"))
    ledger.versions.publish(VersionRecord(version=0, parent=-1))
    first = a.campaign()
    ledger.versions.publish(VersionRecord(version=1, parent=0), leader=first)
    a.resign()
    second = b.campaign()
    ledger.versions.publish(VersionRecord(version=2, parent=1), leader=second)
    assert consistency.problems(ledger)[0] == []
    # What a paused leader's write would leave if nothing checked its fence: version 3 under fence 1.
    ledger.versions.publish(VersionRecord(version=3, parent=2))
    ledger.r.hset(keys.version(3), "leader_fence", first.number)
    assert any("after a version under fence" in p for p in consistency.problems(ledger)[0])
