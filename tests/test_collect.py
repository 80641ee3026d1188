"""The upload workflow and the dataset stream called directly (no gRPC).

``accept.upload`` is what the Upload servicer calls: early refusals, a resumable receive, then
the checks and the ledger's acceptance. ``submit.receive`` is what Submit calls: the stream of
header, bytes and digest is checked before anything is stored. Real ledger, store and parts
folder from the rig.
"""

from __future__ import annotations

import hashlib

import pytest

from coordinator.collect import accept

from coordinator.schedule import submit
from coordinator.gateway.auth import Identity
from coordinator.errors import Incomplete, InvalidRequest, WrongState
from coordinator.schedule.noise import Sample
from coordinator.collect.partial_uploads import PartialUploads
from coordinator.ledger import Check, TaskState
from nomoat.adapter import from_bytes, to_bytes
from tests.rig import ALPHA, RANK, SECRET, Rig, make_adapter, published, rig, submit_job  # noqa: F401  (fixtures)
from worker.warmstart import contribution

LIMIT = 1 << 24


def manifest(task_id: str, fence: int, data: bytes, **changes) -> accept.Manifest:
    fields = dict(task_id=task_id, fence=fence, base_version=0, rank=RANK, alpha=ALPHA, tokens=300,
                  train_loss=2.5, sha256=hashlib.sha256(data).hexdigest(), size=len(data), lease_secret=SECRET)
    return accept.Manifest(**{**fields, **changes})


@pytest.fixture
def leased(rig: Rig) -> tuple[str, int]:
    task_id = rig.ledger.tasks.ids(submit_job(rig).job_id)[0]
    return task_id, rig.lease(task_id)


@pytest.fixture
def partials(rig: Rig) -> PartialUploads:
    return PartialUploads(rig.tmp / "uploads")


def upload(rig: Rig, partials: PartialUploads, m: accept.Manifest, blocks, offset: int = 0,
           who: Identity | None = None, max_bytes: int = LIMIT) -> accept.Accepted:
    who = who or rig.registry.lookup(rig.tokens["worker"])
    return accept.upload(rig.ledger, rig.store, rig.deps.shapes, partials, who, m, offset, blocks,
                          max_bytes=max_bytes)


def test_an_upload_broken_off_resumes_from_what_arrived(rig: Rig, leased, partials) -> None:
    task_id, fence = leased
    data = make_adapter(rig.deps.shapes)
    m = manifest(task_id, fence, data)
    half = len(data) // 2
    with pytest.raises(Incomplete, match=f"the upload stopped at byte {half} of {len(data)}; "
                                         f"resume from offset {half}"):
        upload(rig, partials, m, [data[:half]])
    with pytest.raises(WrongState, match=f"resume from offset {half}"):
        upload(rig, partials, m, [data[half + 1:]], offset=half + 1)
    result = upload(rig, partials, m, [data[half:]], offset=half)
    assert result.ok and result.status == "accepted"
    assert partials.offset(task_id, fence, m.sha256) == 0  # the part is gone once accepted
    again = upload(rig, partials, m, [data])
    assert (again.status, again.detail) == ("duplicate", result.detail)


def test_what_cannot_be_accepted_is_refused_before_bytes_are_kept(rig: Rig, leased, partials) -> None:
    task_id, fence = leased
    data = make_adapter(rig.deps.shapes)
    too_big = upload(rig, partials, manifest(task_id, fence, data), [data], max_bytes=len(data) - 1)
    assert (too_big.status, too_big.detail) == (
        "refused", f"the adapter is {len(data)} bytes; the limit is {len(data) - 1}")
    stale = upload(rig, partials, manifest(task_id, fence + 1, data), [data])
    assert (stale.status, stale.detail) == ("refused", f"this worker holds no lease of task {task_id} under fence {fence + 1}")
    bob = Identity("worker", "bob", "b" * 64)
    for secret in ("", "x" * 32):  # without the lease's secret, whoever it is
        theirs = upload(rig, partials, manifest(task_id, fence, data, lease_secret=secret), [data], who=bob)
        assert (theirs.status, theirs.detail) == ("refused", f"this worker holds no lease of task {task_id} under fence {fence}")
    assert not (rig.tmp / "uploads").exists() or not any((rig.tmp / "uploads").iterdir())


def test_an_adapter_that_lies_about_its_rank_is_refused(rig: Rig, leased, partials) -> None:
    task_id, fence = leased
    data = make_adapter(rig.deps.shapes)
    result = upload(rig, partials, manifest(task_id, fence, data, rank=RANK + 1), [data])
    assert result.status == "refused" and "the manifest says rank" in result.detail


def test_a_copy_of_another_tasks_adapter_is_refused_at_upload_before_any_byte(rig: Rig, partials) -> None:
    first, second, third = rig.ledger.tasks.ids(submit_job(rig).job_id)[:3]
    data = make_adapter(rig.deps.shapes, seed=1)
    assert upload(rig, partials, manifest(first, rig.lease(first), data), [data]).status == "accepted"

    def no_bytes():  # the refusal comes from the manifest's sha256 alone
        raise AssertionError("a copy's bytes were read")
        yield b""

    fence = rig.lease(second)
    copy = upload(rig, partials, manifest(second, fence, data), no_bytes())
    assert (copy.status, copy.kind, copy.check) == ("refused", accept.REFUSED_COPY, Check.COPY)
    assert "byte for byte, the adapter of another task of this job" in copy.detail and first not in copy.detail
    assert rig.ledger.tasks.get(second).state is TaskState.LEASED  # its lease goes on: no attempt spent
    volunteer = rig.registry.lookup(rig.tokens["worker"]).token_hash
    assert rig.ledger.trust.get(volunteer).reasons() == {"copy": 1}  # it costs its volunteer
    # The bytes arrive anyway (an upload past the precheck, as a race would): the ledger's
    # acceptance refuses them in its own atomic step.
    assert rig.ledger.adapters.accept(second, fence, manifest(second, fence, data).sha256).check is Check.COPY
    assert rig.ledger.tasks.get(second).state is TaskState.LEASED
    own = make_adapter(rig.deps.shapes, seed=2)  # its own work is taken, and is its own from then on
    assert upload(rig, partials, manifest(second, fence, own), [own]).status == "accepted"
    assert upload(rig, partials, manifest(third, rig.lease(third), own), no_bytes()).check is Check.COPY


def dataset_parts(data: bytes, size: int | None = None, sha: str | None = None) -> list[submit.DatasetPart]:
    header = submit.DatasetHeader("d.jsonl", "job", len(data) if size is None else size, {})
    return [header, data, submit.DatasetDigest(sha or hashlib.sha256(data).hexdigest())]


@pytest.mark.parametrize("parts, error, message", [
    ([], InvalidRequest, "no dataset was sent"),
    ([b"x"], InvalidRequest, "the first message must be the header"),
    (dataset_parts(b'{"text": "a"}\n') * 2, InvalidRequest, "the header was sent twice"),
    (dataset_parts(b'{"text": "a"}\n', size=3), InvalidRequest, "more data arrived than the header announced"),
    (dataset_parts(b'{"text": "a"}\n', sha="0" * 64), Incomplete, "arrived incomplete or damaged"),
    (dataset_parts(b'{"text": "a"}\n{"txt": "b"}\n'), InvalidRequest, "^d.jsonl: "),
])
def test_a_bad_dataset_stream_is_refused_and_nothing_is_stored(rig: Rig, parts, error, message) -> None:
    before = rig.blob_files()
    d = rig.deps
    with pytest.raises(error, match=message):
        submit.receive(d.settings, d.ledger, d.store, d.tokenizer, list(d.shapes), parts)
    assert rig.blob_files() == before and rig.ledger.jobs.ids() == []


def test_a_whole_dataset_stream_becomes_a_job(rig: Rig) -> None:
    result = submit_job(rig)
    assert result.tasks == len(rig.ledger.tasks.ids(result.job_id)) > 0
    assert rig.ledger.jobs.get(result.job_id).name == "job"


def warm_contribution(rig: Rig, marked: bool = True) -> bytes:
    """What a warm-started task uploads: s·(B₁A₁ − B₀A₀) as one rank-2r, alpha-2α adapter."""
    start, end = (from_bytes(make_adapter(rig.deps.shapes, seed=s)) for s in (1, 2))
    warm = contribution(end, start)
    if not marked:
        warm.meta = {}
    return to_bytes(warm)


@pytest.mark.parametrize("warm_job,marked,accepted", [
    (True, True, True),     # a warm-start job takes the exact rank-2r difference
    (False, True, False),   # a job that did not ask for warm starts does not
    (True, False, False),   # nor a rank-2r upload that does not say it is one
])
def test_a_warm_start_job_accepts_rank_2r_contributions(rig: Rig, partials, warm_job: bool, marked: bool,
                                                       accepted: bool) -> None:
    task_id = rig.ledger.tasks.ids(submit_job(rig, warm_start=warm_job).job_id)[0]
    fence = rig.lease(task_id)
    data = warm_contribution(rig, marked)
    result = upload(rig, partials, manifest(task_id, fence, data, rank=2 * RANK, alpha=2 * ALPHA), [data])
    assert (result.status == "accepted") is accepted, result.detail
    if not accepted:
        assert f"the job trains rank {RANK}" in result.detail


def test_an_accepted_upload_records_its_gradient_norms_and_the_jobs_noise_scale(rig: Rig, leased, partials) -> None:
    task_id, fence = leased
    data = make_adapter(rig.deps.shapes)
    sample = Sample(micro_sq=5.0, batch_sq=2.0, micro_batch=2, batch_size=8)  # |G|² 1, tr(Σ) 8
    result = upload(rig, partials, manifest(task_id, fence, data, gradients=sample), [data])
    assert result.status == "accepted"
    assert rig.ledger.adapters.get(result.detail).gradients == sample
    job = rig.ledger.jobs.get(rig.ledger.tasks.get(task_id).job)
    assert job.noise.samples == 1 and job.noise.b_simple() == pytest.approx(8.0)
