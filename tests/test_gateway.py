"""The asyncio gateway (coordinator.gateway.lanes, coordinator.server.grpc_server): streams and
long-polls hold no thread a heartbeat needs.

Real server on loopback (tests.rig), real ledger. No timing is asserted: a heartbeat either
succeeds within a generous deadline or the test fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from coordinator.gateway import lanes, long_polls
from coordinator.gateway.lanes import QUEUE_DEPTH, Limits
from nomoat.client import RETRY_AFTER
from nomoat.v1 import nomoat_pb2 as pb
from tests import rig as rigs
from tests.rig import Rig, published  # noqa: F401  (fixture)
from worker import uploader

CARD = pb.Card(name="RTX 4090", vram_gb=24.0)
MANY = pb.JobConfig(lora_rank=rigs.RANK, lora_alpha=rigs.ALPHA, target_modules=rigs.TARGETS, tokens_per_task=64)


def held_upload(task_id: str, fence: int, release: threading.Event) -> Iterator[pb.UploadChunk]:
    """An upload that sends its manifest and then nothing until ``release``: a stream the
    coordinator reads in a thread of its own."""
    yield pb.UploadChunk(manifest=pb.AdapterManifest(task_id=task_id, fence=fence, size=1000, sha256="0" * 64,
                                                     lease_secret=rigs.SECRET))  # the lease's holder
    release.wait(60)


class Holders:
    """Streams held open against a rig, closed on exit."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.release = threading.Event()
        self.calls: list = []

    def watch(self, job_id: str, n: int) -> None:
        stub = self.rig.client("reader").jobs
        for _ in range(n):
            call = stub.Watch(pb.WatchRequest(job_id=job_id), timeout=60, metadata=self.rig.meta("reader"))
            next(call)  # the stream is open and answered once
            self.calls.append(call)

    def upload(self, task_ids: list[str]) -> None:
        """One upload held open under a lease of each task (a lease takes one at a time)."""
        stub = self.rig.client("worker").workers
        for task_id in task_ids:
            fence = self.rig.lease(task_id)
            self.calls.append(stub.Upload.future(held_upload(task_id, fence, self.release), timeout=60,
                                                 metadata=self.rig.meta("worker")))

    def poll(self, worker_id: str, n: int) -> None:
        stub = self.rig.client("worker").workers
        for _ in range(n):
            self.calls.append(stub.RequestWork.future(pb.WorkRequest(worker_id=worker_id, wait_s=20), timeout=60,
                                                      metadata=self.rig.meta("worker")))

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()


@pytest.fixture
def small(redis_client, published, tmp_path) -> Iterator[Rig]:  # noqa: F811
    """A rig whose lanes have one or two threads each: what was "four threads, four watchers". One
    caller may take a whole kind here (its share is 1): these tests fill the lanes from one token."""
    r = rigs.start(redis_client, published, tmp_path, lease_ttl_s=4.0, long_poll_s=20.0, max_streams_per_caller=256,
                   limits=Limits(beat_threads=2, call_threads=2, step_threads=1,
                                 streams={"Watch": 64, "Pull": 4, "FetchShard": 4, "Submit": 1, "Upload": 8},
                                 caller_share=1.0))
    yield r
    r.close()


def test_heartbeats_are_answered_while_watchers_uploads_and_long_polls_hold_streams(small: Rig) -> None:
    job_id = small.submit(config=MANY).job_id
    task_ids = small.ledger.tasks.ids(job_id)
    assert len(task_ids) > 8
    worker_id = small.client("worker").register("w", CARD).worker_id
    held = Holders(small)
    try:
        held.watch(job_id, 48)  # more watchers than the server has threads, many times over
        held.upload(task_ids[:8])  # every thread an upload may take
        held.poll(worker_id, 64)
        time.sleep(0.5)  # the uploads and polls have reached the server and wait there
        ended = [c.exception() for c in held.calls[48:] if c.done()]
        assert not ended, f"held streams ended early: {ended}"
        task_id = task_ids[8]
        fence = small.lease(task_id, worker_id=worker_id)
        beater = small.client("worker")
        for _ in range(3):
            assert beater.heartbeat(task_id, fence, worker_id, secret=rigs.SECRET).ok  # a 15 s deadline: generous
        assert small.client("worker").register("w2", CARD).worker_id  # registration too
        assert small.client("reader").status(job_id).jobs[0].job_id == job_id
    finally:
        held.close()
    assert small.healthy()


def test_watchers_do_not_starve_heartbeats_into_losing_a_lease(small: Rig) -> None:
    """The failure this gateway replaces: four Watch streams held the four threads of a
    four-thread server and every heartbeat waited behind them until the lease expired."""
    job_id = small.submit().job_id
    task_id = small.ledger.tasks.ids(job_id)[0]
    fence = small.lease(task_id)
    worker = small.client("worker")
    assert worker.heartbeat(task_id, fence, secret=rigs.SECRET).ok  # the lease now lives by heartbeats (4 s each)
    held = Holders(small)
    try:
        held.watch(job_id, 16)
        until = time.monotonic() + 10  # 2.5 lease lifetimes
        while time.monotonic() < until:
            assert worker.heartbeat(task_id, fence, secret=rigs.SECRET).ok
            time.sleep(1.0)
        assert small.ledger.leases.problem(task_id, fence) == ""
    finally:
        held.close()


@pytest.fixture
def queued(redis_client, published, tmp_path) -> Iterator[Callable[[float], Rig]]:  # noqa: F811
    """Rigs that take two uploads at once and let others wait ``queue_s`` for a slot."""
    made: list[Rig] = []

    def make(queue_s: float) -> Rig:
        made.append(rigs.start(redis_client, published, tmp_path / str(len(made)), max_streams_per_caller=256,
                               limits=Limits(streams={"Watch": 8, "Pull": 4, "FetchShard": 4, "Submit": 1,
                                                      "Upload": 2}, queue_s={"Upload": queue_s},
                                      caller_share=1e6)))  # one token stands for many volunteers: no share
        return made[-1]

    yield make
    for rig in made:
        rig.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "not reached in time"
        time.sleep(0.05)


def upload_call(rig: Rig, task_id: str, data: bytes):
    """A whole upload of ``data`` under a new lease of ``task_id``, as a future."""
    chunks = [pb.UploadChunk(manifest=rigs.manifest(task_id, rig.lease(task_id), data)), pb.UploadChunk(data=data)]
    return rig.client("worker").workers.Upload.future(iter(chunks), timeout=60, metadata=rig.meta("worker"))


def test_an_upload_past_its_limit_waits_for_a_slot_and_is_received(queued) -> None:
    """A volunteer that finished a unit while the gateway was receiving as many uploads as it
    takes is not refused: its upload waits for a slot."""
    rig = queued(60.0)
    task_ids = rig.ledger.tasks.ids(rig.submit(config=MANY).job_id)
    held = Holders(rig)
    try:
        held.upload(task_ids[:2])  # both slots
        wait_until(lambda: rig.deps.lanes.waiting("Upload") == 0 and len(held.calls) == 2)
        time.sleep(0.3)  # (the two held streams reach the server)
        call = upload_call(rig, task_ids[2], rigs.make_adapter(rig.deps.shapes))
        wait_until(lambda: rig.deps.lanes.waiting("Upload") == 1)
        assert not call.done()
        held.calls[0].cancel()  # one upload ends: its slot goes to the one waiting
        assert call.result(timeout=30).accepted
    finally:
        held.close()


def test_past_the_upload_queue_an_upload_is_refused_with_a_time_to_try_again(queued) -> None:
    """The queue is bounded (QUEUE_DEPTH waiting per slot, each for queue_s at most): past it,
    RESOURCE_EXHAUSTED with a sentence and the trailer that says when to come back; other kinds
    of stream still have room."""
    rig = queued(8.0)
    job_id = rig.submit(config=MANY).job_id
    task_ids = rig.ledger.tasks.ids(job_id)
    depth = 2 * QUEUE_DEPTH
    assert len(task_ids) > 3 + depth
    held = Holders(rig)
    try:
        held.upload(task_ids[:2])
        time.sleep(0.3)
        held.upload(task_ids[2 : 2 + depth])  # these wait
        wait_until(lambda: rig.deps.lanes.waiting("Upload") == depth)
        with pytest.raises(grpc.RpcError) as refused:
            upload_call(rig, task_ids[2 + depth], b"\0" * 16).result(timeout=15)  # at once, not in 8 s
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"as many Uploads as it takes (2, and {depth} waiting); try again in 5 s" in refused.value.details()
        assert (RETRY_AFTER, "5") in refused.value.trailing_metadata()
        held.watch(job_id, 2)  # another kind still has room
        waited = held.calls[2].exception(timeout=30)  # a waiting one, once its 8 s are up
        assert waited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "none ended within 8 s; try again in 5 s" in waited.details()
    finally:
        held.close()


def test_the_uploader_waits_out_a_full_gateway_without_failing(queued, monkeypatch, caplog) -> None:
    """The worker's side: a refusal for capacity is waited out (the time the gateway names,
    jittered), not counted as a failed try; the upload is accepted once a slot frees."""
    monkeypatch.setattr(lanes, "RETRY_AFTER_S", 0.5)
    rig = queued(0.2)
    task_ids = rig.ledger.tasks.ids(rig.submit(config=MANY).job_id)
    held = Holders(rig)
    data = rigs.make_adapter(rig.deps.shapes)
    results: list = []
    try:
        held.upload(task_ids[:2])
        time.sleep(0.3)
        manifest = rigs.manifest(task_ids[2], rig.lease(task_ids[2]), data)
        with caplog.at_level(logging.INFO, logger=uploader.log.name):
            sender = threading.Thread(target=lambda: results.append(
                uploader.upload(rig.client("worker"), manifest, data, patience_s=60, backoff_s=30)))
            sender.start()
            wait_until(lambda: "receiving as many uploads as it takes" in caplog.text)
            held.close()  # the slots free
            sender.join(60)
        assert results and results[0].accepted, results
        assert results[0].attempts == 1  # (a failed try would have waited backoff_s = 30 s)
    finally:
        held.close()


def test_one_volunteers_held_pulls_and_watches_leave_another_its_pull_and_heartbeats(redis_client, published,  # noqa: F811
                                                                                    tmp_path) -> None:
    """A volunteer opens pulls and reads one message of each (a slow reader: each stream, and its
    slot, stays held) and Watch streams, as many as it is let. It is refused past its share of each
    kind; another volunteer still pulls the model, and its heartbeats are answered."""
    small = rigs.start(redis_client, published, tmp_path, max_streams_per_caller=256,
                       limits=Limits(beat_threads=2, call_threads=2, step_threads=1,
                                     streams={"Watch": 8, "Pull": 4, "FetchShard": 4, "Submit": 1, "Upload": 8}))
    job_id = small.submit().job_id
    task_id = small.ledger.tasks.ids(job_id)[0]
    mallory = small.client(token=small.registry.create("worker", "mallory"))
    held, refusals = [], []
    try:
        for _ in range(8):  # twice the Pull lane
            call = mallory._pull(pb.PullRequest(version=-1), timeout=60, metadata=mallory._meta)
            held.append(call)
            try:
                next(call)
            except grpc.RpcError as exc:
                refusals.append((exc.code(), exc.details()))
        watches = [mallory.jobs.Watch(pb.WatchRequest(job_id=job_id), timeout=60, metadata=mallory._meta)
                   for _ in range(16)]  # twice the Watch lane
        held += watches
        for call in watches:
            try:
                next(call)
            except grpc.RpcError as exc:
                refusals.append((exc.code(), exc.details()))
        assert len(refusals) == (8 - 1) + (16 - 2), refusals  # its share: a quarter of each kind
        assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the most one caller may hold" in why
                   for code, why in refusals), refusals
        alice = small.client(token=small.registry.create("worker", "alice"))
        worker_id = alice.register("alice", CARD).worker_id
        fence = small.lease(task_id, worker_id=worker_id)
        assert alice.heartbeat(task_id, fence, worker_id, secret=rigs.SECRET).ok
        assert alice.pull(tmp_path / "alice-model", patience_s=10) == 0  # the model, whole
        assert alice.heartbeat(task_id, fence, worker_id, secret=rigs.SECRET).ok
    finally:
        for call in held:
            call.cancel()
        small.close()


def test_a_long_poll_is_woken_when_a_run_is_placed(small: Rig, monkeypatch) -> None:
    monkeypatch.setattr(long_polls, "RECHECK_S", 60.0)  # only the wake-up can answer within 10 s
    worker_id = small.client("worker").register("w", CARD).worker_id
    call = small.client("worker").workers.RequestWork.future(pb.WorkRequest(worker_id=worker_id, wait_s=20),
                                                             timeout=60, metadata=small.meta("worker"))
    time.sleep(0.5)
    assert not call.done()
    small.ledger.inbox.place("run-1", worker_id, [], ["{}"])
    reply = call.result(timeout=10)  # the poll's own end is 20 s away
    assert reply.run_id == "run-1"

