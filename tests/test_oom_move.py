"""Out of memory even at micro-batch 1: the task moves to a card with more memory.

Its own small cluster (a coordinator in this process, two worker processes): a 6 GB card on
which every micro-batch runs out of memory (the test hook ``NOMOAT_INJECT_OOM_ABOVE_MICRO_BATCH=0``
on that node) and a 24 GB card. Tasks the scheduler gives the small card halve their micro-batch
down to 1, fail there, and are re-issued only to cards with more than 6 GB.
"""

from __future__ import annotations

import time

import pytest

from coordinator.server import Coordinator
from coordinator.settings import JobDefaults, Settings
from nomoat.client import CoordinatorClient
from nomoat.demo import DEMO_DATA
from nomoat.v1 import nomoat_pb2 as pb
from tests.procs import Proc

pytestmark = pytest.mark.slow


def test_a_task_out_of_memory_at_micro_batch_one_moves_to_a_bigger_card(tmp_path) -> None:
    settings = Settings(
        data_dir=tmp_path / "coordinator", listen="127.0.0.1:0",
        job=JobDefaults(plan_model="llama-3.2-1b", seq_len=64, batch_size=8, tokens_per_task=512),
        fold_every=2, fold_timeout_s=5.0, tick_s=0.2, lease_ttl_s=30.0, speculate=False,
    )
    coordinator = Coordinator(settings)
    coordinator.start()
    workers = []
    try:
        token = (settings.data_dir / "trusted-worker.token").read_text().strip()
        for name, card, env in (("small", "GTX 1650:6:4", {"NOMOAT_INJECT_OOM_ABOVE_MICRO_BATCH": "0"}),
                                ("big", "RTX 4090:24:20", {})):
            workers.append(Proc(["worker", "start", "--ray", "--coordinator", coordinator.address, "--simulate-gpu", card,
                                 "--threads", "1", "--name", name, "--cache-dir", str(tmp_path / f"cache-{name}")],
                                tmp_path / f"{name}.log", env={"NOMOAT_TOKEN": token, **env}))
            workers[-1].wait_for("joined", timeout=180)
        end = time.monotonic() + 60
        while len(coordinator.dispatcher.nodes()) < 2 and time.monotonic() < end:
            time.sleep(0.5)

        lines = DEMO_DATA.read_text(encoding="utf-8").splitlines()[:60]
        dataset = tmp_path / "d.jsonl"
        dataset.write_text("\n".join(lines) + "\n", encoding="utf-8")
        admin = (settings.data_dir / "admin.token").read_text().strip()
        with CoordinatorClient(coordinator.address, admin) as client:
            reply = client.submit(dataset, name="oom-move", config=pb.JobConfig())
            end = time.monotonic() + 240
            while (job := client.status(reply.job_id).jobs[0]).state == "running":
                assert time.monotonic() < end, job
                time.sleep(0.5)
        assert job.state == "done", job
        assert any("moving to a bigger card" in e for e in job.events), job.events  # `nomoat status` shows them

        tasks = coordinator.ledger.tasks.of_job(reply.job_id)
        moved = [t for t in tasks if any("moving to a bigger card" in e
                                         for _, e in t.events)]
        assert moved, "no task was given to the small card"
        for task in moved:
            events = [e for _, e in task.events]
            assert any("retrying at micro-batch 1" in e for e in events), events
            assert task.min_vram_gb > 6.0
            assert task.state == "done"
            adapter = coordinator.ledger.adapters.get(task.adapter)
            card = pb.Card()
            card.ParseFromString(coordinator.ledger.workers.get(adapter.worker).card)
            assert card.vram_gb == 24.0, adapter
    finally:
        for w in workers:
            w.interrupt()
        coordinator.stop()
