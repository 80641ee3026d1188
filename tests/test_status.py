"""Status summaries called directly (no gRPC): jobs, workers (active or gone) and versions."""

from __future__ import annotations

import time

import pytest

from coordinator.ledger import keys

from coordinator.observe import status

from coordinator.schedule import registration
from coordinator.errors import NotFound
from coordinator.ledger import JobState
from tests.rig import Rig, published, rig, submit_job  # noqa: F401  (fixtures)


def test_the_overview_counts_a_jobs_tasks_and_shows_its_newest_notes(rig: Rig) -> None:
    job_id = submit_job(rig).job_id
    task_ids = rig.ledger.tasks.ids(job_id)
    fence = rig.lease(task_ids[0])
    note = "out of memory at micro-batch 8; retrying with 4"
    assert rig.ledger.leases.heartbeat(task_ids[0], fence, time.time() + 60, event=note).ok  # as a run notes it
    view = status.overview(rig.ledger, rig.deps.settings, job_id)
    (job,) = view.jobs
    assert (job.job_id, job.name, job.state, job.total_tasks) == (job_id, "job", "running", len(task_ids))
    assert job.tasks["leased"] == 1 and job.tasks["pending"] == len(task_ids) - 1
    assert job.events == [f"{task_ids[0]}: out of memory at micro-batch 8; retrying with 4"]
    assert [v.version for v in view.versions] == [0] and view.versions[0].parent == -1
    assert status.overview(rig.ledger, rig.deps.settings).jobs == view.jobs


def test_a_worker_not_heard_from_for_three_lease_lifetimes_is_gone(rig: Rig) -> None:
    identity = rig.registry.lookup(rig.tokens["worker"])
    joining = registration.Registration("", "w", "node", b"\x0a\x04card", "card", 8.0)
    quiet = registration.register(rig.ledger, rig.deps.settings, identity, joining)
    heard = registration.register(rig.ledger, rig.deps.settings, identity, joining)
    gone = time.time() - registration.ACTIVE_TTLS * rig.deps.settings.lease_ttl_s - 1
    rig.ledger.r.zadd(keys.WORKERS, {quiet: gone})
    states = {w.worker_id: (w.state, w.card) for w in status.overview(rig.ledger, rig.deps.settings).workers}
    assert states == {quiet: ("gone", b"\x0a\x04card"), heard: ("active", b"\x0a\x04card")}


def test_a_worker_shows_how_it_takes_work(rig: Rig) -> None:
    # A Ray-mode worker registers with its Ray node's id; an outbound-only one has no node.
    identity = rig.registry.lookup(rig.tokens["worker"])
    ray = registration.register(rig.ledger, rig.deps.settings, identity,
                           registration.Registration("", "trusted", "node-1", b"\x0a\x04card", "card", 8.0))
    public = registration.register(rig.ledger, rig.deps.settings, identity,
                              registration.Registration("", "home", "", b"\x0a\x04card", "card", 8.0))
    kinds = {w.worker_id: w.kind for w in status.overview(rig.ledger, rig.deps.settings).workers}
    assert kinds == {ray: "ray", public: "outbound"}


def test_an_unknown_job_is_not_found(rig: Rig) -> None:
    with pytest.raises(NotFound, match="there is no job 'j-nope'"):
        status.overview(rig.ledger, rig.deps.settings, "j-nope")
    with pytest.raises(NotFound, match="there is no job 'j-nope'"):
        status.progress(rig.ledger, "j-nope")


def test_progress_is_finished_once_the_job_no_longer_runs(rig: Rig) -> None:
    job_id = submit_job(rig).job_id
    assert not status.progress(rig.ledger, job_id).finished
    rig.ledger.jobs.finish(job_id, JobState.DONE)
    now = status.progress(rig.ledger, job_id)
    assert now.finished and now.current_version == 0 and now.job.state == "done"


def test_a_jobs_noise_scale_and_fold_width_show_in_its_status(rig: Rig) -> None:
    from coordinator.schedule.noise import Sample

    job_id = submit_job(rig).job_id
    task_id = rig.ledger.tasks.ids(job_id)[0]
    rig.lease(task_id)
    rig.ledger.tasks.set_training([(task_id, 2, 4e-3, 3)])  # a 3-task fold: 8 // 2 would say 4
    (job,) = status.overview(rig.ledger, rig.deps.settings, job_id).jobs
    assert job.noise_scale == 0.0  # nothing measured yet
    assert "over 3 adapters a fold" in job.training
    rig.ledger.jobs.add_noise(job_id, Sample(5.0, 2.0, 2, 8))  # |G|² 1, tr(Σ) 8
    (job,) = status.overview(rig.ledger, rig.deps.settings, job_id).jobs
    assert job.noise_scale == pytest.approx(8.0)
