"""The ledger's guarantees, against a real redis-server: leases, fences, idempotent uploads,
atomic publication."""

from __future__ import annotations

import threading
import time

import pytest

from coordinator.ledger import Ledger, adapter_id_for


def make_job(ledger: Ledger, n_tasks: int = 3, job_id: str = "j-test") -> list[str]:
    tasks = [{"task_id": f"{job_id}-t{i}", "index": i, "start": i, "end": i + 1, "tokens": 10}
             for i in range(n_tasks)]
    ledger.create_job(job_id, {"name": "test", "config": {"lora_rank": 4}, "total_tasks": n_tasks}, tasks)
    return [t["task_id"] for t in tasks]


def accept(ledger: Ledger, task_id: str, fence: int, sha: str = "a" * 64):
    return ledger.accept_upload(task_id, fence, sha, {"tokens": 10, "base_version": 0}, worker_id="")


def test_new_job_tasks_are_pending_in_order(ledger):
    ids = make_job(ledger)
    assert ledger.pending() == ids
    assert ledger.task_counts("j-test") == {"pending": 3, "leased": 0, "done": 0, "failed": 0}
    assert ledger.job("j-test")["state"] == "running"


def test_fences_strictly_increase_and_lease_once(ledger):
    a, b, _ = make_job(ledger)
    f1 = ledger.lease(a, time.time() + 60, 0, max_attempts=3)
    f2 = ledger.lease(b, time.time() + 60, 0, max_attempts=3)
    assert 0 < f1 < f2
    assert ledger.lease(a, time.time() + 60, 0, max_attempts=3) == 0  # already leased
    assert ledger.task(a)["state"] == "leased"
    assert a not in ledger.pending()


def test_concurrent_leasing_gives_each_task_to_one_caller(ledger):
    ids = make_job(ledger, n_tasks=20)
    won: list[tuple[str, int]] = []
    lock = threading.Lock()

    def grab():
        for task_id in ids:
            fence = ledger.lease(task_id, time.time() + 60, 0, max_attempts=3)
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
    old = ledger.lease(task_id, time.time() + 0.01, 0, max_attempts=3)
    assert ledger.expire_leases(now=time.time() + 1) == [task_id]
    assert ledger.task(task_id)["state"] == "pending"
    new = ledger.lease(task_id, time.time() + 60, 0, max_attempts=3)
    assert new > old
    assert "stale fence" in ledger.heartbeat(task_id, old, time.time() + 60)
    refused = accept(ledger, task_id, old)
    assert refused.status == "refused" and "fence" in refused.detail
    assert accept(ledger, task_id, new).status == "accepted"


def test_heartbeat_extends_only_the_current_lease(ledger):
    (task_id,) = make_job(ledger, n_tasks=1)
    fence = ledger.lease(task_id, time.time() + 1, 0, max_attempts=3)
    assert ledger.heartbeat(task_id, fence, time.time() + 100) == ""
    assert ledger.expire_leases(now=time.time() + 50) == []
    assert ledger.task(task_id)["state"] == "leased"


def test_upload_is_idempotent_per_task_fence_sha(ledger):
    (task_id,) = make_job(ledger, n_tasks=1)
    fence = ledger.lease(task_id, time.time() + 60, 0, max_attempts=3)
    first = accept(ledger, task_id, fence)
    again = accept(ledger, task_id, fence)
    other = accept(ledger, task_id, fence, sha="b" * 64)
    assert first.status == "accepted" and again.status == "duplicate"
    assert first.detail == again.detail == adapter_id_for(task_id, fence, "a" * 64)
    assert other.status == "refused"
    assert [a["adapter_id"] for a in ledger.buffered()] == [first.detail]
    assert ledger.task(task_id)["state"] == "done"


def test_release_retries_then_fails(ledger):
    (task_id,) = make_job(ledger, n_tasks=1)
    for attempt in range(1, 3):
        fence = ledger.lease(task_id, time.time() + 60, 0, max_attempts=2)
        assert fence > 0
        state = ledger.release(task_id, fence, f"boom {attempt}", max_attempts=2)
    assert state == "failed"
    assert ledger.task(task_id)["error"] == "boom 2"
    assert ledger.release(task_id, fence, "late", max_attempts=2) == ""  # not leased any more


def test_lease_refuses_a_task_out_of_attempts(ledger):
    (task_id,) = make_job(ledger, n_tasks=1)
    fence = ledger.lease(task_id, time.time() + 0.01, 0, max_attempts=1)
    ledger.expire_leases(now=time.time() + 1)
    assert ledger.lease(task_id, time.time() + 60, 0, max_attempts=1) == -1
    assert ledger.task(task_id)["state"] == "failed"
    assert fence > 0


def test_publish_is_atomic_and_sequential(ledger):
    a, b = make_job(ledger, n_tasks=2)
    ids = []
    for task_id in (a, b):
        fence = ledger.lease(task_id, time.time() + 60, 0, max_attempts=3)
        ids.append(accept(ledger, task_id, fence).detail)
    ledger.publish_version(0, {"parent": -1, "files": {}, "eval_loss": "nan"})
    with pytest.raises(ValueError, match="next version is 1"):
        ledger.publish_version(2, {"parent": 0, "files": {}})
    ledger.publish_version(1, {"parent": 0, "files": {}, "eval_loss": 1.5}, folded=[(ids[0], 0.5)], norms=[2.0])
    assert ledger.latest_version() == 1
    assert [a["adapter_id"] for a in ledger.buffered()] == [ids[1]]
    assert ledger.adapter(ids[0])["state"] == "folded"
    assert ledger.job("j-test")["adapters_folded"] == "1"
    assert ledger.version(1)["parent"] == 0 and ledger.version(1)["eval_loss"] == 1.5
    assert ledger.recent_norms() == [2.0]
    # A second coordinator trying to publish the same number loses.
    with pytest.raises(ValueError):
        ledger.publish_version(1, {"parent": 0, "files": {}}, folded=[(ids[1], 0.5)])
    assert [a["adapter_id"] for a in ledger.buffered()] == [ids[1]]


def test_rejected_adapter_leaves_the_buffer_with_its_reason(ledger):
    (task_id,) = make_job(ledger, n_tasks=1)
    fence = ledger.lease(task_id, time.time() + 60, 0, max_attempts=3)
    adapter_id = accept(ledger, task_id, fence).detail
    ledger.reject_adapter(adapter_id, "too large a norm")
    assert ledger.buffered() == []
    assert ledger.adapter(adapter_id)["reason"] == "too large a norm"
    assert ledger.job("j-test")["adapters_rejected"] == "1"


def test_state_survives_a_redis_restart(redis_server, tmp_path):
    from coordinator.redis_server import EmbeddedRedis
    from coordinator.server import redis_client

    server = EmbeddedRedis(tmp_path / "r")
    ledger = Ledger(redis_client(server.start()))
    (task_id,) = make_job(ledger, n_tasks=1)
    fence = ledger.lease(task_id, time.time() + 60, 0, max_attempts=3)
    ledger.r.execute_command("BGREWRITEAOF")
    time.sleep(1.2)  # appendfsync everysec
    server.stop()
    server.start()
    assert ledger.task(task_id)["state"] == "leased"  # the client reconnects by itself
    assert ledger.lease_problem(task_id, fence) == ""
    server.stop()


def test_restart_gives_every_lease_one_ttl_and_heartbeats_keep_them(ledger):
    a, b = make_job(ledger, n_tasks=2)
    fa = ledger.lease(a, time.time() + 900, 0, max_attempts=3)
    ledger.lease(b, time.time() - 100, 0, max_attempts=3)  # ran out while the coordinator was down
    assert ledger.reset_leases(time.time() + 5) == 2
    assert ledger.expire_leases(now=time.time()) == []  # nobody lost a lease to the downtime
    assert ledger.heartbeat(a, fa, time.time() + 100) == ""  # a live worker renews its lease
    assert ledger.expire_leases(now=time.time() + 10) == [b]
    assert ledger.task(a)["state"] == "leased" and ledger.task(b)["state"] == "pending"


def test_first_claim_fixes_the_version_a_run_trains_on(ledger):
    (task_id,) = make_job(ledger, n_tasks=1)
    fence = ledger.lease(task_id, time.time() + 60, 0, max_attempts=3)
    assert ledger.claim(task_id, fence, 3) == 3  # the newest version when the run started
    assert ledger.claim(task_id, fence, 5) == 3  # later heartbeats do not move it
    assert ledger.claim(task_id, fence + 1, 5) == -1
    ledger.expire_leases(now=time.time() + 100)
    new = ledger.lease(task_id, time.time() + 60, 0, max_attempts=3)
    assert ledger.claim(task_id, new, 5) == 5  # a new lease is a new run


def test_running_jobs_index_follows_job_state_and_can_be_rebuilt(ledger):
    for job_id in ("j-a", "j-b", "j-c"):
        make_job(ledger, 1, job_id)
    assert ledger.running_job_ids() == ["j-a", "j-b", "j-c"]
    ledger.set_job("j-b", state="done", finished=time.time())
    ledger.set_job("j-a", warning="waiting for a bigger card")  # not a state change
    ledger.set_job("j-c", state="failed", error="every task failed")
    assert ledger.running_job_ids() == ["j-a"]
    assert ledger.job_ids() == ["j-a", "j-b", "j-c"]  # the finished ones are still listed
    # A ledger written before the index existed: rebuilt from the job records at start.
    ledger.r.delete("nomoat:jobs:running")
    make_job(ledger, 1, "j-d")
    ledger.r.zrem("nomoat:jobs:running", "j-d")
    assert ledger.index_running_jobs() == 2
    assert ledger.running_job_ids() == ["j-a", "j-d"]
