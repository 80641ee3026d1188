"""Leases and workers called directly (no gRPC): who holds a lease, heartbeats, shards, joining.

The rig's real ledger and store; a test submits a small job with ``submit.receive`` (the same
function the Submit servicer calls) and leases its first task.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from coordinator.schedule import holder

from coordinator.schedule import registration
from coordinator.gateway.auth import Identity
from coordinator.errors import InvalidRequest, LimitReached, NotFound
from coordinator.ledger import Claim, keys
from tests.rig import SECRET, Rig, published, rig, submit_job  # noqa: F401  (fixtures)


def identity(rig: Rig, role: str = "worker") -> Identity:
    return rig.registry.lookup(rig.tokens[role])


@pytest.fixture
def leased(rig: Rig) -> tuple[str, int]:
    task_id = rig.ledger.tasks.ids(submit_job(rig).job_id)[0]
    return task_id, rig.lease(task_id)


def test_admin_makes_no_claim_and_a_worker_claims_only_for_workers_it_registered(rig: Rig) -> None:
    assert holder.claim_of(rig.ledger, identity(rig, "admin"), "w-1", "s") is None
    alice = registration.register(rig.ledger, rig.deps.settings, identity(rig, "worker"),
                                  registration.Registration("", "alice", "", b"", "card", 8.0))
    bob = Identity("worker", "bob", "b" * 64)
    assert holder.claim_of(rig.ledger, identity(rig), alice, "s") == Claim(alice, "s")
    assert holder.claim_of(rig.ledger, bob, alice, "s").worker_id != alice  # a name it may not use
    assert holder.claim_of(rig.ledger, bob, "w-unknown", "s").worker_id != "w-unknown"
    assert holder.claim_of(rig.ledger, bob, "", "s") == Claim("", "s")


def test_a_heartbeat_renews_the_lease_and_fixes_the_base_version(rig: Rig, leased) -> None:
    task_id, fence = leased
    before = time.time()
    beat = holder.heartbeat(rig.ledger, rig.deps.settings, identity(rig), "", task_id, fence,
                            "out of memory at micro-batch 8; retrying with 4", secret=SECRET)
    assert beat.ok and beat.reason == "" and beat.base_version == 0
    assert beat.deadline >= before + rig.deps.settings.lease_ttl_s
    assert [e for _, e in rig.ledger.tasks.get(task_id).events] == ["out of memory at micro-batch 8; retrying with 4"]


def test_a_heartbeat_for_a_stale_fence_or_without_the_secret_is_answered_not_ok(rig: Rig, leased) -> None:
    task_id, fence = leased
    for wrong_fence, secret in ((fence + 1, SECRET), (fence, ""), (fence, "x" * 32)):
        beat = holder.heartbeat(rig.ledger, rig.deps.settings, identity(rig), "", task_id, wrong_fence, secret=secret)
        assert not beat.ok and beat.deadline == 0.0
        assert beat.reason == f"this worker holds no lease of task {task_id} under fence {wrong_fence}"


def test_the_shard_is_the_tasks_records_for_its_holder_only(rig: Rig, leased) -> None:
    task_id, fence = leased
    task = rig.ledger.tasks.get(task_id)
    records = rig.store.get(rig.ledger.jobs.get(task.job).records).splitlines(keepends=True)
    shard = b"".join(holder.fetch_shard(rig.ledger, rig.store, identity(rig), task_id, fence, secret=SECRET))
    assert shard == b"".join(records[task.start : task.end])
    with pytest.raises(NotFound, match=f"holds no lease of task {task_id} under fence {fence}$"):
        holder.fetch_shard(rig.ledger, rig.store, Identity("worker", "bob", "b" * 64), task_id, fence)
    with pytest.raises(NotFound, match=f"holds no lease of task {task_id} under fence {fence + 1}$"):
        holder.fetch_shard(rig.ledger, rig.store, identity(rig), task_id, fence + 1, secret=SECRET)


def test_a_lease_placed_on_a_worker_is_held_by_that_worker_with_its_secret(rig: Rig) -> None:
    """The ledger's own check (one Lua function): the worker the lease was placed on and the
    secret it was granted with, both; the coordinator's unchecked calls still see it leased."""
    alice = registration.register(rig.ledger, rig.deps.settings, identity(rig), registration.Registration(
        "", "alice", "", b"", "card", 8.0))
    task_id = rig.ledger.tasks.ids(submit_job(rig).job_id)[0]
    fence = rig.lease(task_id, worker_id=alice, secret="s" * 32)
    leases = rig.ledger.leases
    assert leases.problem(task_id, fence, Claim(alice, "s" * 32)) == ""
    assert leases.problem(task_id, fence) == ""
    for claim in (Claim("", "s" * 32), Claim("w-other", "s" * 32), Claim(alice, ""), Claim(alice, "t" * 32)):
        assert leases.problem(task_id, fence, claim) == f"this worker holds no lease of task {task_id} under fence {fence}"
    # Redis keeps the secret's hash, never the secret.
    assert "s" * 32 not in str(rig.ledger.r.hgetall(keys.task(task_id)))


def test_registration_checks_its_names_and_the_tokens_worker_limit(rig: Rig) -> None:
    settings = replace(rig.deps.settings, max_workers_per_token=1)
    joining = registration.Registration("", "w", "node", b"", "card", 8.0)
    with pytest.raises(InvalidRequest, match="a worker needs a name"):
        registration.register(rig.ledger, settings, identity(rig), replace(joining, name=""))
    with pytest.raises(InvalidRequest, match="a worker id is at most 64"):
        registration.register(rig.ledger, settings, identity(rig), replace(joining, worker_id="x" * 65))
    first = registration.register(rig.ledger, settings, identity(rig), joining)
    assert registration.register(rig.ledger, settings, identity(rig), replace(joining, worker_id=first)) == first
    with pytest.raises(LimitReached, match="this token already has 1 active workers"):
        registration.register(rig.ledger, settings, identity(rig), joining)
