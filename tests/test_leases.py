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
from coordinator.errors import InvalidRequest, LimitReached, NotPermitted, WrongState
from tests.rig import Rig, published, rig, submit_job  # noqa: F401  (fixtures)


def identity(rig: Rig, role: str = "worker") -> Identity:
    return rig.registry.lookup(rig.tokens[role])


@pytest.fixture
def leased(rig: Rig) -> tuple[str, int]:
    task_id = rig.ledger.tasks.ids(submit_job(rig).job_id)[0]
    return task_id, rig.lease(task_id)


def test_admin_acts_for_any_worker_and_checks_no_token(rig: Rig) -> None:
    assert holder.holder(rig.ledger, identity(rig, "admin"), "w-1") == ("w-1", "")


def test_a_worker_id_registered_with_another_token_is_dropped(rig: Rig) -> None:
    alice = registration.register(rig.ledger, rig.deps.settings, identity(rig, "worker"),
                             registration.Registration("", "alice", "", b"", "card", 8.0))
    bob = Identity("worker", "bob", "b" * 64)
    assert holder.holder(rig.ledger, bob, alice) == ("", bob.token_hash)
    assert holder.holder(rig.ledger, identity(rig), alice) == (alice, identity(rig).token_hash)
    assert holder.holder(rig.ledger, bob, "w-unknown") == ("w-unknown", bob.token_hash)


def test_a_heartbeat_renews_the_lease_and_fixes_the_base_version(rig: Rig, leased) -> None:
    task_id, fence = leased
    before = time.time()
    beat = holder.heartbeat(rig.ledger, rig.deps.settings, identity(rig), "", task_id, fence,
                            "out of memory at micro-batch 8; retrying with 4")
    assert beat.ok and beat.reason == "" and beat.base_version == 0
    assert beat.deadline >= before + rig.deps.settings.lease_ttl_s
    assert [e for _, e in rig.ledger.tasks.get(task_id).events] == ["out of memory at micro-batch 8; retrying with 4"]


def test_a_heartbeat_for_a_stale_fence_is_answered_not_ok(rig: Rig, leased) -> None:
    task_id, fence = leased
    beat = holder.heartbeat(rig.ledger, rig.deps.settings, identity(rig), "", task_id, fence + 1)
    assert not beat.ok and beat.deadline == 0.0 and "fence" in beat.reason


def test_the_shard_is_the_tasks_records_for_its_holder_only(rig: Rig, leased) -> None:
    task_id, fence = leased
    task = rig.ledger.tasks.get(task_id)
    records = rig.store.get(rig.ledger.jobs.get(task.job).records).splitlines(keepends=True)
    shard = b"".join(holder.fetch_shard(rig.ledger, rig.store, identity(rig), task_id, fence))
    assert shard == b"".join(records[task.start : task.end])
    with pytest.raises(NotPermitted, match="another token holds its lease"):
        holder.fetch_shard(rig.ledger, rig.store, Identity("worker", "bob", "b" * 64), task_id, fence)
    with pytest.raises(WrongState, match=f"stale fence {fence + 1}"):
        holder.fetch_shard(rig.ledger, rig.store, identity(rig), task_id, fence + 1)


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
