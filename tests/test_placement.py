"""Placement on a real Ray cluster of three simulated cards (6, 12 and 24 GB, differing in speed).

One coordinator (in this process) and three worker processes serve the whole module. The cards
train the tiny model on the CPU but plan memory as if it were Llama 3.2 1B (``plan_model``), so
a job's sequence length decides which cards can hold it:

    seq_len 64: ~3.9 GB, any card;  1024: ~6.5 GB, not the 6 GB card;  8192: ~26 GB, no card.

Test hooks set on the worker nodes (worker.task): ``NOMOAT_SIMULATED_TOKENS_PER_TFLOP`` makes a
card take tokens / (TFLOPS x 20) seconds per task, so the 1-TFLOPS "6 GB" card is the straggler;
``NOMOAT_INJECT_OOM_ABOVE_MICRO_BATCH=2`` on the 12 GB card makes micro-batches above 2 run out
of memory there.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from coordinator.ledger import AdapterRecord, is_twin
from coordinator.server import Coordinator
from coordinator.settings import JobDefaults, Settings
from nomoat.client import CoordinatorClient
from nomoat.demo import DEMO_DATA
from nomoat.v1 import nomoat_pb2 as pb
from tests.procs import Proc, run

pytestmark = pytest.mark.slow

RATE = 20  # simulated tokens per second per TFLOPS
CARDS = {  # name -> (spec, extra env)
    "small": ("GTX 1650:6:1", {}),
    "mid": ("RTX 3060:12:10", {"NOMOAT_INJECT_OOM_ABOVE_MICRO_BATCH": "2"}),
    "big": ("RTX 4090:24:20", {}),
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("placement")
    settings = Settings(
        data_dir=tmp / "coordinator", listen="127.0.0.1:0",
        job=JobDefaults(plan_model="llama-3.2-1b", seq_len=64, batch_size=8, tokens_per_task=512),
        fold_every=2, fold_timeout_s=5.0, tick_s=0.2, lease_ttl_s=30.0,
        target_task_seconds=4.0,  # the 24 GB card (~400 tokens/s) gets about three 512-token units a run
    )
    coordinator = Coordinator(settings)
    coordinator.start()
    workers = []
    try:
        token = (settings.data_dir / "trusted-worker.token").read_text().strip()
        for name, (card, env) in CARDS.items():
            workers.append(Proc(["worker", "start", "--ray", "--coordinator", coordinator.address, "--simulate-gpu", card,
                                 "--threads", "1", "--name", name, "--cache-dir", str(tmp / f"cache-{name}")],
                                tmp / f"{name}.log",
                                env={"NOMOAT_TOKEN": token, "NOMOAT_SIMULATED_TOKENS_PER_TFLOP": str(RATE), **env}))
            workers[-1].wait_for("joined", timeout=180)
        end = time.monotonic() + 60
        while len(coordinator.dispatcher.nodes()) < len(CARDS) and time.monotonic() < end:
            time.sleep(0.5)
        admin = (settings.data_dir / "admin.token").read_text().strip()
        with CoordinatorClient(coordinator.address, admin) as client:
            yield coordinator, client, tmp, admin
    finally:
        for w in workers:
            w.interrupt()
        coordinator.stop()


def dataset(tmp: Path, name: str, n: int, seed: int) -> Path:
    lines = DEMO_DATA.read_text(encoding="utf-8").splitlines()
    random.Random(seed).shuffle(lines)
    path = tmp / f"{name}.jsonl"
    path.write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
    return path


def wait_done(client: CoordinatorClient, job_id: str, timeout: float) -> pb.JobInfo:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        (job,) = client.status(job_id).jobs
        if job.state != "running":
            assert job.state == "done", job
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job}")


def card_of(coordinator: Coordinator, worker_id: str) -> pb.Card:
    card = pb.Card()
    card.ParseFromString(coordinator.ledger.workers.get(worker_id).card)
    return card


def adapters_of(coordinator: Coordinator, job_id: str) -> list[AdapterRecord]:
    found = [coordinator.ledger.adapters.get(a) for a in coordinator.ledger.adapters.ids()]
    return [a for a in found if a and a.job == job_id]


def test_a_task_too_big_for_the_small_card_goes_to_a_big_one(cluster) -> None:
    coordinator, client, tmp, _ = cluster
    reply = client.submit(dataset(tmp, "long", 40, 1), name="long",
                          config=pb.JobConfig(seq_len=1024, tokens_per_task=2048))
    wait_done(client, reply.job_id, timeout=120)
    adapters = [a for a in adapters_of(coordinator, reply.job_id) if a.state in ("buffered", "folded")]
    assert len(adapters) == reply.tasks
    assert {card_of(coordinator, a.worker).vram_gb for a in adapters} <= {12.0, 24.0}


def test_an_out_of_memory_run_retries_with_a_smaller_micro_batch(cluster) -> None:
    coordinator, client, tmp, _ = cluster
    reply = client.submit(dataset(tmp, "oom", 60, 2), name="oom")
    wait_done(client, reply.job_id, timeout=150)
    tasks = coordinator.ledger.tasks.of_job(reply.job_id)
    assert all(t.state == "done" for t in tasks)
    retried = [t for t in tasks if t.events]
    assert retried, "no task ran on the 12 GB card"
    for task in retried:
        # Halved from the task's own batch (the job's, divided to keep the global batch) down to
        # 2, the most the 12 GB card's hook lets through; the same effective batch throughout.
        events = [e for _, e in task.events]
        assert task.batch_size > 2, task
        micro = task.batch_size
        while micro > 2:
            assert any(f"out of memory at micro-batch {micro}" in e and f"retrying at micro-batch {micro // 2}" in e
                       for e in events), (micro, events)
            micro //= 2
        assert coordinator.ledger.adapters.get(task.adapter).state in ("buffered", "folded", "rejected")


def test_speculation_shortens_the_tail_and_never_folds_a_task_twice(cluster) -> None:
    coordinator, client, tmp, _ = cluster
    reply = client.submit(dataset(tmp, "tail", 60, 3), name="tail")
    job = wait_done(client, reply.job_id, timeout=150)
    tasks = coordinator.ledger.tasks.of_job(reply.job_id)
    twins = [coordinator.ledger.tasks.get(t.twin) for t in tasks if t.twin]
    assert twins, "nothing was speculated"
    won = [t for t in tasks if t.twin and coordinator.ledger.adapters.get(t.adapter).task == t.twin]
    assert won, "no speculative run won"
    # Each raced a run already under way, and beat it (that it races the right runs, those
    # expected to finish last, on cards that would finish sooner, is tests/test_scheduler.py's).
    for task in won:
        assert coordinator.ledger.tasks.get(task.twin).leased_at > task.leased_at, task
    # Exactly one adapter per task was accepted, and each task's result is folded at most once
    # (the fold's own check may still refuse one: it then counts as rejected, not folded).
    accepted = [a for a in adapters_of(coordinator, reply.job_id) if a.state in ("buffered", "folded", "rejected")]
    originals = [a.task.removesuffix(".spec") for a in accepted]
    assert sorted(originals) == sorted(t.task_id for t in tasks)
    assert job.adapters_folded + job.adapters_rejected == len(tasks)
    folded = [a for v in coordinator.ledger.versions.all() for a in v.adapters]
    assert len({a.id for a in folded}) == len(folded)


def test_a_fast_card_gets_more_tokens_per_run_than_a_slow_one(cluster) -> None:
    coordinator, client, tmp, _ = cluster
    coordinator.scheduler.runs.clear()  # this job's runs only, whatever ran before it
    reply = client.submit(dataset(tmp, "sizing", 60, 5), name="sizing")
    wait_done(client, reply.job_id, timeout=150)
    vram = {n.node_id: n.vram_gb for n in coordinator.dispatcher.nodes()}
    per_card: dict[float, list[int]] = {}
    for node_id, _, tokens in coordinator.scheduler.runs:
        per_card.setdefault(vram.get(node_id), []).append(tokens)
    assert max(per_card[24.0]) > max(per_card[6.0]), per_card
    speeds = {card_of(coordinator, w.worker_id).vram_gb: w.tokens_per_s for w in coordinator.ledger.workers.all()}
    # The ledger keeps each worker's measured tokens/s; the 20- and 10-TFLOPS cards differ 2x.
    # (The 1-TFLOPS card may have finished nothing: speculative twins beat all its runs.)
    assert speeds[24.0] > 1.5 * speeds[12.0] > 0, speeds


def test_a_job_that_fits_no_card_says_so(cluster) -> None:
    coordinator, client, tmp, admin = cluster
    data = dataset(tmp, "huge", 20, 4)
    waited = run(["submit", str(data), "--seq-len", "8192", "--wait", "--give-up-after", "2"],
                 {"NOMOAT_COORDINATOR": coordinator.address, "NOMOAT_TOKEN": admin}, timeout=120)
    assert waited.returncode != 0
    assert "cannot run on this cluster" in waited.stderr and "24 GB" in waited.stderr, waited.stderr
    status = json.loads(run(["status", "--json"], {"NOMOAT_COORDINATOR": coordinator.address,
                                                   "NOMOAT_TOKEN": admin}, timeout=60).stdout)
    (job,) = [j for j in status["jobs"] if j["state"] == "running"]
    assert "need a card with at least" in job["warning"]
    assert job["tasks"]["pending"] == job["totalTasks"]
    assert not any(is_twin(lease.task_id) for lease in coordinator.ledger.leases.leased())
