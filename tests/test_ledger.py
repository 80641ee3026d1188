"""The ledger's guarantees, against a real redis-server: leases, fences, idempotent uploads,
atomic publication."""

from __future__ import annotations

import threading
import time

import pytest

from coordinator.ledger import (
    Claim,
    AdapterState,
    JobConfig,
    JobRecord,
    JobState,
    Ledger,
    TaskRecord,
    TaskState,
    VersionRecord,
    adapter_id_for,
)

CONFIG = JobConfig(lora_rank=4, lora_alpha=8.0, target_modules=("q_proj",), seq_len=64, learning_rate=1e-3,
                   batch_size=2, epochs=1, tokens_per_task=100)


def make_job(ledger: Ledger, n_tasks: int = 3, job_id: str = "j-test", tokens: int = 10) -> list[str]:
    tasks = [TaskRecord(task_id=f"{job_id}-t{i}", job=job_id, index=i, start=i, end=i + 1, tokens=tokens)
             for i in range(n_tasks)]
    ledger.jobs.create(JobRecord(job_id=job_id, name="test", config=CONFIG, total_tasks=n_tasks), tasks)
    return [t.task_id for t in tasks]


def accept(ledger: Ledger, task_id: str, fence: int, sha: str = "a" * 64):
    return ledger.adapters.accept(task_id, fence, sha, tokens=10, base_version=0)


def publish_versions(ledger: Ledger, upto: int) -> None:
    first = (ledger.versions.latest() if ledger.versions.latest() is not None else -1) + 1
    for n in range(first, upto + 1):
        ledger.versions.publish(VersionRecord(version=n, parent=n - 1))


def test_new_job_tasks_are_pending_in_order(ledger):
    ids = make_job(ledger)
    assert ledger.leases.pending() == ids
    assert ledger.tasks.counts("j-test") == {"pending": 3, "leased": 0, "done": 0, "failed": 0}
    job = ledger.jobs.get("j-test")
    assert job.state is JobState.RUNNING and job.config == CONFIG and job.total_tasks == 3
    assert [t.task_id for t in ledger.tasks.of_job("j-test")] == ids


def test_fences_strictly_increase_and_lease_once(ledger):
    a, b, _ = make_job(ledger)
    f1 = ledger.leases.lease(a, time.time() + 60, 0, max_attempts=3)
    f2 = ledger.leases.lease(b, time.time() + 60, 0, max_attempts=3)
    assert 0 < f1 < f2
    assert ledger.leases.lease(a, time.time() + 60, 0, max_attempts=3) == 0  # already leased
    assert ledger.tasks.get(a).state == "leased"
    assert a not in ledger.leases.pending()


def test_concurrent_leasing_gives_each_task_to_one_caller(ledger):
    ids = make_job(ledger, n_tasks=20)
    won: list[tuple[str, int]] = []
    lock = threading.Lock()

    def grab():
        for task_id in ids:
            fence = ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=3)
            if fence > 0:
                with lock:
                    won.append((task_id, fence))

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(t for t, _ in won) == sorted(ids)
    assert len({f for _, f in won}) == len(ids)


def test_expired_lease_is_reissued_with_new_fence_and_old_fence_refused(ledger):
    (task_id,) = make_job(ledger, n_tasks=1)
    old = ledger.leases.lease(task_id, time.time() + 0.01, 0, max_attempts=3)
    assert ledger.leases.expire(now=time.time() + 1) == [task_id]
    assert ledger.tasks.get(task_id).state == "pending"
    new = ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=3)
    assert new > old
    assert "stale fence" in ledger.leases.heartbeat(task_id, old, time.time() + 60).reason
    refused = accept(ledger, task_id, old)
    assert refused.status == "refused" and "fence" in refused.detail
    assert accept(ledger, task_id, new).status == "accepted"


def test_heartbeat_extends_only_the_current_lease(ledger):
    (task_id,) = make_job(ledger, n_tasks=1)
    fence = ledger.leases.lease(task_id, time.time() + 1, 0, max_attempts=3)
    assert ledger.leases.heartbeat(task_id, fence, time.time() + 100).ok
    assert ledger.leases.expire(now=time.time() + 50) == []
    assert ledger.tasks.get(task_id).state == "leased"


def test_upload_is_idempotent_per_task_fence_sha(ledger):
    (task_id,) = make_job(ledger, n_tasks=1)
    fence = ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=3)
    first = accept(ledger, task_id, fence)
    again = accept(ledger, task_id, fence)
    other = accept(ledger, task_id, fence, sha="b" * 64)
    assert first.status == "accepted" and again.status == "duplicate"
    assert first.detail == again.detail == adapter_id_for(task_id, fence, "a" * 64)
    assert other.status == "refused"
    assert [a.adapter_id for a in ledger.adapters.buffered()] == [first.detail]
    assert ledger.tasks.get(task_id).state == "done"


def test_release_retries_then_fails(ledger):
    (task_id,) = make_job(ledger, n_tasks=1)
    for attempt in range(1, 3):
        fence = ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=2)
        assert fence > 0
        state = ledger.leases.release(task_id, fence, f"boom {attempt}", max_attempts=2)
    assert state is TaskState.FAILED
    assert ledger.tasks.get(task_id).error == "boom 2"
    assert ledger.leases.release(task_id, fence, "late", max_attempts=2) is None  # not leased any more


def test_a_requeued_unit_gets_its_attempt_back_and_a_requeued_twin_is_retired(ledger):
    task_id, other = make_job(ledger, n_tasks=2)
    fence = ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=1)
    assert ledger.leases.requeue(task_id, fence + 1, "its run was stopped") is None  # not its lease
    assert ledger.leases.requeue(task_id, fence, "its run was stopped") is TaskState.PENDING
    task = ledger.tasks.get(task_id)
    assert (task.state, task.attempts, task.error) == ("pending", 0, "its run was stopped")
    assert task_id in ledger.leases.pending() and not ledger.leases.leased()
    assert ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=1) > fence  # one attempt left
    ledger.leases.lease(other, time.time() + 60, 0, max_attempts=1)
    twin, twin_fence = ledger.leases.speculate(other, time.time() + 60)
    assert ledger.leases.requeue(twin, twin_fence, "its run was stopped") is TaskState.FAILED
    assert twin not in ledger.leases.pending() and ledger.tasks.get(other).state == "leased"


def test_an_expired_lease_gives_its_attempt_back(ledger):
    """Abandoning a lease is its holder's failing (the scheduler charges the holder's trust), not
    the task's: any number of expiries spend no attempt."""
    (task_id,) = make_job(ledger, n_tasks=1)
    for _ in range(3):
        assert ledger.leases.lease(task_id, time.time() + 0.01, 0, max_attempts=1, worker_id="w-1") > 0
        assert ledger.leases.expire(now=time.time() + 1) == [task_id]
        task = ledger.tasks.get(task_id)
        assert (task.state, task.attempts, task.holder_worker) == ("pending", 0, "w-1")


def test_lease_refuses_a_task_out_of_attempts(ledger):
    (task_id,) = make_job(ledger, n_tasks=1)
    fence = ledger.leases.lease(task_id, time.time() + 0.01, 0, max_attempts=1)
    assert ledger.leases.release(task_id, fence, "it failed", max_attempts=5) is TaskState.PENDING
    assert ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=1) == -1
    assert ledger.tasks.get(task_id).state == "failed"
    assert fence > 0


def test_publish_is_atomic_and_sequential(ledger):
    a, b = make_job(ledger, n_tasks=2)
    ids = []
    for task_id, sha in ((a, "a" * 64), (b, "b" * 64)):  # two tasks' adapters: bytes of their own
        fence = ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=3)
        ids.append(accept(ledger, task_id, fence, sha).detail)
    ledger.versions.publish(VersionRecord(version=0, parent=-1))
    with pytest.raises(ValueError, match="next version is 1"):
        ledger.versions.publish(VersionRecord(version=2, parent=0))
    ledger.versions.publish(VersionRecord(version=1, parent=0, eval_loss=1.5), folded=[(ids[0], 0.5)], norms=[2.0])
    assert ledger.versions.latest() == 1
    assert [a.adapter_id for a in ledger.adapters.buffered()] == [ids[1]]
    assert ledger.adapters.get(ids[0]).state == "folded"
    assert ledger.adapters.get(ids[0]).version == 1 and ledger.adapters.get(ids[0]).weight == 0.5
    assert ledger.jobs.get("j-test").adapters_folded == 1
    assert ledger.versions.get(1).parent == 0 and ledger.versions.get(1).eval_loss == 1.5
    assert ledger.adapters.recent_norms() == [2.0]
    # A second coordinator trying to publish the same number loses.
    with pytest.raises(ValueError):
        ledger.versions.publish(VersionRecord(version=1, parent=0), folded=[(ids[1], 0.5)])
    assert [a.adapter_id for a in ledger.adapters.buffered()] == [ids[1]]


def test_rejected_adapter_leaves_the_buffer_with_its_reason(ledger):
    (task_id,) = make_job(ledger, n_tasks=1)
    fence = ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=3)
    adapter_id = accept(ledger, task_id, fence).detail
    ledger.adapters.reject(adapter_id, "too large a norm")
    assert ledger.adapters.buffered() == []
    assert ledger.adapters.get(adapter_id).reason == "too large a norm"
    assert ledger.adapters.get(adapter_id).state is AdapterState.REJECTED
    assert ledger.jobs.get("j-test").adapters_rejected == 1


def test_state_survives_a_redis_restart(redis_server, tmp_path):
    from coordinator.ledger.redis_server import EmbeddedRedis
    from coordinator.server import redis_client

    server = EmbeddedRedis(tmp_path / "r")
    ledger = Ledger(redis_client(server.start()))
    (task_id,) = make_job(ledger, n_tasks=1)
    fence = ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=3)
    ledger.r.execute_command("BGREWRITEAOF")
    time.sleep(1.2)  # appendfsync everysec
    server.stop()
    server.start()
    assert ledger.tasks.get(task_id).state == "leased"  # the client reconnects by itself
    assert ledger.leases.problem(task_id, fence) == ""
    server.stop()


def test_restart_gives_every_lease_one_ttl_and_heartbeats_keep_them(ledger):
    a, b = make_job(ledger, n_tasks=2)
    fa = ledger.leases.lease(a, time.time() + 900, 0, max_attempts=3)
    ledger.leases.lease(b, time.time() - 100, 0, max_attempts=3)  # ran out while the coordinator was down
    assert ledger.leases.reset(time.time() + 5) == 2
    assert ledger.leases.expire(now=time.time()) == []  # nobody lost a lease to the downtime
    assert ledger.leases.heartbeat(a, fa, time.time() + 100).ok  # a live worker renews its lease
    assert ledger.leases.expire(now=time.time() + 10) == [b]
    assert ledger.tasks.get(a).state == "leased" and ledger.tasks.get(b).state == "pending"


def test_first_claim_fixes_the_version_a_run_trains_on(ledger):
    (task_id,) = make_job(ledger, n_tasks=1)
    fence = ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=3)
    publish_versions(ledger, 3)
    assert ledger.leases.heartbeat(task_id, fence, time.time() + 60).base_version == 3  # newest at the start
    publish_versions(ledger, 5)
    assert ledger.leases.heartbeat(task_id, fence, time.time() + 60).base_version == 3  # later ones keep it
    stale = ledger.leases.heartbeat(task_id, fence + 1, time.time() + 60)
    assert not stale.ok and stale.base_version == -1
    ledger.leases.expire(now=time.time() + 100)
    new = ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=3)
    assert ledger.leases.heartbeat(task_id, new, time.time() + 60).base_version == 5  # a new lease is a new run


def test_running_jobs_index_follows_job_state_and_can_be_rebuilt(ledger):
    for job_id in ("j-a", "j-b", "j-c"):
        make_job(ledger, 1, job_id)
    assert ledger.jobs.running_ids() == ["j-a", "j-b", "j-c"]
    ledger.jobs.finish("j-b", JobState.DONE)
    ledger.jobs.set_warning("j-a", "waiting for a bigger card")  # not a state change
    ledger.jobs.finish("j-c", JobState.FAILED, "every task failed")
    assert ledger.jobs.running_ids() == ["j-a"]
    assert ledger.jobs.get("j-c").error == "every task failed" and ledger.jobs.get("j-a").warning
    assert ledger.jobs.ids() == ["j-a", "j-b", "j-c"]  # the finished ones are still listed
    # A ledger written before the index existed: rebuilt from the job records at start.
    ledger.r.delete("nomoat:jobs:running")
    make_job(ledger, 1, "j-d")
    ledger.r.zrem("nomoat:jobs:running", "j-d")
    assert ledger.jobs.index_running() == 2
    assert ledger.jobs.running_ids() == ["j-a", "j-d"]


def test_a_heartbeat_under_a_lost_lease_changes_nothing_and_claims_no_version(ledger):
    """Bug 5: the heartbeat is one step; a stale fence neither extends, notes nor claims."""
    (task_id,) = make_job(ledger, n_tasks=1)
    publish_versions(ledger, 2)
    old = ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=3, worker_id="w-1", secret="a" * 32)
    ledger.leases.expire(now=time.time() + 100)
    new = ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=3)
    before = ledger.tasks.get(task_id)
    lost = ledger.leases.heartbeat(task_id, old, time.time() + 600, "w-1", Claim("w-1", "a" * 32), event="still training")
    assert not lost.ok and "holds no lease" in lost.reason and lost.base_version == -1
    assert ledger.tasks.get(task_id) == before  # no deadline, holder, event or claimed version
    publish_versions(ledger, 3)
    assert ledger.leases.heartbeat(task_id, new, time.time() + 60, event="started").base_version == 3
    assert [e for _, e in ledger.tasks.get(task_id).events] == ["started"]


def test_records_are_typed_and_states_print_as_before(ledger):
    (task_id,) = make_job(ledger, n_tasks=1, tokens=1234)
    task = ledger.tasks.get(task_id)
    assert (task.tokens, task.fence, task.state, task.events) == (1234, 0, TaskState.PENDING, ())
    assert str(task.state) == f"{task.state}" == "pending" and task.state == "pending"
    fence = ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=3)
    adapter = ledger.adapters.get(accept(ledger, task_id, fence).detail)
    assert (adapter.task, adapter.fence, adapter.tokens, adapter.state) == (task_id, fence, 10, AdapterState.BUFFERED)
    assert ledger.tasks.get(task_id).adapter == adapter.adapter_id


# -- the scheduler sizes runs from the speeds the ledger holds (bug 6) -----------------------------


def test_a_restarted_scheduler_sizes_a_fast_cards_run_from_the_speed_the_ledger_holds(ledger, tmp_path):
    from coordinator.schedule.scheduler import Scheduler
    from coordinator.schedule.transport import Need
    from coordinator.settings import Settings
    from tests.fakes import FakeCard, FakeDispatcher

    fast = FakeCard("node-fast", 24.0, 400.0)
    settings = Settings(data_dir=tmp_path, target_task_seconds=10.0, max_units_per_run=8, speculate=False)
    tasks = make_job(ledger, n_tasks=10, tokens=100)
    ledger.versions.publish(VersionRecord(version=0, parent=-1))
    ledger.workers.register(fast.worker_id, name="fast", card=b"", token="t")

    def scheduler(dispatcher: FakeDispatcher) -> Scheduler:
        return Scheduler(settings, ledger, dispatcher, "token", lambda config: Need(4.0))

    def upload(spec, worker_id: str) -> str:  # the run's upload, accepted (the speed is measured from that)
        return "" if ledger.adapters.accept(spec.task_id, spec.fence, "0" * 64, worker_id=worker_id).ok else "refused"

    first = FakeDispatcher([fast], upload=upload)
    before = scheduler(first)
    before.tick(first.now)
    assert [len(r.specs) for r in first.submitted] == [1]  # a stranger: one unit
    first.advance(0.25)  # 100 tokens at 400 tokens/s, seen by the next round
    before.tick(first.now)
    assert ledger.workers.get(fast.worker_id).tokens_per_s == pytest.approx(400.0)
    # The coordinator restarts: a new scheduler over the same ledger and cluster.
    again = FakeDispatcher([fast], start=first.now)
    ledger.leases.expire(now=first.now + 10**6)  # the runs before the restart are gone
    scheduler(again).tick(again.now)
    # 400 tokens/s x 10 s over 100-token units: 8 units (the most a run takes), not 1.
    assert [len(r.specs) for r in again.submitted] == [8] and again.submitted[0].card == fast
    assert set(again.submitted[0].task_ids) <= set(tasks)


def test_a_jobs_noise_estimate_takes_samples_as_noise_scale_add_does_even_at_once(ledger):
    """add_noise is NoiseScale.add as one script: the same estimate, and none lost to uploads
    landing at once (a WATCH on the job's hash used to retry under them)."""
    from coordinator.schedule.noise import NoiseScale, Sample

    make_job(ledger)
    samples = [Sample(5.0, 2.0, 2, 8), Sample(3.0, 1.5, 2, 8), Sample(float("nan"), 1.0, 2, 8)]  # the last unusable
    expected = NoiseScale()
    for sample in samples:
        got = ledger.jobs.add_noise("j-test", sample)
        expected = expected.add(sample)
        assert got.samples == expected.samples
        assert got.g2 == pytest.approx(expected.g2, rel=1e-12) and got.trace == pytest.approx(expected.trace, rel=1e-12)
    assert ledger.jobs.noise("j-test") == got
    threads = [threading.Thread(target=lambda: [ledger.jobs.add_noise("j-test", samples[0]) for _ in range(25)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.jobs.noise("j-test").samples == expected.samples + 100
