"""Evaluations delegated over a real Ray cluster (``--eval-on workers``): a coordinator in this
process (its own Ray head) and one trusted worker process (a simulated 12 GB card).

A first job's folds, and its base loss, are scored by an evaluation task on the worker's card:
the version's metrics say which worker. Then the worker is killed while a second job's adapters
wait to be folded (the test holds the folder's lock until it is dead); the coordinator scores
that fold itself, says so in one log line, and the fold goes on.
"""

from __future__ import annotations

import logging

import pytest

from coordinator.server import Coordinator
from coordinator.settings import JobDefaults, Settings
from nomoat.client import CoordinatorClient
from nomoat.demo import DEMO_DATA
from nomoat.v1 import nomoat_pb2 as pb
from tests.procs import Proc, kill_tree, wait_until

pytestmark = pytest.mark.slow


def folds(coordinator: Coordinator, job_id: str) -> list:
    return [v for v in coordinator.ledger.versions.all() if v.version > 0 and job_id in v.jobs]


def fallbacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "nomoat.evaluation"]


def test_folds_are_evaluated_on_a_trusted_worker_and_on_the_coordinator_once_it_is_gone(tmp_path, caplog) -> None:
    settings = Settings(
        data_dir=tmp_path / "coordinator", listen="127.0.0.1:0",
        job=JobDefaults(seq_len=64, batch_size=8, tokens_per_task=1024),
        fold_every=8, fold_timeout_s=60.0, tick_s=0.2, lease_ttl_s=30.0, speculate=False, replicate_fraction=0.0,
        # Long enough for a cold Ray worker process to import torch on a busy machine; the killed
        # worker's task ends sooner, when Ray sees its node gone (about 15 s).
        eval_tokens=1024, eval_on="workers", eval_timeout_s=30.0,
    )
    caplog.set_level(logging.WARNING, logger="nomoat.evaluation")
    coordinator = Coordinator(settings)
    coordinator.start()
    worker = None
    lines = DEMO_DATA.read_text(encoding="utf-8").splitlines()
    try:
        token = (settings.data_dir / "trusted-worker.token").read_text().strip()
        worker = Proc(["worker", "start", "--ray", "--coordinator", coordinator.address, "--simulate-gpu",
                       "RTX 3060:12", "--threads", "1", "--name", "evaluator", "--cache-dir", str(tmp_path / "cache")],
                      tmp_path / "worker.log", env={"NOMOAT_TOKEN": token})
        worker.wait_for("joined", timeout=120)
        wait_until(lambda: coordinator.ray_dispatcher.nodes(), 60, "the worker's Ray node")
        (node,) = coordinator.ray_dispatcher.nodes()
        assert node.worker_id
        admin = (settings.data_dir / "admin.token").read_text().strip()
        with CoordinatorClient(coordinator.address, admin) as client:
            data = tmp_path / "a.jsonl"
            data.write_text("\n".join(lines[:24]) + "\n", encoding="utf-8")
            first = client.submit(data, name="on-worker", config=pb.JobConfig())
            wait_until(lambda: client.status(first.job_id).jobs[0].state != "running", 90, "the first job")
            assert client.status(first.job_id).jobs[0].state == "done"
            made = folds(coordinator, first.job_id)
            assert made and all(v.metrics["evaluated_on"] == node.worker_id for v in made), [v.metrics for v in made]
            assert coordinator.ledger.jobs.get(first.job_id).base_loss is not None
            assert not fallbacks(caplog)  # the job's base loss too was scored on the worker

            # The second job's adapters wait while the folder is held; then its worker dies.
            data = tmp_path / "b.jsonl"
            data.write_text("\n".join(lines[24:48]) + "\n", encoding="utf-8")
            with coordinator.folder.lock:
                second = client.submit(data, name="worker-gone", config=pb.JobConfig())
                wait_until(lambda: all(t.state == "done" for t in coordinator.ledger.tasks.of_job(second.job_id)),
                           60, "the second job's tasks")
                kill_tree(worker.p.pid)
            wait_until(lambda: client.status(second.job_id).jobs[0].state != "running", 60, "the second job's fold")
        made = folds(coordinator, second.job_id)
        assert made and all(v.metrics["evaluated_on"] == "coordinator" for v in made), [v.metrics for v in made]
        said = fallbacks(caplog)
        assert said and all("on the coordinator" in line for line in said), said
    finally:
        if worker is not None:
            worker.interrupt(timeout=10)
        coordinator.stop()
