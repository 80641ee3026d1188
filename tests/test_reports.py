"""What a volunteer reports steers nothing unchecked: the scheduler plans with the coordinator's
own figures.

Hostile volunteers with worker tokens of their own, over real gRPC on loopback (the rig's server,
a real Redis), take runs from the real outbound dispatcher and report what they like: a memory
need far beyond any card, a speed no card has, or nothing at all (a lease taken and abandoned).
The scheduler is the real one, its rounds run by hand at chosen times (its clock).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace

import pytest

from coordinator.ledger import TaskState
from coordinator.schedule import standing
from coordinator.schedule.inbox_dispatch import OutboundDispatcher
from coordinator.schedule.scheduler import Scheduler
from coordinator.schedule.transport import Need
from nomoat.card import to_message
from nomoat.client import CoordinatorClient
from nomoat.spec import TaskSpec, UnitResult
from tests.rig import TEXTS, Rig, make_adapter, manifest, published, rig  # noqa: F401  (fixtures)
from worker.outbound import parse_specs
from worker.probe import parse_simulated

CARD = parse_simulated("RTX 3060:12:13")


@dataclass
class Volunteer:
    name: str
    client: CoordinatorClient
    worker_id: str

    def ask(self) -> tuple[str, list[TaskSpec]]:
        """Ask for work once, without waiting: (run id, its units), ("", []) when there is none."""
        reply = self.client.request_work(self.worker_id, 0)
        return reply.run_id, parse_specs(list(reply.task_specs))

    def upload(self, rig: Rig, spec: TaskSpec) -> str:
        """Hand in a well-formed adapter for ``spec``'s unit, as its lease's holder; its id."""
        data = make_adapter(rig.deps.shapes, seed=spec.train.seed)
        reply = self.client.upload(manifest(spec.task_id, spec.fence, data, base_version=spec.base_version,
                                            worker_id=self.worker_id, lease_secret=spec.lease_secret), data)
        assert reply.accepted, reply.reason
        return reply.adapter_id

    def report(self, run_id: str, specs: list[TaskSpec], units: list[UnitResult]) -> None:
        self.client.report_run(self.worker_id, run_id, [json.dumps(u.to_dict()) for u in units], [],
                               {s.task_id: s.lease_secret for s in specs})


def join(rig: Rig, name: str) -> Volunteer:
    client = rig.client(token=rig.registry.create("worker", name))
    return Volunteer(name, client, client.register(name, to_message(CARD)).worker_id)


def scheduler(rig: Rig, **changes) -> Scheduler:
    settings = replace(rig.deps.settings, listen=rig.address, speculate=False, **changes)
    return Scheduler(settings, rig.ledger, OutboundDispatcher(rig.ledger), rig.tokens["worker"],
                     task_need=lambda config: Need(1.0))


def one_task_job(rig: Rig) -> str:
    """A job of a single task; its id."""
    (task_id,) = rig.ledger.tasks.ids(rig.submit(texts=TEXTS[:3]).job_id)
    return task_id


def test_a_forged_huge_memory_need_strands_the_task_on_no_other_card(rig: Rig) -> None:
    mallory, alice = join(rig, "mallory"), join(rig, "alice")
    task_id = one_task_job(rig)
    s = scheduler(rig)
    mallory.ask()  # its card is seen
    s.tick()
    run_id, specs = mallory.ask()
    assert [x.task_id for x in specs] == [task_id]
    mallory.report(run_id, specs, [UnitResult(task_id, specs[0].fence, "out of memory", needs_vram_gb=1000.0)])
    alice.ask()
    mallory.ask()
    s.tick()
    # What mallory said is a floor on mallory's card alone, and no more than just above it.
    task = rig.ledger.tasks.get(task_id)
    assert task.vram_floors == {mallory.worker_id: 12.01}
    # The task went to the other card at once (the job does not wait for a bigger card).
    assert task.state is TaskState.LEASED and task.holder_worker == alice.worker_id
    assert rig.ledger.jobs.get(task.job).warning == ""
    assert mallory.ask() == ("", [])
    run_id, specs = alice.ask()
    assert [x.task_id for x in specs] == [task_id]


def test_a_fake_speed_does_not_change_how_runs_are_sized(rig: Rig) -> None:
    mallory = join(rig, "mallory")
    rig.submit()  # several tasks
    s = scheduler(rig, max_units_per_run=8, target_task_seconds=60.0)
    mallory.ask()
    t0 = time.time()
    s.tick(t0)
    run_id, specs = mallory.ask()
    assert len(specs) == 1  # a stranger: one unit
    (spec,) = specs
    adapter_id = mallory.upload(rig, spec)
    # It claims a billion tokens in a millisecond; the coordinator saw its shard's tokens in 100 s.
    mallory.report(run_id, specs, [UnitResult(spec.task_id, spec.fence, adapter_id=adapter_id, tokens=10**9,
                                              seconds=1e-3, train_loss=2.5)])
    mallory.ask()
    s.tick(t0 + 100.0)
    record = rig.ledger.workers.get(mallory.worker_id)
    assert record.tokens_trained == spec.tokens and record.tokens_per_s == pytest.approx(spec.tokens / 100.0)
    # So its next run is sized for what the coordinator measured: 60 s at tokens/100 tokens per s
    # is under one unit, so one (the forged speed would have earned the most, 8).
    run_id, specs = mallory.ask()
    assert len(specs) == 1


def test_take_and_abandon_three_times_costs_the_volunteer_not_the_job(rig: Rig) -> None:
    mallory, alice = join(rig, "mallory"), join(rig, "alice")
    task_id = one_task_job(rig)
    s = scheduler(rig, max_attempts=3)
    t = time.time()
    mallory.ask()
    s.tick(t)
    for _ in range(3):  # it takes the run and goes quiet: no heartbeat, no report, no hand-back
        run_id, specs = mallory.ask()
        assert [x.task_id for x in specs] == [task_id]
        t += s.settings.queue_timeout_s + 1
        s.tick(t)  # the lease expired; mallory still polls, so it is given the task again
    task = rig.ledger.tasks.get(task_id)
    assert (task.state, task.attempts, task.holder_worker) == (TaskState.LEASED, 1, mallory.worker_id)
    assert rig.ledger.jobs.get(task.job).state.value == "running"
    record = rig.ledger.trust.get(rig.ledger.trust.of_workers([mallory.worker_id])[mallory.worker_id])
    assert record.reasons() == {standing.ABANDONED: 3}
    assert standing.standing(record).level is standing.Level.THROTTLED  # on probation now
    # It hands the fourth back as it should (no cost), and an honest volunteer (trusted, so
    # served first) finishes the task.
    run_id, specs = mallory.ask()
    mallory.client.report_run(mallory.worker_id, run_id, [], [task_id], {task_id: specs[0].lease_secret})
    alice.ask()
    s.tick(t)
    run_id, specs = alice.ask()
    assert [x.task_id for x in specs] == [task_id]
    alice.report(run_id, specs, [UnitResult(task_id, specs[0].fence, adapter_id=alice.upload(rig, specs[0]))])
    s.tick(t + 1)
    assert rig.ledger.tasks.get(task_id).state is TaskState.DONE
    assert rig.ledger.trust.get(rig.ledger.trust.of_workers([mallory.worker_id])[mallory.worker_id]).reasons() == \
        {standing.ABANDONED: 3}
