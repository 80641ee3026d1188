"""An admin's rollback or unmerge goes through the folding leader (coordinator.ledger.operations,
coordinator.fold.rollback.carry_out), against a real redis-server: the gateway that received it
queues it and waits, the leader carries it out under its fence, and a process that no longer
leads the folder cannot publish it (so it never interleaves with another process's fold)."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import pytest
import torch

from coordinator.errors import Unavailable, WrongState
from coordinator.fold import rollback
from coordinator.gateway import admin
from coordinator.ledger import Ledger, keys
from coordinator.ledger.leaders import Leadership, NotLeader
from tests import consistency
from tests.test_history import Rig
from tests.test_leaders import LONG, lapse, pair, two_folders  # noqa: F401  (fixture)

WAIT_S = 120.0  # the gateway's patience in these tests: never reached when they pass


@pytest.fixture
def gateway() -> Iterator[concurrent.futures.Executor]:
    """A thread for the gateway's side of a call (it blocks until the folder answers)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield pool


def folded_once(rig: Rig) -> str:
    """Version 1, folded from two adapters; returns the first adapter's id."""
    first = rig.offer(rig.adapter())
    rig.offer(rig.adapter())
    assert rig.folder.maybe_fold(set()) == 1
    return first


def asked(ledger: Ledger, gateway: concurrent.futures.Executor, call, *args) -> concurrent.futures.Future:
    """``call(ledger, *args)`` on the gateway's thread, returned once its request waits in the ledger."""
    future = gateway.submit(call, ledger, *args, wait_s=WAIT_S)
    deadline = time.monotonic() + 30
    while ledger.operations.waiting() == 0:
        assert not future.done(), future.exception()
        assert time.monotonic() < deadline, "the request never reached the ledger"
        time.sleep(0.02)
    return future


def same_weights(rig: Rig, folder, version: int) -> bool:
    rebuilt = rig.history.rebuild(version).master(list(rig.targets))
    return all(torch.equal(folder.model.master([m])[m], w) for m, w in rebuilt.items())


def test_a_rollback_asked_at_a_gateway_is_published_by_the_folding_leader_under_its_fence(
        ledger: Ledger, tmp_path, gateway) -> None:
    rig = Rig(ledger, tmp_path)
    folded_once(rig)
    fence = Leadership(ledger.r, "folder", LONG, holder="folder").campaign()
    waiting = asked(ledger, gateway, admin.rollback, 0)
    assert rollback.carry_out(rig.folder, ledger.operations, fence) == 1
    number, _ = waiting.result(timeout=60)
    assert number == 2 and ledger.versions.get(2).operation == "rollback"
    assert int(ledger.r.hget(keys.version(2), "leader_fence")) == fence.number  # published under the fence
    assert same_weights(rig, rig.folder, 0)
    consistency.check(ledger)


def test_an_unmerge_the_history_does_not_allow_is_refused_with_the_folders_sentence(
        ledger: Ledger, tmp_path, gateway) -> None:
    rig = Rig(ledger, tmp_path)
    first = folded_once(rig)
    fence = Leadership(ledger.r, "folder", LONG, holder="folder").campaign()
    waiting = asked(ledger, gateway, admin.unmerge, "a-no-such-adapter")
    rollback.carry_out(rig.folder, ledger.operations, fence)
    with pytest.raises(WrongState, match="only a folded adapter can be unmerged"):
        waiting.result(timeout=60)
    waiting = asked(ledger, gateway, admin.unmerge, first)
    rollback.carry_out(rig.folder, ledger.operations, fence)
    assert waiting.result(timeout=60)[0] == 2 and ledger.adapters.get(first).state == "unmerged"


def test_a_folder_that_lost_its_lease_cannot_publish_a_rollback(two_folders, gateway) -> None:  # noqa: F811
    rig, other = two_folders
    ledger = rig.ledger
    folded_once(rig)
    old, new = pair(ledger, "folder")
    stale = old.campaign()  # then paused past its lease: another process leads the folder now
    lapse(old)
    current = new.campaign()
    waiting = asked(ledger, gateway, admin.rollback, 0)
    with pytest.raises(NotLeader):
        rollback.carry_out(rig.folder, ledger.operations, stale)
    with pytest.raises(Unavailable, match="stopped leading before it published"):
        waiting.result(timeout=60)
    assert ledger.versions.latest() == 1  # nothing was published by the stale process
    assert rig.folder.version == 1 and same_weights(rig, rig.folder, 1)  # and its model is back in step
    # The leader carries out the same request asked again, on the ledger's newest version.
    waiting = asked(ledger, gateway, admin.rollback, 0)
    assert rollback.carry_out(other, ledger.operations, current) == 1
    assert waiting.result(timeout=60)[0] == 2
    assert int(ledger.r.hget(keys.version(2), "leader_fence")) == current.number
    assert same_weights(rig, other, 0)
    consistency.check(ledger)


def test_with_no_folder_leading_the_gateway_says_so_at_once_and_leaves_nothing_queued(ledger: Ledger) -> None:
    with pytest.raises(Unavailable, match="no process leads the folder"):
        admin.rollback(ledger, 0, wait_s=WAIT_S)
    assert ledger.operations.waiting() == 0


def test_a_request_its_gateway_gave_up_on_is_dropped_not_carried_out(ledger: Ledger, tmp_path) -> None:
    rig = Rig(ledger, tmp_path)
    folded_once(rig)
    fence = Leadership(ledger.r, "folder", LONG, holder="folder").campaign()
    ledger.operations.ask("rollback", "0", deadline=time.time() - 1)
    assert rollback.carry_out(rig.folder, ledger.operations, fence) == 0
    assert ledger.versions.latest() == 1 and ledger.operations.waiting() == 0
