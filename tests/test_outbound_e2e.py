"""Outbound-only workers as whole processes: `nomoat worker start --coordinator HOST:PORT` with a
plain worker token against a real coordinator over real gRPC, alone and beside a Ray worker, and
killed mid-task. Nothing accepted may be lost and nothing folded twice (tests/test_faults.py)."""

from __future__ import annotations

import time

import pytest

from tests import procs
from tests.procs import descendants, cmdline, wait_until
from tests.test_faults import Cluster, check_ledger, cluster_factory  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

SLOW_CARDS = {"NOMOAT_SIMULATED_TOKENS_PER_TFLOP": "20"}  # an RTX 3060 (13 TFLOPS): ~260 tokens/s


def add_outbound(cluster: Cluster, name: str, card: str = "RTX 3060:12:13", env: dict | None = None) -> procs.Proc:
    proc = procs.outbound_worker(cluster.address, cluster.data_dir, cluster.tmp, name, card, env)
    cluster.workers[name] = proc
    proc.wait_for("joined (outbound-only)", timeout=120)
    return proc


def runs_no_ray(proc: procs.Proc) -> bool:
    return not any("ray" in cmdline(pid) for pid in descendants(proc.p.pid))


def done(cluster: Cluster, job_id: str, timeout: float) -> None:
    wait_until(lambda: cluster.job_state(job_id) in ("done", "failed"), timeout, f"job {job_id} to end")
    assert cluster.job_state(job_id) == "done", cluster.ledger.jobs.get(job_id)


def test_a_job_completes_on_outbound_workers_alone(cluster_factory) -> None:
    cluster = cluster_factory("--fold-every", "2")
    assert "nomoat worker start --coordinator" in cluster.coordinator.output()
    a, b = add_outbound(cluster, "home-a"), add_outbound(cluster, "home-b", "RTX 4090:24:80")
    started = time.monotonic()
    job_id = cluster.submit(lines=120, tokens_per_task=1500)
    done(cluster, job_id, timeout=600)
    print(f"outbound-only job: {time.monotonic() - started:.0f} s")
    figures = check_ledger(cluster.ledger)
    assert figures["accepted"] == len(cluster.ledger.tasks.ids(job_id)) >= 2
    workers = [w for w in cluster.ledger.workers.all() if w.tasks_done]
    assert workers and all(w.node_id.startswith("outbound:") for w in workers)
    assert runs_no_ray(a) and runs_no_ray(b)
    assert a.interrupt() == 0 and "worker left" in a.output()


def test_one_scheduler_places_a_job_on_a_ray_worker_and_an_outbound_worker(cluster_factory) -> None:
    cluster = cluster_factory("--fold-every", "2")
    cluster.workers["lab"] = procs.worker(cluster.address, cluster.data_dir, cluster.tmp, "lab", "RTX 3060:12:13")
    cluster.workers["lab"].wait_for("joined the Ray cluster", timeout=180)
    lab_id = wait_until(lambda: next((w.worker_id for w in cluster.ledger.workers.all() if w.name == "lab"), None),
                        30, "the lab worker's record")
    # More units than one run may hold (max_units_per_run 16): a card whose speed is measured gets
    # a run of as many units as it trains in a minute, so with a small job one card could take it all.
    job_id = cluster.submit(lines=400, tokens_per_task=500)
    # The outbound volunteer joins once the Ray node holds a unit of the job, so that both do:
    # alone at the start, it could take every unit before Ray's new node is listed.
    wait_until(lambda: any(t.holder_worker == lab_id for t in cluster.ledger.tasks.of_job(job_id)), 180,
               "the Ray worker to hold a unit", every=0.2)
    add_outbound(cluster, "home", "RTX 3060:12:13", env=SLOW_CARDS)
    done(cluster, job_id, timeout=900)
    check_ledger(cluster.ledger)
    by_kind = {"outbound": 0, "ray": 0}
    for w in cluster.ledger.workers.all():
        if w.tasks_done:
            by_kind["outbound" if w.node_id.startswith("outbound:") else "ray"] += w.tasks_done
    tasks = [(t.task_id, t.attempts, t.error, t.events) for t in cluster.ledger.tasks.of_job(job_id)]
    assert by_kind["outbound"] >= 1 and by_kind["ray"] >= 1, (by_kind, tasks)


def test_an_outbound_worker_killed_mid_task_has_its_task_reissued_and_nothing_folded_twice(cluster_factory) -> None:
    cluster = cluster_factory("--fold-every", "2", "--lease-ttl", "8")
    victim = add_outbound(cluster, "victim", env={"NOMOAT_SIMULATED_TOKENS_PER_TFLOP": "20"})  # slow: ~260 tok/s
    victim_id = wait_until(lambda: next((w.worker_id for w in cluster.ledger.workers.all() if w.name == "victim"),
                                        None), 30, "the victim's record")
    job_id = cluster.submit(lines=120, tokens_per_task=1500)

    def training() -> str | None:
        for task in cluster.ledger.tasks.of_job(job_id):
            # placed on the victim (holder_worker, from the grant) and started there (its first heartbeat)
            if task.state == "leased" and task.holder_worker == victim_id and task.claimed == task.fence:
                return task.task_id
        return None

    task_id = wait_until(training, 180, "the victim to train a task", every=0.2)
    fence = cluster.ledger.tasks.get(task_id).fence
    procs.kill_tree(victim.p.pid)  # no goodbye, no report: only the lease rules are left
    add_outbound(cluster, "rescuer", "RTX 4090:24:80")
    done(cluster, job_id, timeout=600)
    figures = check_ledger(cluster.ledger)
    task = cluster.ledger.tasks.get(task_id)
    assert task.state == "done", task
    # Two lease rules can rescue it, and which one wins is a race: the lease runs out and the task
    # is re-issued under a new fence, or (the rescuer idle, the task overdue) a speculative twin
    # finishes first. Either way the adapter folded is not the victim's, and only one is.
    twin = cluster.ledger.tasks.get(task.twin) if task.twin else None
    rescued_by_twin = task.fence == fence and twin is not None and twin.state == "done"
    # (The victim's lease expiring spends no attempt: it costs the victim's volunteer trust instead.)
    assert rescued_by_twin or task.fence > fence, (task, twin)
    winner = twin if rescued_by_twin else task
    assert cluster.ledger.adapters.get(winner.adapter).worker != victim_id
    assert figures["duplicate_folds"] == 0
    assert rescued_by_twin or figures["reissued"] >= 1
