"""A gateway SIGKILLed mid-job: outbound volunteers that know both gateways' addresses carry on
through the other, the job finishes, and every task is folded exactly once.

Real processes through the command line on one standalone Redis and one data dir (the idiom of
tests/test_leader_faults.py): a ``--role gateway`` and a ``--role all`` (which serves gRPC too,
and schedules and folds). The volunteers are given ``GATEWAY,ALL`` (nomoat.client: one channel
over both, the first while it answers), so they work through the plain gateway until it dies.
"""

from __future__ import annotations

import json
import time

import pytest

from nomoat.client import CoordinatorClient
from nomoat.v1 import nomoat_pb2 as pb
from tests import procs
from tests.procs import free_port, wait_until
from tests.test_faults import check_ledger, dataset, token
from tests.test_leader_faults import split  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


def test_a_gateway_killed_mid_job_the_volunteers_carry_on_through_the_other(split, tmp_path):
    other = f"127.0.0.1:{free_port()}"
    split.start("all", "all", other)
    both = f"{split.address},{other}"
    workers = [procs.outbound_worker(both, split.data_dir, tmp_path, name, card)
               for name, card in (("one", "RTX 3060:12"), ("two", "RTX 4090:24"))]
    try:
        for w in workers:
            w.wait_for("joined", timeout=180)
        with CoordinatorClient(other, token(split.data_dir, "admin")) as client:
            job_id = client.submit(dataset(tmp_path, 300), name="gateways",
                                   config=pb.JobConfig(tokens_per_task=1500)).job_id
        ledger = split.ledger
        tasks = ledger.tasks.ids(job_id)

        def done() -> int:
            return sum(1 for t in ledger.tasks.of_job(job_id) if t.state.value == "done")

        # Mid-job: some tasks done through the first gateway, more still to do.
        wait_until(lambda: done() >= 1, 300, "a first task done", every=0.2)
        done_at_kill = done()
        assert done_at_kill < len(tasks), "the job finished before the gateway could be killed; make it longer"
        killed = split.kill("gateway")

        wait_until(lambda: ledger.jobs.get(job_id).state.value in ("done", "failed"), 300, "the job", every=1)
        job = ledger.jobs.get(job_id)
        assert job.state.value == "done", job
        assert done() == len(tasks)
        for w in workers:  # both volunteers still running: they moved rather than gave up
            assert w.p.poll() is None, w.output()[-3000:]
        figures = check_ledger(ledger)
        folded = [a.id for v in ledger.versions.all() if not v.operation for a in v.adapters]
        for task in ledger.tasks.of_job(job_id):  # every task's adapter folded exactly once (or refused by a gate)
            state = ledger.adapters.get(task.adapter).state.value
            assert (state == "folded" and folded.count(task.adapter) == 1) or state == "rejected", (task, state)
        print(json.dumps({"tasks": len(tasks), "done_at_kill": done_at_kill,
                          "finished_after_kill_s": round(time.monotonic() - killed, 1), **figures}))
    finally:
        for w in workers:
            w.interrupt(timeout=30)
