"""Ledger invariants that must hold after anything (bad input, killed processes, chaos).

``check(ledger)`` reads the whole ledger and raises AssertionError naming every broken
invariant; it returns counts for a report. Reused by the fuzz test and the fault/chaos tests.
Call it when nothing is mid-transition: each transition is atomic, so between calls it always
holds, but a reader that walks many keys while a coordinator runs can see two moments at once.
"""

from __future__ import annotations

import math
from collections import Counter

from coordinator.ledger import keys
from coordinator.ledger import AdapterState, JobState, Ledger, TaskRecord, TaskState

ADAPTER_STATES = tuple(s.value for s in AdapterState)
TASK_STATES = tuple(s.value for s in TaskState)


def _zset(ledger: Ledger, key: str) -> dict[str, float]:
    return {m.decode(): s for m, s in ledger.r.zrange(key, 0, -1, withscores=True)}


def _raw_state(ledger: Ledger, key: str) -> str | None:
    """A record's state as stored: an unknown one cannot be read as a typed record."""
    value = ledger.r.hget(key, "state")
    return value.decode() if value is not None else None


def problems(ledger: Ledger) -> tuple[list[str], dict[str, int]]:
    """(what is wrong, counts): the checks of :func:`check` without raising."""
    bad: list[str] = []
    pending, leases = _zset(ledger, keys.PENDING), _zset(ledger, keys.LEASES)
    fence_counter = int(ledger.r.get(keys.FENCE) or 0)
    tasks: dict[str, TaskRecord] = {}
    running = set(ledger.jobs.running_ids())
    job_ids = ledger.jobs.ids()
    unknown_states: dict[str, str] = {}  # task id -> a state no TaskState names
    for job_id in job_ids:
        state = _raw_state(ledger, keys.job(job_id))
        if state not in {s.value for s in JobState}:
            bad.append(f"job {job_id} is in state {state!r}" if state else f"job {job_id} is listed but has no record")
            continue
        job = ledger.jobs.get(job_id)
        if (job.state is JobState.RUNNING) != (job_id in running):
            bad.append(f"job {job_id} is {job.state} but {'not ' if job_id not in running else ''}"
                       "in the running-jobs index")
        ids = ledger.tasks.ids(job_id)
        if len(ids) != len(set(ids)):
            bad.append(f"job {job_id} lists a task twice")
        for task_id in ids:
            state = _raw_state(ledger, keys.task(task_id))
            if state is None:
                bad.append(f"task {task_id} of job {job_id} has no record")
                continue
            if state not in TASK_STATES:
                unknown_states[task_id] = state
                continue
            task = ledger.tasks.get(task_id)
            if task.job != job_id:
                bad.append(f"task {task_id} is listed by job {job_id} but names job {task.job}")
            tasks[task_id] = task
    for task_id, state in unknown_states.items():
        bad.append(f"task {task_id} is in unknown state {state!r}")
    # A speculative twin (a second lease on a leased task, see Leases.speculate) is not one of
    # its job's tasks; the original names it, and each must look like a task of its own.
    for task_id, task in list(tasks.items()):
        if task.twin:
            twin = ledger.tasks.get(task.twin)
            if twin is None or twin.twin_of != task_id:
                bad.append(f"task {task_id} names twin {task.twin!r}, which is not its twin")
            else:
                tasks[task.twin] = twin

    # A replicated task's replica runs (coordinator.ledger.replicas) are not its job's tasks
    # either; its group names them, and at most one adapter of a group is ever folded.
    groups = [ledger.replicas.get(k.decode()[len(keys.replicas("")):])
              for k in ledger.r.scan_iter(match=keys.replicas("*"), count=1000)]
    open_ids = set(ledger.r.zrange(keys.REPLICATED, 0, -1))
    for group in groups:
        if group.task_id not in tasks:
            bad.append(f"replica group {group.task_id} belongs to no task")
        if group.open != (group.task_id.encode() in open_ids):
            bad.append(f"replica group {group.task_id} is {group.state} but "
                       f"{'not ' if group.open else ''}in the open groups")
        for run in group.runs:
            replica = ledger.tasks.get(run)
            if replica is None or replica.replica_of != group.task_id:
                bad.append(f"replica group {group.task_id} names run {run!r}, which is not its replica")
            else:
                tasks[run] = replica
        results = [ledger.adapters.get(a) for a in group.results.values()]
        live = [a for a in results if a and a.state in (AdapterState.BUFFERED, AdapterState.FOLDED,
                                                       AdapterState.UNMERGED)]
        if len(live) > 1:
            bad.append(f"replicated task {group.task_id} has {len(live)} adapters buffered or folded")
        if group.open and any(a is None or a.state is not AdapterState.HELD for a in results):
            bad.append(f"replica group {group.task_id} is open but not every adapter of it is held")

    def related(task_id: str) -> set[str]:
        task = tasks[task_id]
        return {task_id, *(t for t in (task.twin, task.twin_of) if t in tasks)}

    for task_id, task in tasks.items():
        state = task.state
        if (state is TaskState.PENDING) != (task_id in pending):
            bad.append(f"task {task_id} is {state} but {'not ' if task_id not in pending else ''}in the pending queue")
        if (state is TaskState.LEASED) != (task_id in leases):
            bad.append(f"task {task_id} is {state} but {'not ' if task_id not in leases else ''}in the lease set")
        if task.fence > fence_counter:
            bad.append(f"task {task_id} has fence {task.fence} beyond the fence counter {fence_counter}")
        if state is TaskState.DONE:
            adapter = ledger.adapters.get(task.adapter) if task.adapter else None
            if adapter is None:
                bad.append(f"task {task_id} is done but its adapter {task.adapter!r} has no record")
            elif not any((adapter.task, adapter.fence) == (t, tasks[t].fence) for t in related(task_id)):
                bad.append(f"task {task_id}'s adapter belongs to {adapter.task} fence {adapter.fence}")
    for task_id in set(pending) | set(leases):
        if task_id not in tasks and task_id not in unknown_states:
            bad.append(f"queued or leased task {task_id} belongs to no job")
    if set(pending) & set(leases):
        bad.append(f"tasks both pending and leased: {sorted(set(pending) & set(leases))}")

    buffer = ledger.adapters.buffer_ids()
    for adapter_id, n in Counter(buffer).items():
        if n > 1:
            bad.append(f"adapter {adapter_id} is in the fold buffer {n} times")
    adapters = {}
    for adapter_id in ledger.adapters.ids():
        state = _raw_state(ledger, keys.adapter(adapter_id))
        if state not in ADAPTER_STATES:
            bad.append(f"adapter {adapter_id} is in unknown state {state!r}")
            continue
        adapters[adapter_id] = adapter = ledger.adapters.get(adapter_id)
        if adapter.state is AdapterState.BUFFERED and adapter_id not in buffer:
            bad.append(f"adapter {adapter_id} is buffered but not in the fold buffer (it would never be folded)")
        if adapter.task not in tasks:
            bad.append(f"adapter {adapter_id} names unknown task {adapter.task!r}")
    for adapter_id in set(buffer):
        adapter = adapters.get(adapter_id)
        if adapter is None or adapter.state is not AdapterState.BUFFERED:
            bad.append(f"adapter {adapter_id} is in the fold buffer but is {adapter and adapter.state}")

    # A task and its speculative twin train one shard: at most one adapter of the two is ever
    # accepted (the first completes both, in one step), or the shard would be folded twice.
    shards = Counter(a.task.removesuffix(".spec") for a in adapters.values()
                     if a.state in (AdapterState.BUFFERED, AdapterState.FOLDED, AdapterState.HELD,
                                    AdapterState.UNMERGED))
    for shard, n in shards.items():
        if n > 1:
            bad.append(f"task {shard} and its twin have {n} adapters accepted: the shard would be folded twice")

    versions = ledger.versions.all()
    numbers = [v.version for v in versions]
    if numbers != list(range(len(numbers))):
        bad.append(f"versions are not 0..n without gaps: {numbers}")
    latest = ledger.versions.latest()
    if versions and latest != numbers[-1]:
        bad.append(f"the newest version is {latest} but versions go up to {numbers[-1]}")
    folded = [a.id for v in versions if not v.operation for a in v.adapters]
    for adapter_id, n in Counter(folded).items():
        if n > 1:
            bad.append(f"adapter {adapter_id} was folded into {n} versions")
    for v in versions:
        if v.version > 0 and not 0 <= v.parent < v.version:
            bad.append(f"version {v.version} has parent {v.parent}")
        if math.isinf(v.eval_loss):
            bad.append(f"version {v.version} has an infinite eval loss")
    bad += leader_problems(ledger, numbers)
    # Each job's task counters (kept by the scripts that change a task's state, and read instead
    # of its tasks) agree with its tasks' states, and its twins' with its twins'.
    for job_id in job_ids:
        raw = {k.decode(): v.decode() for k, v in ledger.r.hgetall(keys.job(job_id)).items()}
        if raw.get("counted") != "1":
            continue
        own = Counter(t.state.value for t in tasks.values() if t.job == job_id and not t.twin_of and not t.replica_of)
        twins = Counter(t.state.value for t in tasks.values() if t.job == job_id and t.twin_of)
        for state in TASK_STATES:
            for kind, actual in (("tasks", own), ("twins", twins)):
                if int(raw.get(f"{kind}:{state}", 0)) != actual.get(state, 0):
                    bad.append(f"job {job_id} counts {raw.get(f'{kind}:{state}', 0)} {kind} {state} "
                               f"but has {actual.get(state, 0)}")
    counted = sum(job.adapters_folded for job in (ledger.jobs.get(j) for j in job_ids) if job)
    if counted != len(folded):
        bad.append(f"jobs count {counted} folded adapters but versions hold {len(folded)}")

    own = [t for t in tasks.values() if not t.twin_of and not t.replica_of]
    states = Counter(t.state.value for t in own)
    counts = {"jobs": len(job_ids), "tasks": len(own), "twins": sum(1 for t in tasks.values() if t.twin_of),
              "replicas": sum(1 for t in tasks.values() if t.replica_of),
              **{s: states.get(s, 0) for s in TASK_STATES},
              "adapters": len(adapters), "buffered": len(set(buffer)), "folded": len(folded),
              "versions": len(versions)}
    return bad, counts


def leader_problems(ledger: Ledger, numbers: list[int]) -> list[str]:
    """Leader leases (coordinator.ledger.leaders): each role's lease names a fence its counter
    issued, and the versions a folder published under a fence were published in fence order (a
    version under an older fence after one under a newer: a paused leader wrote after its term)."""
    bad = []
    for role in keys.LEADER_ROLES:
        issued = int(ledger.r.get(keys.leader_fence(role)) or 0)
        held = ledger.r.get(keys.leader(role))
        if held is not None and int(held.decode().split(":", 1)[0]) > issued:
            bad.append(f"the {role} lease {held.decode()} names a fence beyond its counter {issued}")
    issued = int(ledger.r.get(keys.leader_fence("folder")) or 0)
    last = 0
    for n in numbers:
        raw = ledger.r.hget(keys.version(n), "leader_fence")
        if raw is None:
            continue
        fence = int(raw)
        if fence > issued:
            bad.append(f"version {n} was published under folder fence {fence}, beyond the counter {issued}")
        if fence < last:
            bad.append(f"version {n} was published under folder fence {fence} after a version under fence {last}")
        last = max(last, fence)
    return bad


def check(ledger: Ledger) -> dict[str, int]:
    """Raise AssertionError listing every broken invariant; else return counts for a report."""
    bad, counts = problems(ledger)
    assert not bad, "the ledger is inconsistent:\n  " + "\n  ".join(bad)
    return counts
