"""Ledger invariants that must hold after anything (bad input, killed processes, chaos).

``check(ledger)`` reads the whole ledger and raises AssertionError naming every broken
invariant; it returns counts for a report. Reused by the fuzz test and the fault/chaos tests.
Call it when nothing is mid-transition: each transition is atomic, so between calls it always
holds, but a reader that walks many keys while a coordinator runs can see two moments at once.
"""

from __future__ import annotations

import math
from collections import Counter

from coordinator import keys
from coordinator.ledger import TASK_STATES, Ledger

ADAPTER_STATES = ("buffered", "folded", "rejected", "unmerged")


def _zset(ledger: Ledger, key: str) -> dict[str, float]:
    return {m.decode(): s for m, s in ledger.r.zrange(key, 0, -1, withscores=True)}


def problems(ledger: Ledger) -> tuple[list[str], dict[str, int]]:
    """(what is wrong, counts): the checks of :func:`check` without raising."""
    bad: list[str] = []
    pending, leases = _zset(ledger, keys.PENDING), _zset(ledger, keys.LEASES)
    fence_counter = int(ledger.r.get(keys.FENCE) or 0)
    tasks: dict[str, dict[str, str]] = {}
    running = set(ledger.running_job_ids())
    for job_id in ledger.job_ids():
        job = ledger.job(job_id)
        if job is None:
            bad.append(f"job {job_id} is listed but has no record")
            continue
        if job.get("state") not in ("running", "done", "failed"):
            bad.append(f"job {job_id} is in state {job.get('state')!r}")
        if (job.get("state") == "running") != (job_id in running):
            bad.append(f"job {job_id} is {job.get('state')} but {'not ' if job_id not in running else ''}"
                       "in the running-jobs index")
        ids = ledger.task_ids(job_id)
        if len(ids) != len(set(ids)):
            bad.append(f"job {job_id} lists a task twice")
        for task_id, task in zip(ids, ledger.tasks(job_id)):
            if not task:
                bad.append(f"task {task_id} of job {job_id} has no record")
                continue
            if task.get("job") != job_id:
                bad.append(f"task {task_id} is listed by job {job_id} but names job {task.get('job')}")
            tasks[task_id] = task
    # A speculative twin (a second lease on a leased task, see Ledger.speculate) is not one of
    # its job's tasks; the original names it, and each must look like a task of its own.
    for task_id, task in list(tasks.items()):
        if task.get("twin"):
            twin = ledger.task(task["twin"])
            if twin is None or twin.get("twin_of") != task_id:
                bad.append(f"task {task_id} names twin {task['twin']!r}, which is not its twin")
            else:
                tasks[task["twin"]] = twin

    def related(task_id: str) -> set[str]:
        task = tasks[task_id]
        return {task_id, *(t for t in (task.get("twin"), task.get("twin_of")) if t in tasks)}

    for task_id, task in tasks.items():
        state = task.get("state")
        if state not in TASK_STATES:
            bad.append(f"task {task_id} is in unknown state {state!r}")
        if (state == "pending") != (task_id in pending):
            bad.append(f"task {task_id} is {state} but {'not ' if task_id not in pending else ''}in the pending queue")
        if (state == "leased") != (task_id in leases):
            bad.append(f"task {task_id} is {state} but {'not ' if task_id not in leases else ''}in the lease set")
        if int(task.get("fence", 0)) > fence_counter:
            bad.append(f"task {task_id} has fence {task['fence']} beyond the fence counter {fence_counter}")
        if state == "done":
            adapter = ledger.adapter(task.get("adapter", "")) if task.get("adapter") else None
            if adapter is None:
                bad.append(f"task {task_id} is done but its adapter {task.get('adapter')!r} has no record")
            elif not any((adapter.get("task"), adapter.get("fence")) == (t, tasks[t].get("fence"))
                         for t in related(task_id)):
                bad.append(f"task {task_id}'s adapter belongs to {adapter.get('task')} fence {adapter.get('fence')}")
    for task_id in set(pending) | set(leases):
        if task_id not in tasks:
            bad.append(f"queued or leased task {task_id} belongs to no job")
    if set(pending) & set(leases):
        bad.append(f"tasks both pending and leased: {sorted(set(pending) & set(leases))}")

    buffer = [a.decode() for a in ledger.r.lrange(keys.FOLD_BUFFER, 0, -1)]
    for adapter_id, n in Counter(buffer).items():
        if n > 1:
            bad.append(f"adapter {adapter_id} is in the fold buffer {n} times")
    for adapter_id in set(buffer):
        adapter = ledger.adapter(adapter_id)
        if adapter is None or adapter.get("state") != "buffered":
            bad.append(f"adapter {adapter_id} is in the fold buffer but is {adapter and adapter.get('state')}")
    adapters = {}
    for key in ledger.r.scan_iter(match=keys.adapter("*"), count=1000):
        adapter_id = key.decode()[len(keys.adapter("")):]
        adapters[adapter_id] = adapter = ledger.adapter(adapter_id) or {}
        state = adapter.get("state")
        if state not in ADAPTER_STATES:
            bad.append(f"adapter {adapter_id} is in unknown state {state!r}")
        if state == "buffered" and adapter_id not in buffer:
            bad.append(f"adapter {adapter_id} is buffered but not in the fold buffer (it would never be folded)")
        if adapter.get("task") not in tasks:
            bad.append(f"adapter {adapter_id} names unknown task {adapter.get('task')!r}")

    versions = ledger.versions()
    numbers = [v["version"] for v in versions]
    if numbers != list(range(len(numbers))):
        bad.append(f"versions are not 0..n without gaps: {numbers}")
    latest = ledger.latest_version()
    if versions and latest != numbers[-1]:
        bad.append(f"the newest version is {latest} but versions go up to {numbers[-1]}")
    folded = [a["id"] for v in versions if not v.get("metrics", {}).get("operation") for a in v.get("adapters", [])]
    for adapter_id, n in Counter(folded).items():
        if n > 1:
            bad.append(f"adapter {adapter_id} was folded into {n} versions")
    for v in versions:
        if v["version"] > 0 and not 0 <= v["parent"] < v["version"]:
            bad.append(f"version {v['version']} has parent {v['parent']}")
        if isinstance(v.get("eval_loss"), float) and math.isinf(v["eval_loss"]):
            bad.append(f"version {v['version']} has an infinite eval loss")
    counted = sum(int((ledger.job(j) or {}).get("adapters_folded", 0)) for j in ledger.job_ids())
    if counted != len(folded):
        bad.append(f"jobs count {counted} folded adapters but versions hold {len(folded)}")

    own = [t for t in tasks.values() if not t.get("twin_of")]
    states = Counter(t.get("state") for t in own)
    counts = {"jobs": len(ledger.job_ids()), "tasks": len(own), "twins": len(tasks) - len(own),
              **{s: states.get(s, 0) for s in TASK_STATES},
              "adapters": len(adapters), "buffered": len(set(buffer)), "folded": len(folded),
              "versions": len(versions)}
    return bad, counts


def check(ledger: Ledger) -> dict[str, int]:
    """Raise AssertionError listing every broken invariant; else return counts for a report."""
    bad, counts = problems(ledger)
    assert not bad, "the ledger is inconsistent:\n  " + "\n  ".join(bad)
    return counts
