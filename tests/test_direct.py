"""Model bytes straight between clients and an object store (issue 20): the real gRPC server on
loopback (tests/rig.py) with its blob store on a real S3 server (SeaweedFS), and the real client.

Pulls, shards and adapter uploads move by presigned URLs; the gateway's byte counter
(``nomoat_gateway_bytes``) shows it moved none of them, and the same calls against the
local-folder default still stream through gRPC (and count there).
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
import uuid

import pytest

from coordinator.model.store import open_store, upload_key
from coordinator.schedule.submit import read_records
from nomoat import lineage
from nomoat import partial as partial_folder
from tests.rig import SECRET, TEXTS, Rig, make_adapter, manifest, published, start  # noqa: F401  (fixtures)
from tests.seaweed import use
from worker import uploader

CARD_NAME = "test card"


@pytest.fixture
def s3rig(redis_client, published, tmp_path, seaweed, monkeypatch):  # noqa: F811
    use(seaweed, monkeypatch)
    store = open_store(f"s3://nomoat-test/{uuid.uuid4().hex[:12]}", None)
    r = start(redis_client, published, tmp_path, store=store)
    yield r
    r.close()


@pytest.fixture
def localrig(redis_client, published, tmp_path):  # noqa: F811
    r = start(redis_client, published, tmp_path)
    yield r
    r.close()


def moved(rig: Rig) -> dict[str, int]:
    return rig.ledger.counters.tally().gateway_bytes


def served(rig: Rig) -> dict[str, str]:
    """What a pull of version 0 writes: its files but the fp32 master, and its model card."""
    from coordinator.model import pull

    return {f.path: f.sha256 for f in pull.plan(rig.ledger, rig.deps.history, rig.store, pull.Format.HF, 0, 0).files}


def test_a_pull_comes_from_the_store_and_not_through_the_gateway(s3rig: Rig) -> None:
    out = s3rig.tmp / "model"
    assert s3rig.client("reader").pull(out) == 0
    files = served(s3rig)
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {lineage.STAMP} == set(files)
    assert all(hashlib.sha256((out / p).read_bytes()).hexdigest() == sha for p, sha in files.items())
    assert lineage.problem(out, s3rig.deps.history.lineage().id, 0) == ""
    assert moved(s3rig)["pull"] == 0


def test_a_pull_broken_off_resumes_by_range_from_the_store(s3rig: Rig) -> None:
    """What an earlier try left stays: only the rest of each file is read from the store."""
    out = s3rig.tmp / "model"
    files = served(s3rig)
    biggest = max(files, key=lambda p: s3rig.store.size(files[p]))
    whole = s3rig.store.get(files[biggest])
    # An earlier try of the same pull (same format, version and files) that broke off mid-file.
    held = partial_folder.Partial(out)
    with held as partial:
        from nomoat.v1 import nomoat_pb2 as pb
        header = pb.PullHeader(version=0, lineage=s3rig.deps.history.lineage().id, files=[
            pb.FileEntry(path=p, size=s3rig.store.size(s), sha256=s) for p, s in files.items()])
        partial.adopt(header, 0, 0)
        (partial.dir / biggest).parent.mkdir(parents=True, exist_ok=True)
        (partial.dir / biggest).write_bytes(whole[: len(whole) // 2])
    seen = []
    from nomoat.transfer import Quiet

    class Watch(Quiet):
        def start(self, header, held, note):
            seen.append(held)

    assert s3rig.client("reader").pull(out, progress=Watch()) == 0
    assert seen == [len(whole) // 2]
    assert (out / biggest).read_bytes() == whole
    assert moved(s3rig)["pull"] == 0


def test_a_shard_is_a_url_of_its_own_object(s3rig: Rig) -> None:
    reply = s3rig.submit()
    job = s3rig.ledger.jobs.get(reply.job_id)
    records = read_records(s3rig.store.get(job.records))
    task = s3rig.ledger.tasks.of_job(reply.job_id)[0]
    fence = s3rig.lease(task.task_id)
    worker = s3rig.client("worker")
    data = worker.fetch_shard(task.task_id, fence, secret=SECRET)
    assert [json.loads(line)["text"] for line in data.decode().splitlines()] == records[task.start : task.end]
    assert moved(s3rig)["shard"] == 0
    # The URL opens the shard's own object: the whole dataset is another object it cannot read.
    from nomoat.v1 import nomoat_pb2 as pb
    (first,) = list(worker.workers.FetchShard(pb.FetchShardRequest(task_id=task.task_id, fence=fence, lease_secret=SECRET),
                                              metadata=s3rig.meta("worker"), timeout=30))
    assert first.url and not first.data and first.sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(first.url.replace(first.sha256, job.records))


def test_an_adapter_is_put_to_the_store_then_checked_and_accepted(s3rig: Rig) -> None:
    task_id = s3rig.ledger.tasks.ids(s3rig.submit().job_id)[0]
    fence = s3rig.lease(task_id)
    data = make_adapter(s3rig.deps.shapes)
    worker = s3rig.client("worker")
    result = uploader.upload(worker, manifest(task_id, fence, data), data)
    assert result.accepted, result.reason
    (buffered,) = s3rig.ledger.adapters.buffered()
    assert s3rig.store.get(buffered.sha256) == data
    assert list(s3rig.store.uploads()) == []  # the upload object is gone once it is a blob
    assert moved(s3rig)["upload"] == 0
    again = uploader.upload(worker, manifest(task_id, fence, data), data)  # a retry: a duplicate
    assert again.accepted and again.adapter_id == result.adapter_id


def test_an_object_that_does_not_match_its_manifest_is_refused(s3rig: Rig) -> None:
    task_id = s3rig.ledger.tasks.ids(s3rig.submit().job_id)[0]
    fence = s3rig.lease(task_id)
    data = make_adapter(s3rig.deps.shapes)
    worker = s3rig.client("worker")
    m = manifest(task_id, fence, data)
    url = worker.upload_target(m)
    assert url
    other = make_adapter(s3rig.deps.shapes, seed=1)
    from nomoat import direct
    direct.put(url, other)  # the object holds other bytes than the manifest names
    m.in_store = True
    reply = worker.upload(m, b"")
    assert not reply.accepted and "sha256 does not match" in reply.reason
    assert s3rig.ledger.adapters.buffered() == []
    # A lease's URL names its own upload object only: not a blob, not another lease's upload.
    blob = s3rig.store.presign_get(s3rig.v0_files["config.json"], 60)
    key = upload_key(task_id, fence, m.sha256)
    with pytest.raises(urllib.error.HTTPError):
        direct_put = urllib.request.Request(url.replace(key, upload_key(task_id, fence + 1, m.sha256)),
                                            data=b"x", method="PUT")
        direct_put.add_header("Content-Type", "")
        urllib.request.urlopen(direct_put)
    assert blob  # the blob itself is untouched
    assert s3rig.store.get(s3rig.v0_files["config.json"])


def test_a_stale_lease_gets_no_url_and_is_refused_without_bytes(s3rig: Rig) -> None:
    task_id = s3rig.ledger.tasks.ids(s3rig.submit().job_id)[0]
    fence = s3rig.lease(task_id)
    data = make_adapter(s3rig.deps.shapes)
    worker = s3rig.client("worker")
    assert worker.upload_target(manifest(task_id, fence - 1, data)) == ""
    result = uploader.upload(worker, manifest(task_id, fence - 1, data), data)
    assert not result.accepted and f"holds no lease of task {task_id} under fence {fence - 1}" in result.reason


def test_the_local_folder_still_streams_through_the_gateway(localrig: Rig) -> None:
    """The default is unchanged: no URLs, the bytes come through gRPC (and are counted)."""
    out = localrig.tmp / "model"
    assert localrig.client("reader").pull(out) == 0
    total = sum(localrig.store.size(s) for s in served(localrig).values())
    task_id = localrig.ledger.tasks.ids(localrig.submit().job_id)[0]
    fence = localrig.lease(task_id)
    worker = localrig.client("worker")
    shard = worker.fetch_shard(task_id, fence, secret=SECRET)
    data = make_adapter(localrig.deps.shapes)
    assert worker.upload_target(manifest(task_id, fence, data)) == ""
    assert uploader.upload(worker, manifest(task_id, fence, data), data).accepted
    assert moved(localrig) == {"pull": total, "shard": len(shard), "upload": len(data)}


def test_admin_gc_says_what_it_would_free_and_only_for_an_admin(localrig: Rig) -> None:
    from click.testing import CliRunner

    from nomoat.cli import main
    from nomoat.client import NomoatError

    orphan = localrig.store.put(b"nothing names this blob")
    import os
    import time as _time
    old = _time.time() - 2 * 3600  # older than the sweeper's grace
    os.utime(localrig.store.path(orphan), (old, old))
    args = ["--coordinator", localrig.address, "--token", localrig.tokens["admin"], "admin", "gc"]
    dry = CliRunner().invoke(main, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.startswith("would free 1 blobs") and localrig.store.has(orphan)
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0 and done.stdout.startswith("freed 1 blobs") and not localrig.store.has(orphan)
    with pytest.raises(NomoatError, match="not allowed"):
        localrig.client("worker").sweep(dry_run=True)


def _target(path, url: str, size: int, start: int = 0):
    import os

    from nomoat import fetch

    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    digest = hashlib.sha256(path.read_bytes()[:start])
    return fetch.Target(url, size, start, fd, digest)


def test_ranges_fetched_in_parallel_are_written_and_hashed_in_order(s3_store, tmp_path) -> None:
    """Many small ranges over several threads: each file is whole, in place, and its sha256 (taken
    as the ranges land, never read back) is the object's; what arrived ahead waited in memory."""
    import os

    from nomoat import fetch

    blobs = [os.urandom(n) for n in (1_000_003, 65_536, 1, 300_000)]
    shas = [s3_store.put(b) for b in blobs]
    targets = [_target(tmp_path / f"f{i}", s3_store.presign_get(s, 60), len(b)) for i, (s, b) in enumerate(zip(shas, blobs))]
    done, landed = [], []
    fetch.download(targets, threads=5, range_size=4096, window=7, on_bytes=landed.append, on_done=done.append)
    for i, (target, blob, sha) in enumerate(zip(targets, blobs, shas)):
        os.close(target.fd)
        assert (tmp_path / f"f{i}").read_bytes() == blob and target.digest.hexdigest() == sha
    assert sum(landed) == sum(map(len, blobs)) and sorted(map(id, done)) == sorted(map(id, targets))


def test_a_range_that_fails_leaves_the_hashed_prefix_and_a_retry_finishes_it(s3_store, tmp_path) -> None:
    import os

    from nomoat import direct, fetch

    blob = os.urandom(200_000)
    url = s3_store.presign_get(s3_store.put(blob), 60)
    calls = []

    def flaky(url: str, first: int, end: int, into) -> None:  # the real GET, but the 6th breaks off
        calls.append(first)
        if len(calls) == 6:
            raise direct.DirectError("the download broke off (a test)")
        fetch.get_range(url, first, end, into)

    target = _target(tmp_path / "f", url, len(blob))
    with pytest.raises(direct.DirectError):
        fetch.download([target], threads=3, range_size=10_000, fetch=flaky)
    os.close(target.fd)
    kept = (tmp_path / "f").read_bytes()
    assert len(kept) == target.hashed < len(blob) and kept == blob[: len(kept)]  # cut to the hashed prefix
    again = _target(tmp_path / "f", url, len(blob), start=len(kept))
    fetch.download([again], threads=3, range_size=10_000)
    os.close(again.fd)
    assert (tmp_path / "f").read_bytes() == blob and again.digest.hexdigest() == hashlib.sha256(blob).hexdigest()


def test_an_expired_url_is_a_sentence_not_a_traceback(s3_store, tmp_path) -> None:
    from nomoat import direct, fetch

    url = s3_store.presign_get(s3_store.put(b"x" * 100), 1)
    time.sleep(2.5)
    target = _target(tmp_path / "f", url, 100)
    with pytest.raises(direct.DirectError, match="the object store answered 403"):
        fetch.download([target])
