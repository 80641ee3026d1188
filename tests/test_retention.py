"""Retention and the sweeper (coordinator/model/retention.py) on the real tiny model: a long run
stays bounded, and nothing a version, a running job or a rollback needs is ever deleted (every
kept version is rebuilt exactly after the sweep; rollback and unmerge still work, an unmerge
exactly, from the version's patch once the adapter's file and record are gone); every record
has an end (adapters of retired jobs, gone workers, a volunteer's versions, retired jobs)."""

from __future__ import annotations

import time

import pytest
import torch

from coordinator.fold import folding
from coordinator.ledger.records import JobState
from coordinator.model import pull, retention
from coordinator.model.retention import Policy, plan_folders
from coordinator.observe import status
from nomoat import adapter as fmt
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
    # the refused adapter and, the job being retired, its 20 folded ones: records summarised, then gone
    assert report.versions == [1, 2, 3, 5, 6, 7] and report.jobs == [rig.job] and report.adapters == 21
    assert rig.ledger.adapters.ids() == []
    assert rig.ledger.jobs.summary(rig.job)["adapters"] == {"folded": 20, "rejected": 1}
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
    early = rig.ledger.adapters.get(rig.ledger.versions.get(1).adapters[0].id)
    own = fmt.from_bytes(rig.store.get(early.sha256))  # its file, read before the sweep frees it
    retention.sweep(rig.ledger, rig.store, POLICY, versions_dir=rig.history.dir)
    assert not rig.store.has(early.sha256) and rig.ledger.adapters.get(early.adapter_id) is None
    number, _ = rig.folder.rollback(3)  # evaluates on the retired job's held-out slice
    assert all(torch.equal(rig.master()[m], weights[3][m]) for m in weights[3])
    retention.sweep(rig.ledger, rig.store, POLICY, versions_dir=rig.history.dir)
    assert rig.ledger.versions.get(number).files  # a rollback's folder is its exact weights: kept
    # The factors of an adapter folded long ago come from version 1's patch, and the unmerge is
    # bit for bit what it was when it read the adapter's own file.
    expected = rig.master()
    folding.apply_patch(expected, folding.build_patch([own], [-early.weight]))
    unmerged, _ = rig.folder.unmerge(early.adapter_id)
    assert all(torch.equal(rig.master()[m], expected[m]) for m in expected)
    assert [a.id for a in rig.ledger.versions.get(unmerged).adapters] == [early.adapter_id]
    with pytest.raises(ValueError, match="is unmerged; only a folded adapter"):  # the versions say so
        rig.folder.unmerge(early.adapter_id)


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


def test_a_worker_gone_past_its_days_is_summarised_into_its_volunteer(ledger) -> None:
    from coordinator.ledger import keys
    from coordinator.observe import contributions
    from coordinator.settings import Settings

    token = "t" * 64
    for worker_id, tasks, seen_days_ago in (("w-old", 7, 31), ("w-new", 2, 1)):
        ledger.workers.register(worker_id, name=worker_id, card=b"", token=token)
        ledger.r.hset(keys.worker(worker_id), mapping={"tasks_done": tasks, "tokens_trained": 1000.0 * tasks})
        ledger.r.zadd(keys.WORKERS, {worker_id: time.time() - seen_days_ago * retention.DAY})
    settings = Settings(data_dir=None)
    before = contributions.of(ledger, settings, token)
    report = retention.sweep(ledger, _empty_store(), Policy(worker_days=30, grace_s=0), dry_run=True)
    assert report.workers == 1 and ledger.workers.get("w-old") is not None  # a dry run says, frees nothing
    report = retention.sweep(ledger, _empty_store(), Policy(worker_days=30, grace_s=0))
    assert report.workers == 1 and ledger.workers.get("w-old") is None and ledger.workers.get("w-new")
    assert not ledger.r.sismember(keys.token_workers(token), "w-old") and ledger.r.zscore(keys.WORKERS, "w-old") is None
    after = contributions.of(ledger, settings, token)  # its credit stays whole
    assert (after.tasks_done, after.tokens_trained) == (before.tasks_done, before.tokens_trained) == (9, 9000.0)
    assert [w.worker_id for w in after.workers] == ["w-new"]


def test_a_volunteers_versions_are_bounded_and_its_trust_record_kept(ledger) -> None:
    from coordinator.ledger import keys

    pipe = ledger.r.pipeline()
    for version in range(1, 151):
        ledger.trust.folded_in_version(pipe, "vol", version)
    pipe.execute()
    ledger.trust.record("vol", "accepted")
    retention.sweep(ledger, _empty_store(), Policy(trust_versions_kept=100, grace_s=0))
    record = ledger.trust.get("vol")
    assert sorted(record.versions) == list(range(51, 151)) and record.accepted == 1
    assert float(ledger.r.hget(keys.volunteer_retired("vol"), "older_versions_adapters")) == 50


def test_a_retired_job_is_forgotten_after_its_days(run) -> None:
    rig, _ = run
    retention.sweep(rig.ledger, rig.store, POLICY, versions_dir=rig.history.dir)
    held_out = rig.ledger.jobs.get(rig.job).records
    report = retention.sweep(rig.ledger, rig.store, Policy(keep_versions=2, snapshot_every=4, keep_days=0.0,
                                                           grace_s=0.0, job_record_days=0.0), now=time.time() + 1)
    assert report.forgotten == [rig.job] and rig.ledger.jobs.get(rig.job) is None
    assert rig.job not in rig.ledger.jobs.ids() and not rig.store.has(held_out)
    rig.folder.rollback(2)  # no job left to evaluate on: still a rollback


def _empty_store():
    import tempfile
    from pathlib import Path

    from coordinator.model.store import BlobStore

    return BlobStore(Path(tempfile.mkdtemp(prefix="nomoat-retention-")) / "blobs")


def test_adapter_records_left_by_a_retired_job_are_added_to_its_summary(run) -> None:
    from coordinator.ledger import keys

    rig, _ = run
    retention.sweep(rig.ledger, rig.store, POLICY, versions_dir=rig.history.dir)
    counted = rig.ledger.jobs.summary(rig.job)["adapters"]
    rig.ledger.r.hset(keys.adapter("left-behind"), mapping={"state": "folded", "job": rig.job})
    assert rig.ledger.jobs.expire_adapters(rig.job, {"folded": 1, "replica": 1}, ["left-behind"]) == 1
    assert rig.ledger.jobs.summary(rig.job)["adapters"] == {**counted, "folded": counted["folded"] + 1, "replica": 1}
    assert not rig.ledger.r.exists(keys.adapter("left-behind"))
