"""Limits that hold (issue 19, item 6): partial uploads bounded per lease and swept, shards read by
byte range, PEFT pulls bounded, and every caller's share (streams, jobs, pending tasks, bytes a day).

Real server on loopback (tests.rig), real ledger, real blob store.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import grpc
import pytest

from coordinator.collect.accept import adapter_bound
from coordinator.collect.partial_uploads import PartialUploads, Sweeper
from coordinator.errors import LimitReached
from coordinator.ledger import JobState, VersionRecord
from coordinator.model import pull
from coordinator.model.store import CHUNK, BlobStore
from coordinator.schedule import holder, shards
from nomoat.client import NomoatError
from nomoat.v1 import nomoat_pb2 as pb
from tests import rig as rigs
from tests.rig import JOB, TEXTS, Rig, manifest, published, rig  # noqa: F401  (fixtures)


def broken_off(rig: Rig, task_id: str, fence: int, sha256: str, size: int, send: int) -> grpc.StatusCode:
    """An upload over gRPC that announces ``size`` bytes and ends after ``send`` of them."""
    m = pb.AdapterManifest(task_id=task_id, fence=fence, size=size, sha256=sha256, rank=rigs.RANK,
                           alpha=rigs.ALPHA, tokens=300, lease_secret=rigs.SECRET)  # the lease's holder
    chunks = [pb.UploadChunk(manifest=m), pb.UploadChunk(data=os.urandom(send))]
    try:
        reply = rig.client("worker").workers.Upload(iter(chunks), timeout=30, metadata=rig.meta("worker"))
    except grpc.RpcError as exc:
        return exc.code()
    assert not reply.accepted
    return grpc.StatusCode.OK


def parts(rig: Rig) -> PartialUploads:
    return PartialUploads(rig.tmp / "uploads")


# -- partial uploads --------------------------------------------------------------------------------


def test_a_flood_of_partial_uploads_under_one_lease_holds_at_most_one_adapter(rig: Rig) -> None:
    job = rig.ledger.jobs.get(rig.submit().job_id)
    task_id = rig.ledger.tasks.ids(job.job_id)[0]
    fence = rig.lease(task_id)
    bound = adapter_bound(job.config, rig.deps.shapes)
    for i in range(12):  # each under a sha256 of the client's choosing
        assert broken_off(rig, task_id, fence, f"{i:064x}", bound, bound // 2) == grpc.StatusCode.DATA_LOSS
    held = list((rig.tmp / "uploads").glob("*.part"))
    assert len(held) == 1 and parts(rig).held_bytes() <= bound, [p.name for p in held]
    # The newest is the one kept: a worker resumes the upload it sent last.
    assert parts(rig).offset(task_id, fence, f"{11:064x}") == bound // 2


def test_an_upload_larger_than_an_adapter_of_its_job_is_refused_before_any_byte(rig: Rig) -> None:
    job = rig.ledger.jobs.get(rig.submit().job_id)
    task_id = rig.ledger.tasks.ids(job.job_id)[0]
    fence = rig.lease(task_id)
    bound = adapter_bound(job.config, rig.deps.shapes)
    assert bound < rig.deps.settings.max_adapter_bytes  # the job's own bound is the tighter one
    m = pb.AdapterManifest(task_id=task_id, fence=fence, size=bound + 1, sha256="1" * 64, rank=rigs.RANK,
                           alpha=rigs.ALPHA, lease_secret=rigs.SECRET)
    reply = rig.client("worker").workers.Upload(iter([pb.UploadChunk(manifest=m), pb.UploadChunk(data=b"x" * 1024)]),
                                                timeout=30, metadata=rig.meta("worker"))
    assert not reply.accepted and f"an adapter of this job's LoRA config (rank {rigs.RANK}) is at most {bound}" \
        in reply.reason
    # One without the lease's secret learns nothing of the job's bound: only that it holds no such lease.
    stranger = pb.AdapterManifest(task_id=task_id, fence=fence, size=bound + 1, sha256="1" * 64, rank=rigs.RANK,
                                  alpha=rigs.ALPHA, lease_secret="f" * 32)
    reply = rig.client("worker").workers.Upload(iter([pb.UploadChunk(manifest=stranger),
                                                      pb.UploadChunk(data=b"x" * 1024)]),
                                                timeout=30, metadata=rig.meta("worker"))
    assert not reply.accepted and "holds no lease" in reply.reason and str(bound) not in reply.reason, reply.reason
    assert parts(rig).held_bytes() == 0
    # A real adapter of the job fits its bound.
    assert len(rigs.make_adapter(rig.deps.shapes)) <= bound


def test_the_sweep_removes_parts_of_leases_that_ended_and_keeps_live_ones(rig: Rig) -> None:
    job_id = rig.submit().job_id
    ended, live = rig.ledger.tasks.ids(job_id)[:2]
    ended_fence, live_fence = rig.lease(ended), rig.lease(live)
    for task_id, fence in ((ended, ended_fence), (live, live_fence)):
        broken_off(rig, task_id, fence, "2" * 64, 1000, 100)
    assert rig.ledger.leases.requeue(ended, ended_fence, "the test ended it")
    past = time.time() - 3600
    for part in (rig.tmp / "uploads").glob("*.part"):
        os.utime(part, (past, past))  # older than the sweep's grace, younger than its max age
    uploads = parts(rig)
    removed = uploads.sweep(max_age_s=24 * 3600, live=lambda t, f: not rig.ledger.leases.problem(t, f))
    assert removed == 1
    assert uploads.offset(ended, ended_fence, "2" * 64) == 0 and uploads.offset(live, live_fence, "2" * 64) == 100


def test_the_sweep_runs_on_a_timer_not_only_at_start(rig: Rig) -> None:
    job_id = rig.submit().job_id
    task_id = rig.ledger.tasks.ids(job_id)[0]
    uploads = parts(rig)
    sweeper = Sweeper(uploads, lambda t, f: not rig.ledger.leases.problem(t, f), every_s=0.2, max_age_s=3600,
                      grace_s=0).start()
    try:
        fence = rig.lease(task_id)  # a part arrives after the sweeper started
        broken_off(rig, task_id, fence, "3" * 64, 1000, 100)
        assert uploads.offset(task_id, fence, "3" * 64) == 100  # its lease holds: kept
        assert rig.ledger.leases.requeue(task_id, fence, "the test ended it")
        until = time.monotonic() + 30
        while uploads.offset(task_id, fence, "3" * 64):
            assert time.monotonic() < until, "the sweeper never removed the part of a lease that ended"
            time.sleep(0.1)
    finally:
        sweeper.stop()


# -- shards -----------------------------------------------------------------------------------------


class CountingStore(BlobStore):
    """The real blob store, counting what a reader takes out of it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.whole: list[str] = []
        self.ranged = 0
        self.largest = 0

    def get(self, sha256: str) -> bytes:
        self.whole.append(sha256)
        return super().get(sha256)

    def read_range(self, sha256: str, offset: int, length: int, chunk: int = CHUNK):
        for block in super().read_range(sha256, offset, length, chunk):
            self.ranged += len(block)
            self.largest = max(self.largest, len(block))
            yield block


def test_a_shard_fetch_reads_only_the_shards_byte_range(rig: Rig) -> None:
    texts = [f"record {i}: " + "words " * 40 for i in range(400)]  # a job far larger than one shard
    job = rig.ledger.jobs.get(rig.submit(texts=texts).job_id)
    task_id = rig.ledger.tasks.ids(job.job_id)[3]
    task = rig.ledger.tasks.get(task_id)
    fence = rig.lease(task_id)
    whole = rig.store.get(job.records)
    expected = b"".join(whole.split(b"\n")[i] + b"\n" for i in range(task.start, task.end))
    counting = CountingStore(rig.store.root)
    identity = rig.registry.lookup(rig.tokens["worker"])
    shard = b"".join(holder.fetch_shard(rig.ledger, counting, identity, task_id, fence, secret=rigs.SECRET))
    assert shard == expected
    assert counting.whole == []  # never the job's whole records
    assert counting.ranged == len(expected) + 2 * shards.OFFSET < len(whole) // 10
    # And over gRPC, the same bytes.
    assert rig.client("worker").fetch_shard(task_id, fence, secret=rigs.SECRET) == expected


def test_a_shard_is_sent_in_chunks_and_a_job_without_an_index_is_scanned_line_by_line(rig: Rig) -> None:
    texts = [f"record {i}: " + "words " * 40 for i in range(400)]
    config = pb.JobConfig(lora_rank=rigs.RANK, lora_alpha=rigs.ALPHA, target_modules=rigs.TARGETS, tokens_per_task=4000)
    job = rig.ledger.jobs.get(rig.submit(texts=texts, config=config).job_id)
    task = rig.ledger.tasks.get(rig.ledger.tasks.ids(job.job_id)[1])
    counting = CountingStore(rig.store.root)
    index = rig.ledger.jobs.records_index(job.job_id)
    blocks = list(shards.shard(counting, job.records, index, task.start, task.end, chunk=4096))
    assert len(blocks) > 2 and max(len(b) for b in blocks) <= 4096 and counting.largest <= 4096
    scanned = list(shards.shard(counting, job.records, "", task.start, task.end, chunk=4096))  # recorded before indexes
    assert b"".join(scanned) == b"".join(blocks) and counting.whole == []


# -- PEFT pulls -------------------------------------------------------------------------------------


def test_a_peft_pull_past_the_bound_is_refused_with_a_sentence(redis_client, published, tmp_path) -> None:  # noqa: F811
    small = rigs.start(redis_client, published, tmp_path, max_peft_pull_bytes=10_000)
    try:
        for v in (1, 2):  # two stored patches of 8 KB: together past the bound
            patch = small.store.put(os.urandom(8000))
            small.ledger.versions.publish(VersionRecord(version=v, parent=v - 1, patch=patch))
        with pytest.raises(LimitReached, match="pull the full version instead"):
            pull.plan(small.ledger, small.deps.history, small.store, pull.Format.PEFT, 0, -1, max_peft_bytes=10_000)
        with pytest.raises(NomoatError, match="more than 10000 bytes of patches.*pull the full version instead"):
            small.client("reader").pull(tmp_path / "out", fmt="peft", since=0, patience_s=1)
        with pytest.raises(Exception) as within:  # one patch is within the bound: it is read (and is no patch)
            pull.plan(small.ledger, small.deps.history, small.store, pull.Format.PEFT, 1, -1, max_peft_bytes=10_000)
        assert not isinstance(within.value, LimitReached)
    finally:
        small.close()


# -- every caller's share ---------------------------------------------------------------------------


def test_a_caller_holds_at_most_its_share_of_streams_and_others_keep_theirs(redis_client, published,  # noqa: F811
                                                                              tmp_path) -> None:
    small = rigs.start(redis_client, published, tmp_path, max_streams_per_caller=2)
    try:
        job_id = small.submit().job_id
        readers = [small.client("reader") for _ in range(2)]
        streams = [reader.watch(job_id, timeout=30) for reader in readers]
        assert all(next(s).job.job_id == job_id for s in streams)
        with pytest.raises(NomoatError, match="your token already holds 2 streams"):
            next(small.client("reader").watch(job_id, timeout=30))
        other = small.client(token=small.registry.create("reader", "another reader"))
        assert next(other.watch(job_id, timeout=30)).job.job_id == job_id  # a share of its own
        for reader in readers:
            reader.close()  # their streams end: the slots come back
        owner = small.registry.lookup(small.tokens["reader"]).token_hash
        until = time.monotonic() + 30
        while small.ledger.quotas.streams(owner) > 0:
            assert time.monotonic() < until, "the ended streams' slots were never given back"
            time.sleep(0.1)
        assert next(small.client("reader").watch(job_id, timeout=30)).job.job_id == job_id
    finally:
        small.close()


def test_a_submitter_has_a_share_of_running_jobs(redis_client, published, tmp_path) -> None:  # noqa: F811
    small = rigs.start(redis_client, published, tmp_path, max_jobs_per_submitter=1)
    try:
        first = small.submit().job_id
        with pytest.raises(NomoatError, match="your token has 1 jobs running, as many as one submitter may have"):
            small.submit(texts=TEXTS[:30])
        small.ledger.jobs.finish(first, JobState.DONE)
        assert small.submit(texts=TEXTS[:30]).job_id  # a finished job no longer counts
    finally:
        small.close()


def test_a_submitter_has_a_share_of_pending_tasks_and_bytes_a_day(redis_client, published, tmp_path) -> None:  # noqa: F811
    small = rigs.start(redis_client, published, tmp_path, max_pending_tasks_per_submitter=2)
    try:
        with pytest.raises(NomoatError, match=r"this dataset makes \d+ tasks and your running jobs hold 0; "
                                              r"one submitter may have 2 pending"):
            small.submit()
        assert small.blob_files() == set(small.v0_files.values())  # refused before anything was stored
    finally:
        small.close()
    redis_client.flushdb()
    first, second = jsonl(TEXTS[:20]), jsonl(TEXTS)
    small = rigs.start(redis_client, published, tmp_path / "b", max_submit_bytes_per_day=len(first) + len(second) - 1)
    try:
        small.submit(texts=TEXTS[:20])
        with pytest.raises(NomoatError, match="one submitter may send a day: submit it tomorrow"):
            small.submit()  # refused at its header, before its bytes are read
        other = small.client(token=small.registry.create("submitter", "another"))
        path = tmp_path / "o.jsonl"
        path.write_bytes(second)
        assert other.submit(path, name="job", config=JOB).job_id  # its own day's share
    finally:
        small.close()


def jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
