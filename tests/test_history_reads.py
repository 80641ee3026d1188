"""Reads that do not grow with history: a scheduler round, a status call, a watch, the dashboard
and a /metrics scrape issue as many Redis commands over a ledger with thousands of finished
jobs, gone workers and versions as over one with a hundred (counted by the server itself, INFO
commandstats, and by the client's round trips: deterministic counts, not timings).

And the task counters kept by the scripts that change task states agree with the states, and a
worker's kind is the one it registered with.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import replace

import pytest
import redis

from coordinator.ledger import JobConfig, JobRecord, Ledger, TaskRecord, VersionRecord, keys
from coordinator.ledger.codec import new_job_fields, new_task_fields, version_fields
from coordinator.observe import dashboard, metrics, status
from coordinator.schedule import registration
from coordinator.schedule.inbox_dispatch import OutboundDispatcher
from coordinator.schedule.scheduler import Scheduler
from coordinator.schedule.transport import Need
from coordinator.settings import Settings
from nomoat.card import to_message
from tests import consistency
from worker.probe import parse_simulated

CONFIG = JobConfig(lora_rank=4, lora_alpha=8.0, target_modules=("q_proj",), seq_len=64, learning_rate=1e-3,
                   batch_size=2, epochs=1, tokens_per_task=100)
CARD = to_message(parse_simulated("RTX 3060:12:13")).SerializeToString()


class CountingConnection(redis.Connection):
    """A real connection that counts what it sends: one send is one round trip (a pipeline, or a
    script, is one)."""

    sent = 0

    def send_packed_command(self, command, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)


@pytest.fixture
def counted(redis_server, redis_client) -> Ledger:
    """A ledger on the session's Redis (flushed) whose client counts its round trips."""
    pool = redis.ConnectionPool.from_url(redis_server.url, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    yield Ledger(client)
    client.close()


def server_commands(client: redis.Redis) -> int:
    """Commands the server has run since it started (scripts' own calls included)."""
    return sum(v["calls"] for k, v in client.info("commandstats").items() if k != "cmdstat_info")


def cost(ledger: Ledger, action: Callable[[], object]) -> tuple[int, int]:
    """(commands the server ran, round trips the client made) for ``action``."""
    before, sent = server_commands(ledger.r), CountingConnection.sent
    action()
    return server_commands(ledger.r) - before, CountingConnection.sent - sent - 1  # (the INFO before)


def history(ledger: Ledger, jobs: int, workers: int, versions: int) -> None:
    """What a long-lived ledger holds besides its active work, written straight into Redis (fast):
    finished jobs with a failed task each, workers not heard from for a day, published versions."""
    long_ago = time.time() - 86400
    pipe = ledger.r.pipeline(transaction=False)
    for i in range(jobs):
        job_id, task_id = f"j-old{i}", f"j-old{i}-t0"
        record = JobRecord(job_id=job_id, name="old", config=CONFIG, total_tasks=1)
        pipe.hset(keys.job(job_id), mapping={**new_job_fields(record, long_ago + i), "state": "failed", "counted": 1,
                                             "tasks:failed": 1})
        pipe.zadd(keys.JOBS, {job_id: long_ago + i})
        pipe.rpush(keys.job_tasks(job_id), task_id)
        task = TaskRecord(task_id=task_id, job=job_id, tokens=10)
        pipe.hset(keys.task(task_id), mapping={**new_task_fields(task), "state": "failed", "counted": "task",
                                                      "attempts": 3, "error": "it failed"})
    pipe.hincrby(keys.COUNTERS, "tasks:failed", jobs)
    pipe.hincrby(keys.COUNTERS, "jobs:failed", jobs)
    for i in range(workers):
        pipe.hset(keys.worker(f"w-gone{i}"), mapping={"name": f"gone{i}", "card": CARD.hex(), "tasks_done": 1,
                                                       "kind": "outbound"})
        pipe.zadd(keys.WORKERS, {f"w-gone{i}": long_ago + i})
    latest = ledger.versions.latest()
    for n in range(latest + 1, latest + 1 + versions):
        pipe.hset(keys.version(n), mapping=version_fields(VersionRecord(version=n, parent=n - 1, eval_loss=2.0)))
        pipe.zadd(keys.VERSIONS, {str(n): n})
    pipe.set(keys.LATEST, latest + versions)
    pipe.execute()


def active_work(ledger: Ledger, tmp_path, done: int = 0) -> tuple[Settings, Scheduler, list[str]]:
    """The same active work on every ledger: a running job with 12 tasks to train (and ``done``
    trained already), 4 volunteers asking for work."""
    settings = Settings(data_dir=tmp_path, speculate=False, max_units_per_run=1)
    tasks = [TaskRecord(task_id=f"j-now-t{i}", job="j-now", index=i, start=i, end=i + 1, tokens=10)
             for i in range(12 + done)]
    ledger.jobs.create(JobRecord(job_id="j-now", name="now", config=CONFIG, total_tasks=len(tasks)), tasks)
    for task in tasks[:done]:
        fence = ledger.leases.lease(task.task_id, time.time() + 60, 0, max_attempts=3)
        sha = hashlib.sha256(task.task_id.encode()).hexdigest()  # each task's adapter: bytes of its own
        assert ledger.adapters.accept(task.task_id, fence, sha, tokens=10).status == "accepted"
    workers = []
    for i in range(4):
        worker_id = f"w-now{i}"
        ledger.workers.register(worker_id, name=f"now{i}", card=CARD, token="t")
        ledger.inbox.seen(worker_id)
        workers.append(worker_id)
    scheduler = Scheduler(settings, ledger, OutboundDispatcher(ledger), "token", lambda config: Need(1.0))
    return settings, scheduler, workers


def costs(ledger: Ledger, tmp_path, old_jobs: int, old_workers: int, old_versions: int,
          done: int) -> dict[str, tuple[int, int]]:
    ledger.r.flushdb()
    ledger.versions.publish(VersionRecord(version=0, parent=-1))
    history(ledger, old_jobs, old_workers, old_versions)
    settings, scheduler, _ = active_work(ledger, tmp_path, done)
    exporter = metrics.Metrics(ledger, settings)
    # Warm: scripts loaded, the job's config and the workers' cards read once (they are cached).
    scheduler.tick()
    status.overview(ledger, settings)
    exporter.exposition()
    found = {
        "tick": cost(ledger, scheduler.tick),
        "status": cost(ledger, lambda: status.overview(ledger, settings)),
        "status next page": cost(ledger, lambda: status.overview(
            ledger, settings, page=status.overview(ledger, settings).next_page)),
        "watch": cost(ledger, lambda: status.progress(ledger, "j-now")),
        "dashboard": cost(ledger, lambda: dashboard.snapshot(ledger, settings)),
        "metrics": cost(ledger, exporter.exposition),
    }
    return found


def test_a_round_a_status_call_a_watch_the_dashboard_and_a_scrape_cost_the_same_however_long_the_history(
        counted: Ledger, tmp_path) -> None:
    # (the small history is longer than every page: the dashboard's loss curve is 200 versions)
    # The running job's trained tasks are history too: only its counters are read, not its tasks.
    small = costs(counted, tmp_path, old_jobs=100, old_workers=200, old_versions=250, done=20)
    consistency.check(counted)  # the history written by hand is a ledger's
    large = costs(counted, tmp_path, old_jobs=2000, old_workers=5000, old_versions=600, done=1000)
    assert large == small, {k: (small[k], large[k]) for k in small}
    # and not by reading nothing: a round leases to each of the 4 volunteers
    assert small["tick"][0] > 10


def test_a_status_page_lists_the_active_work_and_then_the_history_a_page_at_a_time(ledger: Ledger, tmp_path) -> None:
    ledger.versions.publish(VersionRecord(version=0, parent=-1))
    history(ledger, jobs=45, workers=30, versions=5)
    settings, _, workers = active_work(ledger, tmp_path)
    first = status.overview(ledger, settings, limit=20)
    assert [j.job_id for j in first.jobs][-1] == "j-now" and len(first.jobs) == 21
    assert {w.worker_id for w in first.workers if w.state == "active"} == set(workers)
    seen_jobs = [j.job_id for j in first.jobs]
    seen_workers = [w.worker_id for w in first.workers]
    page = first.next_page
    while page.token():
        view = status.overview(ledger, settings, limit=20, page=status.Page.of(page.token()))
        assert all(j.state == "failed" for j in view.jobs) and all(w.state == "gone" for w in view.workers)
        seen_jobs += [j.job_id for j in view.jobs]
        seen_workers += [w.worker_id for w in view.workers]
        page = view.next_page
    assert sorted(seen_jobs) == sorted(["j-now"] + [f"j-old{i}" for i in range(45)])
    assert sorted(seen_workers) == sorted(workers + [f"w-gone{i}" for i in range(30)])


def test_a_page_token_that_is_not_one_says_so(ledger: Ledger) -> None:
    from coordinator.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="page token"):
        status.Page.of("not a token")


def test_a_jobs_counters_follow_its_tasks_through_leases_expiry_failure_speculation_and_acceptance(
        ledger: Ledger) -> None:
    tasks = [TaskRecord(task_id=f"j-c-t{i}", job="j-c", index=i, tokens=10) for i in range(4)]
    ledger.jobs.create(JobRecord(job_id="j-c", name="c", config=CONFIG, total_tasks=4), tasks)
    now = time.time()
    fences = [ledger.leases.lease(t.task_id, now + 60, 0, max_attempts=1) for t in tasks]
    assert ledger.tasks.counts("j-c") == {"pending": 0, "leased": 4, "done": 0, "failed": 0}
    ledger.leases.release("j-c-t0", fences[0], "boom", max_attempts=1)  # no attempts left: failed
    ledger.r.zadd(keys.LEASES, {"j-c-t1": now - 1})
    ledger.leases.expire(now)  # back to pending
    twin, twin_fence = ledger.leases.speculate("j-c-t2", now + 60)
    assert ledger.tasks.twins_running("j-c") == 1
    assert ledger.adapters.accept(twin, twin_fence, "a" * 64, tokens=10).status == "accepted"  # both done
    assert ledger.tasks.counts("j-c") == {"pending": 1, "leased": 1, "done": 1, "failed": 1}
    assert ledger.tasks.twins_running("j-c") == 0
    consistency.check(ledger)


def test_a_job_recorded_before_the_counters_is_counted_once_from_its_tasks(ledger: Ledger) -> None:
    tasks = [TaskRecord(task_id=f"j-l-t{i}", job="j-l", index=i, tokens=10) for i in range(3)]
    ledger.jobs.create(JobRecord(job_id="j-l", name="l", config=CONFIG, total_tasks=3), tasks)
    ledger.leases.lease("j-l-t0", time.time() + 60, 0, max_attempts=3)
    for t in tasks:  # as a ledger written before the counters holds it
        ledger.r.hdel(keys.task(t.task_id), "counted")
    ledger.r.hdel(keys.job("j-l"), "counted", "tasks:pending", "tasks:leased")
    ledger.r.delete(keys.COUNTERS)
    ledger.index()
    assert ledger.tasks.counts("j-l") == {"pending": 2, "leased": 1, "done": 0, "failed": 0}
    assert ledger.counters.totals()["tasks:pending"] == 2
    consistency.check(ledger)


def test_an_outbound_volunteer_stays_outbound_after_its_runs(ledger: Ledger, tmp_path) -> None:
    # The outbound dispatcher records a node id of its own ("outbound:<worker>") with every finished
    # run; the worker's kind is still the one it registered as (it showed as "ray" after a run).
    settings = Settings(data_dir=tmp_path)
    public = registration.register(ledger, settings, None, registration.Registration("", "home", "", CARD, "card", 12.0))
    trusted = registration.register(ledger, settings, None,
                                    registration.Registration("", "lab", "node-1", CARD, "card", 12.0))
    ledger.workers.record_run(public, "outbound:" + public, tokens=100, seconds=1.0)
    ledger.workers.record_run(trusted, "node-2", tokens=100, seconds=1.0)
    kinds = {w.worker_id: w.kind for w in status.overview(ledger, settings).workers}
    assert kinds == {public: "outbound", trusted: "ray"}
    snapshot = dashboard.to_json(dashboard.snapshot(ledger, replace(settings)))
    assert {w["worker_id"]: w["kind"] for w in snapshot["workers"]} == kinds


def round_trips_of_a_round(ledger: Ledger, tmp_path, volunteers: int) -> tuple[int, int]:
    """(round trips, runs placed) of one scheduler round that gives each of ``volunteers`` free
    outbound volunteers a run."""
    ledger.r.flushdb()
    ledger.versions.publish(VersionRecord(version=0, parent=-1))
    settings = Settings(data_dir=tmp_path, speculate=False, max_units_per_run=1)
    scheduler = Scheduler(settings, ledger, OutboundDispatcher(ledger), "token", lambda config: Need(1.0))
    warm = [TaskRecord(task_id="j-warm-t0", job="j-warm", tokens=10)]
    ledger.jobs.create(JobRecord(job_id="j-warm", name="warm", config=CONFIG, total_tasks=1), warm)
    ledger.workers.register("w-warm", name="warm", card=CARD, token="t")
    ledger.inbox.seen("w-warm")
    scheduler.tick()  # scripts loaded; the warm-up volunteer is busy from now on
    tasks = [TaskRecord(task_id=f"j-r-t{i}", job="j-r", index=i, tokens=10) for i in range(volunteers)]
    ledger.jobs.create(JobRecord(job_id="j-r", name="r", config=CONFIG, total_tasks=volunteers), tasks)
    for i in range(volunteers):
        ledger.workers.register(f"w-{i:03d}", name=f"v{i}", card=CARD, token="t")
        ledger.inbox.seen(f"w-{i:03d}")
    scheduler.dispatcher.nodes()  # (the cards' cache warmed, as a running scheduler's is)
    before, placed = CountingConnection.sent, len(scheduler.runs)
    scheduler.tick()
    return CountingConnection.sent - before, len(scheduler.runs) - placed


def test_a_rounds_leases_and_hand_offs_take_the_same_few_round_trips_for_four_runs_or_forty(
        counted: Ledger, tmp_path) -> None:
    few, placed_few = round_trips_of_a_round(counted, tmp_path, 4)
    many, placed_many = round_trips_of_a_round(counted, tmp_path, 40)
    assert (placed_few, placed_many) == (4, 40)
    assert many == few, (few, many)
    assert {len(counted.r.lrange(keys.inbox(f"w-{i:03d}"), 0, -1)) for i in range(40)} == {1}
