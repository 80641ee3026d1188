"""Retention and the sweeper (coordinator/model/retention.py) on the real tiny model: a long run
stays bounded, and nothing a version, a running job or a rollback needs is ever deleted (every
kept version is rebuilt exactly after the sweep; rollback and unmerge still work)."""

from __future__ import annotations

import time

import pytest
import torch

from coordinator.ledger.records import JobState
from coordinator.model import pull, retention
from coordinator.model.retention import Policy, plan_folders
from coordinator.observe import status
from tests.test_history import Rig

POLICY = Policy(keep_versions=2, snapshot_every=4, keep_days=0.0, grace_s=0.0)


def test_the_policy_keeps_version_0_every_kth_rollbacks_and_the_newest() -> None:
    snaps = [(v, "rollback" if v == 7 else "") for v in range(0, 13)]
    assert plan_folders(Policy(keep_versions=2, snapshot_every=4), 12, snaps) == [1, 2, 3, 5, 6, 9, 10]
    assert plan_folders(Policy(keep_versions=100, snapshot_every=4), 12, snaps) == []


def fold(rig: Rig) -> int:
    rig.offer(rig.adapter())
    rig.offer(rig.adapter())
    number = rig.folder.maybe_fold(set())
    assert number is not None
    return number


def blob_bytes(rig: Rig) -> int:
    return sum(b.size for b in rig.store.list())


@pytest.fixture
def run(ledger, tmp_path):
    """Ten versions (a snapshot every version, so that there are folders to free), a finished job,
    a refused adapter, and the exact weights of every version as the folder made them."""
    rig = Rig(ledger, tmp_path, snapshot_every=1)
    weights = {0: rig.master()}
    for _ in range(10):
        number = fold(rig)
        weights[number] = rig.master()
    rig.ledger.adapters.reject(rig.offer(rig.adapter()), "refused by a test")
    rig.ledger.jobs.finish(rig.job, JobState.DONE)
    return rig, weights


def test_a_sweep_frees_what_the_policy_lets_go_and_every_version_rebuilds(run) -> None:
    rig, weights = run
    before = blob_bytes(rig)
    counts = status.job(rig.ledger, rig.job).tasks
    dry = retention.sweep(rig.ledger, rig.store, POLICY, versions_dir=rig.history.dir, dry_run=True)
    assert blob_bytes(rig) == before and all(rig.ledger.versions.get(v).files for v in weights)  # nothing freed
    report = retention.sweep(rig.ledger, rig.store, POLICY, versions_dir=rig.history.dir)
    assert (report.blobs, report.bytes, report.versions, report.jobs) == (dry.blobs, dry.bytes, dry.versions, dry.jobs)
    assert report.versions == [1, 2, 3, 5, 6, 7] and report.jobs == [rig.job] and report.adapters == 1
    held_out = rig.ledger.jobs.get(rig.job).records  # the retired job's records: its held-out slice alone
    assert blob_bytes(rig) == before - report.bytes + rig.store.size(held_out) and report.bytes > before / 3
    assert [v for v in weights if rig.ledger.versions.get(v).files] == [0, 4, 8, 9, 10]
    assert rig.ledger.tasks.ids(rig.job) == [] and rig.ledger.jobs.get(rig.job).n_records > 0
    assert status.job(rig.ledger, rig.job).tasks == counts  # summarised, not lost
    for version, expected in weights.items():  # every version, kept folder or not, exactly
        rebuilt = rig.history.rebuild(version).master(list(rig.targets))
        assert all(torch.equal(rebuilt[m], expected[m]) for m in expected), f"version {version} differs"
    # A dropped folder is made again when someone pulls it, and every file of it is there.
    planned = pull.plan(rig.ledger, rig.history, rig.store, pull.Format.HF, 0, 6)
    assert all(rig.store.has(f.sha256) for f in planned.files)
    again = retention.sweep(rig.ledger, rig.store, POLICY, versions_dir=rig.history.dir)
    assert again.jobs == [] and again.adapters == 0  # a second sweep finds what the pull rebuilt only


def test_rollback_and_unmerge_still_work_after_a_sweep(run) -> None:
    rig, weights = run
    retention.sweep(rig.ledger, rig.store, POLICY, versions_dir=rig.history.dir)
    early = rig.ledger.versions.get(1).adapters[0].id
    number, _ = rig.folder.rollback(3)  # evaluates on the retired job's held-out slice
    assert all(torch.equal(rig.master()[m], weights[3][m]) for m in weights[3])
    retention.sweep(rig.ledger, rig.store, POLICY, versions_dir=rig.history.dir)
    assert rig.ledger.versions.get(number).files  # a rollback's folder is its exact weights: kept
    rig.folder.unmerge(early)  # the factors of an adapter folded long ago are still there


def test_young_blobs_and_running_jobs_are_left_alone(ledger, tmp_path) -> None:
    rig = Rig(ledger, tmp_path, snapshot_every=1)
    fold(rig)
    job = rig.ledger.jobs.get(rig.job)
    orphan = rig.store.put(b"a blob a version being published wrote before its record")
    retention.sweep(rig.ledger, rig.store, Policy(keep_versions=0, snapshot_every=4, keep_days=0.0, grace_s=600))
    assert rig.store.has(orphan)  # younger than the grace: it may be about to be named
    retention.sweep(rig.ledger, rig.store, Policy(keep_versions=0, snapshot_every=4, keep_days=0.0, grace_s=0),
                    now=time.time() + 1)
    assert not rig.store.has(orphan)
    assert rig.store.has(job.dataset) and rig.store.has(job.records)  # the job still runs
    assert len(rig.ledger.tasks.ids(rig.job)) == job.total_tasks
