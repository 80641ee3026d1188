"""A run on a worker (``worker.task.run_units``, what Ray calls on the node) against the
coordinator's real gRPC server (tests/rig.py): from the spec the scheduler builds for a card, to
the result the scheduler reads back. No Ray here; the Ray path is the slow tier's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.ledger import TaskState
from coordinator.schedule.scheduler import Scheduler
from coordinator.schedule.transport import Finished, Need, Node
from nomoat.card import from_message, to_message
from tests import rig as rigs
from tests.rig import Rig, Tls, published, rig  # noqa: F401  (fixtures)
from worker.probe import parse_simulated
from worker.settings import NodeSettings
from worker.task import run_units

CARD = parse_simulated("GTX 1650:6:4")


def scheduler(r: Rig) -> Scheduler:
    settings = replace(r.deps.settings, listen=r.address)  # where the tasks reach the coordinator
    return Scheduler(settings, r.ledger, dispatcher=None, worker_token=r.tokens["worker"],
                     task_need=lambda config: Need(1.0))


def leased_specs(r: Rig, n: int) -> tuple[Scheduler, Node, list]:
    """A registered worker with CARD, and ``n`` units of a fresh job leased and specified for it."""
    worker_id = r.client("worker").register("volunteer", to_message(CARD)).worker_id
    node = Node("ray-node-1", CARD.vram_gb, busy=False, worker_id=worker_id)
    job_id = r.submit().job_id
    tasks = r.ledger.tasks.of_job(job_id)[:n]
    assert len(tasks) == n
    s = scheduler(r)
    return s, node, [s.spec(t, r.lease(t.task_id, worker_id=worker_id), 0, node, secret=rigs.SECRET) for t in tasks]


def test_the_spec_names_the_worker_and_the_card_it_registered(rig: Rig) -> None:
    _, node, (spec,) = leased_specs(rig, 1)
    assert spec.worker_id == node.worker_id
    assert spec.card == from_message(to_message(CARD)) and spec.card.simulated and spec.card.vram_gb == 6.0
    assert spec.coordinator == rig.address and spec.lora.rank == rigs.RANK


def test_out_of_memory_on_every_plan_comes_back_as_the_vram_it_needs(rig: Rig, tmp_path: Path) -> None:
    s, node, specs = leased_specs(rig, 2)
    # The test hook of the node: even micro-batch 1 runs out of memory.
    units = run_units(specs, NodeSettings(cache_dir=tmp_path / "cache", inject_oom_above=0))
    first, second = units
    assert first.needs_vram_gb == second.needs_vram_gb == 6.01
    assert "it needs a card with more than 6 GB" in first.error
    events = [e for _, e in rig.ledger.tasks.get(specs[0].task_id).events]
    assert any("retrying at micro-batch 1" in e for e in events) and "moving to a bigger card" in events[-1]
    assert rig.ledger.tasks.get(specs[1].task_id).events == ()  # the run ended: it was not tried on this card

    for unit in units:
        s._finished(Finished.of(unit, node.worker_id, node.node_id))
    for spec in specs:
        task = rig.ledger.tasks.get(spec.task_id)
        assert task.state is TaskState.PENDING and task.min_vram_gb == 6.01


@pytest.fixture
def tls_rig(redis_client, published, tmp_path):  # noqa: F811
    r = rigs.start(redis_client, published, tmp_path, tls=Tls.make(tmp_path / "tls"))
    yield r
    r.close()


def test_a_task_reaches_a_coordinator_that_uses_tls_with_the_nodes_ca(tls_rig: Rig, tmp_path: Path) -> None:
    """Bug 3: the task took its CA from a spec field nothing wrote; the node's own CA is used."""
    _, _, (spec,) = leased_specs(tls_rig, 1)
    without = run_units([spec], NodeSettings(cache_dir=tmp_path / "cache"))
    assert "if it uses TLS, did you pass --tls-ca" in without[0].error

    (unit,) = run_units([spec], NodeSettings(cache_dir=tmp_path / "cache", tls_ca=str(tls_rig.tls.ca)))
    assert unit.error == "" and unit.adapter_id and unit.tokens > 0
    assert tls_rig.ledger.tasks.get(spec.task_id).state is TaskState.DONE


def test_a_warm_start_job_continues_from_the_workers_carry_and_uploads_the_exact_difference(
        rig: Rig, tmp_path: Path) -> None:
    worker_id = rig.client("worker").register("volunteer", to_message(CARD)).worker_id
    node = Node("ray-node-1", CARD.vram_gb, busy=False, worker_id=worker_id)
    config = rigs.pb.JobConfig()
    config.CopyFrom(rigs.JOB)
    config.warm_start = True
    job_id = rig.submit(config=config).job_id
    tasks = rig.ledger.tasks.of_job(job_id)[:2]
    s = scheduler(rig)
    specs = [s.spec(t, rig.lease(t.task_id, worker_id=worker_id), 0, node, secret=rigs.SECRET) for t in tasks]
    assert all(spec.train.warm_start for spec in specs)

    cache = tmp_path / "cache"
    units = run_units(specs, NodeSettings(cache_dir=cache))
    assert [u.error for u in units] == ["", ""]
    first, second = (rig.ledger.adapters.get(u.adapter_id) for u in units)
    # The first had no carry (a fresh LoRA); the second started from it: rank 2r, alpha 2α.
    assert (first.rank, first.alpha) == (rigs.RANK, rigs.ALPHA)
    assert (second.rank, second.alpha) == (2 * rigs.RANK, 2 * rigs.ALPHA)
    assert sorted(p.suffix for p in (cache / "carry").iterdir()) == [".adapter", ".moments"]
    # Both reported their gradient norms; the job's noise scale counts them.
    assert first.gradients.batch_size > first.gradients.micro_batch > 0
    assert rig.ledger.jobs.get(job_id).noise.samples == 2
