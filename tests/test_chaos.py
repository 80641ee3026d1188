"""Chaos, bounded: jobs run while workers are killed and the coordinator is killed and restarted.

The faults come at random moments while the jobs run (seeded; NOMOAT_CHAOS_SEED picks
another run) but their number is fixed and the whole test stays within about three minutes. At the end it prints one
JSON line (jobs completed, tasks re-issued, adapters lost, duplicate folds, the faults made)
and asserts that nothing was lost and nothing folded twice.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from tests import procs
from tests.procs import wait_until
from tests.test_faults import Cluster, check_ledger, ledger_figures

pytestmark = pytest.mark.slow

FAULTS = ("kill-worker", "restart-coordinator", "kill-worker")
BUDGET_S = 180.0  # for everything after submission


def test_jobs_complete_while_workers_and_the_coordinator_are_killed(tmp_path) -> None:
    seed = int(os.environ.get("NOMOAT_CHAOS_SEED", "5"))
    rng = random.Random(seed)
    cluster = Cluster(tmp_path, "--lease-ttl", "8", "--fold-every", "2", "--max-attempts", "20")
    try:
        names = ["a", "b"]
        for name in names:
            cluster.add_worker(name)
        jobs = [cluster.submit(lines=240, tokens_per_task=2500, seed=s) for s in (1, 2)]
        started = time.monotonic()
        total = sum(len(cluster.ledger.tasks.ids(j)) for j in jobs)
        # Each fault comes when a random number of tasks is done (so always mid-job), plus jitter.
        thresholds = sorted(rng.sample(range(1, max(int(total * 0.6), len(FAULTS) + 1)), len(FAULTS)))
        made = {"workers_killed": 0, "coordinator_restarts": 0}

        def done() -> int:
            return sum(cluster.ledger.tasks.counts(j)["done"] for j in jobs)

        for fault, threshold in zip(rng.sample(FAULTS, len(FAULTS)), thresholds):
            wait_until(lambda: done() >= threshold, BUDGET_S, f"{threshold} tasks done", every=0.2)
            time.sleep(rng.uniform(0, 3))
            if fault == "kill-worker":
                name = rng.choice(names)
                procs.kill_tree(cluster.workers[name].p.pid)
                replacement = f"{name}{made['workers_killed']}"  # a volunteer comes back
                names[names.index(name)] = replacement
                cluster.add_worker(replacement)
                made["workers_killed"] += 1
            else:
                cluster.coordinator.p.send_signal(signal.SIGKILL)
                cluster.coordinator.p.wait()
                cluster.start_coordinator()
                made["coordinator_restarts"] += 1
        left = BUDGET_S - (time.monotonic() - started)
        wait_until(lambda: all(cluster.job_state(j) in ("done", "failed") for j in jobs), max(left, 30),
                   "the jobs to finish", every=1)
        wait_until(lambda: not cluster.ledger.adapters.buffered(), 30, "the last fold")
        figures = ledger_figures(cluster.ledger)
        report = {
            "seed": seed,
            "jobs_completed": sum(cluster.job_state(j) == "done" for j in jobs),
            "jobs": len(jobs),
            "tasks": total,
            "tasks_reissued": figures["reissued"],
            "adapters_accepted": figures["accepted"],
            "adapters_folded": figures["folded"],
            "adapters_lost": figures["lost"],
            "duplicate_folds": figures["duplicate_folds"],
            "versions": figures["versions"],
            **made,
            "seconds": round(time.monotonic() - started),
        }
        print("CHAOS " + json.dumps(report))
        check_ledger(cluster.ledger)
        assert report["adapters_lost"] == 0 and report["duplicate_folds"] == 0, report
        assert report["jobs_completed"] == len(jobs), [cluster.ledger.jobs.get(j) for j in jobs]
    finally:
        cluster.close()
