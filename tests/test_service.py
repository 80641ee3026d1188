"""The gRPC layer over real loopback: auth, submit, workers, uploads and pull.

A real grpc.server with the AuthInterceptor and every servicer, a real Ledger on the session's
redis-server, a real BlobStore, and version 0 published the way ``Coordinator._start_model``
does. Clients are the one ``CoordinatorClient``; hand-built streams use its raw stubs.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import time
from dataclasses import replace

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordinator.ledger import JobState, VersionRecord
from coordinator.schedule.submit import read_records
from nomoat import adapter as adapter_format
from nomoat import lineage
from nomoat.client import CoordinatorClient, NomoatError
from nomoat.v1 import nomoat_pb2 as pb
from tests.rig import ALPHA, RANK, SECRET, TARGETS, TEXTS, Rig, manifest, published, rig  # noqa: F401  (fixtures)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# -- auth ------------------------------------------------------------------------------------------

def test_no_token_is_unauthenticated(rig: Rig) -> None:
    with pytest.raises(NomoatError, match="refused the token: no token: pass --token or set NOMOAT_TOKEN"):
        rig.client(None).status()
    err = rpc_error(lambda: rig.client().jobs.Status(pb.StatusRequest(), timeout=10))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_bad_token_is_unauthenticated(rig: Rig) -> None:
    client = CoordinatorClient(rig.address, token="nmt_a_not-a-real-token")
    try:
        with pytest.raises(NomoatError, match="the token is not valid"):
            client.status()
        err = rpc_error(lambda: client.models.Pull(pb.PullRequest(version=0), timeout=10,
                                                   metadata=(("authorization", "Bearer nope"),)).next())
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        client.close()


def test_a_token_read_from_a_file_with_its_newline_works(rig: Rig, monkeypatch) -> None:
    client = CoordinatorClient(rig.address, token=rig.tokens["reader"] + "\n")
    monkeypatch.setenv("NOMOAT_TOKEN", " " + rig.tokens["reader"] + "\r\n")
    from_env = CoordinatorClient(rig.address)
    try:
        assert [v.version for v in client.status().versions] == [0]
        assert [v.version for v in from_env.status().versions] == [0]
    finally:
        client.close()
        from_env.close()


def test_a_revoked_token_stops_working(rig: Rig) -> None:
    token = rig.deps.registry.create("reader")
    client = CoordinatorClient(rig.address, token=token)
    try:
        assert client.status().versions[0].version == 0
        assert rig.deps.registry.revoke(token)
        with pytest.raises(NomoatError, match="not valid"):
            client.status()
    finally:
        client.close()


def test_worker_may_not_submit(rig: Rig) -> None:
    path = rig.tmp / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(NomoatError, match="not allowed: a worker token may not call Submit"):
        rig.client("worker").submit(path)
    assert rig.ledger.jobs.ids() == []


def test_reader_may_read_but_not_submit_or_work(rig: Rig) -> None:
    reader = rig.client("reader")
    assert [v.version for v in reader.status().versions] == [0]
    assert reader.pull(rig.tmp / "pulled") == 0
    path = rig.tmp / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(NomoatError, match="a reader token may not call Submit"):
        reader.submit(path)
    with pytest.raises(NomoatError, match="a reader token may not call Register"):
        reader.register("r", pb.Card(name="x"))
    err = rpc_error(lambda: reader.workers.Upload(iter([]), timeout=10, metadata=rig.meta("reader")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_submitter_may_not_act_as_a_worker(rig: Rig) -> None:
    err = rpc_error(lambda: rig.client().workers.Heartbeat(pb.HeartbeatRequest(task_id="t", fence=1),
                                                            timeout=10, metadata=rig.meta("submitter")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_health_check_needs_no_token(rig: Rig) -> None:
    with grpc.insecure_channel(rig.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- submit ----------------------------------------------------------------------------------------

def test_submit_makes_a_job_of_pending_tasks(rig: Rig) -> None:
    reply = rig.submit()
    assert reply.job_id.startswith("j-") and reply.records == len(TEXTS) and reply.validation_records == 3
    assert reply.tasks > 1 and reply.tokens > 0
    job = rig.ledger.jobs.get(reply.job_id)
    assert job.name == "job" and job.state == "running" and job.total_tasks == reply.tasks
    assert (job.config.lora_rank, job.config.lora_alpha) == (RANK, ALPHA)
    assert job.config.target_modules == tuple(TARGETS)
    counts = rig.ledger.tasks.counts(reply.job_id)
    assert counts == {"pending": reply.tasks, "leased": 0, "done": 0, "failed": 0}
    assert len(rig.ledger.leases.pending()) == reply.tasks
    data = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()
    assert job.dataset == hashlib.sha256(data).hexdigest() and rig.store.get(job.dataset) == data
    status = rig.client("reader").status(reply.job_id)
    (info,) = status.jobs
    assert (info.job_id, info.total_tasks, info.tasks.pending, info.tokens) == \
           (reply.job_id, reply.tasks, reply.tasks, reply.tokens)
    assert math.isnan(info.base_loss)


def _nothing_stored(rig: Rig) -> None:
    assert rig.blob_files() == set(rig.v0_files.values())
    assert rig.ledger.jobs.ids() == [] and rig.ledger.leases.pending() == []


def test_bad_record_is_refused_naming_the_line_and_nothing_is_stored(rig: Rig) -> None:
    path = rig.tmp / "bad.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"\n{"text": "four"}\n')
    with pytest.raises(NomoatError) as info:
        rig.client("submitter").submit(path)
    assert str(info.value).startswith("bad.jsonl: line 3: not valid JSON")
    _nothing_stored(rig)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.jsonl", "", "'empty.jsonl' is empty"),
    ("data.csv", "text\nhello\n", "the file name must end in .jsonl or .txt"),
    ("one.jsonl", '{"text": "lonely"}\n', "at least 2 records"),
])
def test_unusable_files_are_refused(rig: Rig, name: str, content: str, message: str) -> None:
    path = rig.tmp / name
    path.write_text(content)
    with pytest.raises(NomoatError, match=message):
        rig.client("submitter").submit(path)
    _nothing_stored(rig)


def test_bad_config_is_refused(rig: Rig) -> None:
    with pytest.raises(NomoatError, match="target modules wq are not linear layers"):
        rig.submit(config=pb.JobConfig(target_modules=["wq"]))
    with pytest.raises(NomoatError, match=r"lora_rank = 5000 is out of range"):
        rig.submit(config=pb.JobConfig(lora_rank=5000))
    _nothing_stored(rig)


def _chunks(data: bytes, sha: str | None, size: int | None = None, filename: str = "d.jsonl"):
    yield pb.SubmitChunk(header=pb.SubmitHeader(name="n", filename=filename,
                                                size=len(data) if size is None else size))
    for i in range(0, len(data), 7):
        yield pb.SubmitChunk(data=data[i : i + 7])
    if sha is not None:
        yield pb.SubmitChunk(sha256=sha)


GOOD = b'{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n'


@pytest.mark.parametrize(("chunks", "code", "message"), [
    pytest.param(lambda: _chunks(GOOD, hashlib.sha256(b"other").hexdigest()), grpc.StatusCode.DATA_LOSS,
                 "sha256 mismatch", id="sha256-mismatch"),
    pytest.param(lambda: _chunks(GOOD, None), grpc.StatusCode.DATA_LOSS, "sha256 mismatch", id="no-sha256"),
    pytest.param(lambda: _chunks(GOOD, hashlib.sha256(GOOD).hexdigest(), size=len(GOOD) + 5),
                 grpc.StatusCode.DATA_LOSS, "incomplete", id="short"),
    pytest.param(lambda: _chunks(GOOD, hashlib.sha256(GOOD).hexdigest(), size=10),
                 grpc.StatusCode.INVALID_ARGUMENT, "more data arrived than the header announced", id="long"),
    pytest.param(lambda: iter([pb.SubmitChunk(data=GOOD)]), grpc.StatusCode.INVALID_ARGUMENT,
                 "the first message must be the header", id="no-header"),
    pytest.param(lambda: iter([]), grpc.StatusCode.INVALID_ARGUMENT, "no dataset was sent", id="nothing"),
    pytest.param(lambda: _chunks(GOOD, None, size=1 << 40), grpc.StatusCode.INVALID_ARGUMENT,
                 "accepts at most", id="too-big"),
])
def test_damaged_submit_streams_are_refused(rig: Rig, chunks, code, message) -> None:
    stub = rig.client().datasets
    err = rpc_error(lambda: stub.Submit(chunks(), timeout=10, metadata=rig.meta("submitter")))
    assert err.code() == code
    assert message in err.details()
    _nothing_stored(rig)


def test_a_hand_built_stream_with_the_right_sha256_is_accepted(rig: Rig) -> None:
    reply = rig.client().datasets.Submit(_chunks(GOOD, hashlib.sha256(GOOD).hexdigest()), timeout=30,
                                         metadata=rig.meta("submitter"))
    assert reply.records == 3 and reply.tasks == 1
    assert rig.ledger.jobs.get(reply.job_id).name == "n"


def test_status_of_an_unknown_job_is_not_found(rig: Rig) -> None:
    with pytest.raises(NomoatError, match="there is no job 'j-nope'"):
        rig.client("reader").status("j-nope")


def test_watch_ends_when_the_job_finishes(rig: Rig) -> None:
    job_id = rig.submit().job_id
    rig.ledger.jobs.finish(job_id, JobState.DONE)
    updates = list(rig.client("reader").watch(job_id, timeout=10))
    assert len(updates) == 1 and updates[0].finished and updates[0].job.state == "done"
    assert updates[0].current_version == 0


def test_watching_an_unknown_job_is_not_found(rig: Rig) -> None:
    with pytest.raises(NomoatError, match="there is no job 'j-nope'"):
        list(rig.client("reader").watch("j-nope", timeout=10))


# -- workers ---------------------------------------------------------------------------------------

CARD = pb.Card(name="RTX 3060", vram_gb=12.0, compute_capability="8.6", bf16=True, backend="cuda")


def test_register_returns_a_worker_id_and_how_to_join_ray_only_to_a_trusted_worker(rig: Rig) -> None:
    reply = rig.client("worker").register("alice-desktop", CARD, node_id="node-1")
    assert reply.worker_id.startswith("w-")
    assert (reply.ray_address, reply.ray_auth_token) == ("", "")  # a plain (public) worker token: no Ray
    trusted = rig.client("trusted-worker").register("lab-box", CARD, node_id="node-9")
    assert (trusted.ray_address, trusted.ray_auth_token) == ("10.0.0.1:6379", "ray-secret")
    rig.ledger.r.zrem("nomoat:workers", trusted.worker_id)  # the rest is about alice
    rig.ledger.r.delete(f"nomoat:worker:{trusted.worker_id}")
    (worker,) = rig.ledger.workers.all()
    assert worker.worker_id == reply.worker_id and worker.name == "alice-desktop"
    assert worker.node_id == "node-1" and worker.card == CARD.SerializeToString()
    assert worker.token == hashlib.sha256(rig.tokens["worker"].encode()).hexdigest()
    (info,) = rig.client("reader").status().workers
    assert (info.name, info.card, info.state) == ("alice-desktop", CARD, "active")
    with pytest.raises(NomoatError, match="a worker needs a name"):
        rig.client("worker").register("", CARD)


def test_a_worker_registering_again_keeps_its_id_only_with_its_own_token(rig: Rig) -> None:
    alice = rig.client(token=rig.registry.create("worker", "alice"))
    first = alice.register("alice-desktop", CARD).worker_id
    rig.ledger.r.hset(f"nomoat:worker:{first}", mapping={"tasks_done": 3, "tokens_per_s": 900.0})
    again = alice.register("alice-desktop", CARD, node_id="node-2", worker_id=first)
    assert again.worker_id == first
    (worker,) = rig.ledger.workers.all()
    assert (worker.node_id, worker.tasks_done, worker.tokens_per_s) == ("node-2", 3, 900.0)
    # Another card under the same id: its measured speed no longer applies.
    bigger = pb.Card(name="RTX 4090", vram_gb=24.0, backend="cuda")
    assert alice.register("alice-desktop", bigger, worker_id=first).worker_id == first
    assert rig.ledger.workers.get(first).tokens_per_s == 0.0  # unknown again
    # Someone else's id, or one nobody has: a new id, the old record untouched.
    bob = rig.client(token=rig.registry.create("worker", "bob"))
    stolen = bob.register("bob", CARD, worker_id=first).worker_id
    made_up = bob.register("bob", CARD, worker_id="w-00000000").worker_id
    assert len({first, stolen, made_up}) == 3 and "w-00000000" != made_up
    assert rig.ledger.workers.get(first).name == "alice-desktop"
    with pytest.raises(NomoatError, match="at most 64 characters"):
        bob.register("bob", CARD, worker_id="w" * 65)


def test_one_token_may_have_only_so_many_active_workers(rig: Rig) -> None:
    rig.deps.settings = replace(rig.deps.settings, max_workers_per_token=2)
    alice = rig.client(token=rig.registry.create("worker", "alice"))
    first, _ = (alice.register(f"alice-{i}", CARD).worker_id for i in range(2))
    with pytest.raises(NomoatError, match="already has 2 active workers"):
        alice.register("alice-2", CARD)
    assert len(rig.ledger.workers.all()) == 2  # nothing recorded for the refused one
    # A worker registering again under its own id is not a new one.
    assert alice.register("alice-0", CARD, worker_id=first).worker_id == first
    # Another volunteer's token has its own allowance.
    bob = rig.client(token=rig.registry.create("worker", "bob"))
    assert bob.register("bob", CARD).worker_id
    # A worker not heard from in three lease lifetimes no longer counts.
    rig.ledger.r.zadd("nomoat:workers", {first: time.time() - 3 * rig.deps.settings.lease_ttl_s - 1})
    assert alice.register("alice-2", CARD).worker_id


def test_heartbeat_extends_only_the_current_lease(rig: Rig) -> None:
    reply = rig.submit()
    task_id = rig.ledger.tasks.ids(reply.job_id)[0]
    worker = rig.client("worker")
    pending = worker.heartbeat(task_id, 1, secret=SECRET)  # a worker learns no task's state
    assert not pending.ok and pending.reason == f"this worker holds no lease of task {task_id} under fence 1"
    fence = rig.lease(task_id)
    before = time.time()
    ok = worker.heartbeat(task_id, fence, worker_id="", secret=SECRET)
    assert ok.ok and ok.reason == "" and before + 89 < ok.deadline < time.time() + 91
    assert rig.ledger.tasks.get(task_id).deadline == pytest.approx(ok.deadline)
    stale = worker.heartbeat(task_id, fence + 1, secret=SECRET)
    assert not stale.ok and stale.deadline == 0.0
    assert stale.reason == f"this worker holds no lease of task {task_id} under fence {fence + 1}"
    assert rig.ledger.tasks.get(task_id).deadline == pytest.approx(ok.deadline)


def test_a_heartbeat_whose_lease_is_reissued_meanwhile_never_says_ok_with_the_wrong_version(
        rig: Rig, monkeypatch) -> None:
    """Bug 5: a heartbeat was four ledger calls; a lease re-issued between them still got
    ``ok=True, base_version=0``. Here the lease is re-issued right after the heartbeat's first
    script runs (whatever it is): the reply must be a true answer from one moment of the ledger."""
    task_id = rig.ledger.tasks.ids(rig.submit().job_id)[0]
    for n in (1, 2):
        rig.ledger.versions.publish(VersionRecord(version=n, parent=n - 1))
    fence = rig.lease(task_id)
    client = rig.ledger.r
    evalsha, reissued = client.evalsha, []

    def then_reissue(*args):
        answer = evalsha(*args)
        if not reissued:  # as a coordinator whose lease expired would, between two steps
            reissued.append(True)
            rig.ledger.leases.expire(now=time.time() + 10**6)
            reissued.append(rig.ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=5))
        return answer

    monkeypatch.setattr(client, "evalsha", then_reissue)
    reply = rig.client("worker").heartbeat(task_id, fence, worker_id="", secret=SECRET)
    monkeypatch.undo()
    assert reissued[-1] > fence  # the lease did move on
    # Either the heartbeat came first (the run trains on version 2, the newest when it began) or
    # it came after the re-issue (lost); never ok with a version nobody claimed.
    assert (reply.ok and reply.base_version == 2) or (not reply.ok and "holds no lease" in reply.reason), reply
    lost = rig.client("worker").heartbeat(task_id, fence, secret=SECRET)
    assert not lost.ok and "holds no lease" in lost.reason and lost.base_version == 0


def test_heartbeat_for_an_unknown_task_is_refused_with_a_sentence(rig: Rig) -> None:
    reply = rig.client("worker").heartbeat("j-none-t000", 1, secret=SECRET)
    assert not reply.ok and reply.deadline == 0.0
    assert reply.reason == "this worker holds no lease of task j-none-t000 under fence 1"
    assert rig.client("admin").heartbeat("j-none-t000", 1).reason == "there is no task 'j-none-t000'"


def test_fetch_shard_needs_the_current_fence(rig: Rig) -> None:
    task_id = rig.ledger.tasks.ids(rig.submit().job_id)[0]
    worker = rig.client("worker")
    with pytest.raises(NomoatError, match=f"holds no lease of task {task_id} under fence 1"):
        worker.fetch_shard(task_id, 1, secret=SECRET)
    fence = rig.lease(task_id)
    with pytest.raises(NomoatError, match=f"holds no lease of task {task_id} under fence {fence - 1}"):
        worker.fetch_shard(task_id, fence - 1, secret=SECRET)
    with pytest.raises(NomoatError, match="holds no lease of task nope"):
        worker.fetch_shard("nope", fence, secret=SECRET)
    assert worker.fetch_shard(task_id, fence, secret=SECRET)


def test_fetch_shard_returns_exactly_the_tasks_records(rig: Rig) -> None:
    texts = TEXTS + ["line\u2028separator and next\x85line", "two\nlines and a \r"]
    reply = rig.submit(texts=texts)
    job = rig.ledger.jobs.get(reply.job_id)
    records = read_records(rig.store.get(job.records))
    n_val = job.n_validation
    worker = rig.client("worker")
    seen: list[str] = []
    for task in rig.ledger.tasks.of_job(reply.job_id):
        fence = rig.lease(task.task_id)
        data = worker.fetch_shard(task.task_id, fence, secret=SECRET)
        shard = [json.loads(line)["text"] for line in data.decode().split("\n") if line]
        assert shard == records[task.start : task.end] and shard
        seen += shard
    assert seen == records[n_val:]
    assert sorted(seen + records[:n_val]) == sorted(texts)


# -- upload ----------------------------------------------------------------------------------------

def make_adapter(rig: Rig, rank: int = RANK, alpha: float = ALPHA, seed: int = 0, targets=TARGETS,
                 bad=None) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for module, (d_out, d_in) in sorted(rig.deps.shapes.items()):
        if module.rsplit(".", 1)[-1] in targets:
            factors[module] = (torch.randn(rank, d_in, generator=gen) * 0.01,
                               torch.randn(d_out, rank, generator=gen) * 0.01)
    if bad:
        bad(factors)
    return adapter_format.to_bytes(adapter_format.Adapter(factors, rank=rank, alpha=alpha))


@pytest.fixture
def leased(rig: Rig) -> tuple[str, int]:
    task_id = rig.ledger.tasks.ids(rig.submit().job_id)[0]
    return task_id, rig.lease(task_id)


def test_upload_is_accepted_once_and_idempotent(rig: Rig, leased) -> None:
    task_id, fence = leased
    worker_id = rig.client("worker").register("w", CARD).worker_id
    data = make_adapter(rig)
    worker = rig.client("worker")
    first = worker.upload(manifest(task_id, fence, data, worker_id=worker_id), data)
    assert first.accepted and first.reason == "" and len(first.adapter_id) == 20
    again = worker.upload(manifest(task_id, fence, data, worker_id=worker_id), data)
    assert again.accepted and again.adapter_id == first.adapter_id
    (buffered,) = rig.ledger.adapters.buffered()
    assert buffered.adapter_id == first.adapter_id
    assert buffered.sha256 == hashlib.sha256(data).hexdigest()
    assert (buffered.tokens, buffered.rank, buffered.worker) == (300, RANK, worker_id)
    assert rig.store.get(buffered.sha256) == data
    task = rig.ledger.tasks.get(task_id)
    assert task.state == "done" and task.adapter == first.adapter_id
    assert rig.ledger.workers.all()[0].tasks_done == 1
    other = make_adapter(rig, seed=1)  # a different result for the same lease is not a retry
    late = worker.upload(manifest(task_id, fence, other), other)
    assert not late.accepted and "already done" in late.reason
    assert len(rig.ledger.adapters.buffered()) == 1


def test_an_upload_may_not_claim_more_tokens_than_its_task_holds(rig: Rig, leased) -> None:
    task_id, fence = leased
    data = make_adapter(rig)
    reply = rig.client("worker").upload(manifest(task_id, fence, data, tokens=10**15), data)
    assert reply.accepted
    (buffered,) = rig.ledger.adapters.buffered()
    assert buffered.tokens == rig.ledger.tasks.get(task_id).tokens != 10**15


def test_upload_with_the_fence_of_an_expired_lease_is_refused(rig: Rig, leased) -> None:
    task_id, old = leased
    assert rig.ledger.leases.expire(now=time.time() + 10**6) == [task_id]
    data = make_adapter(rig)
    worker = rig.client("worker")
    waiting = worker.upload(manifest(task_id, old, data), data)
    assert not waiting.accepted and waiting.reason == "the task is pending, not leased"  # told its own lease's fate
    new = rig.lease(task_id)
    assert new > old
    stale = worker.upload(manifest(task_id, old, data), data)
    # The refusal names no fence but the one sent: not the new one.
    assert not stale.accepted and stale.reason == f"this worker holds no lease of task {task_id} under fence {old}"
    assert rig.ledger.adapters.buffered() == [] and rig.ledger.tasks.get(task_id).state == "leased"
    fresh = worker.upload(manifest(task_id, new, data), data)
    assert fresh.accepted and len(rig.ledger.adapters.buffered()) == 1


def _nan(factors) -> None:
    module = sorted(factors)[0]
    factors[module][1][0, 0] = math.nan


def _transposed(factors) -> None:
    for module, (a, b) in factors.items():
        factors[module] = (torch.zeros(a.shape[0], a.shape[1] + 1), b)


def _drop_one(factors) -> None:
    del factors[sorted(factors)[0]]


BAD_UPLOADS = [
    # (id, bytes builder, manifest changes, fragment of the reason)
    ("sha256-mismatch", lambda r: make_adapter(r), {"sha256": "0" * 64}, "sha256 does not match"),
    ("size-mismatch", lambda r: make_adapter(r), {"size": 10},
     "more bytes arrived than the manifest announced"),
    ("garbage", lambda r: bytes(range(256)) * 8, {}, "not safetensors"),
    ("pickle", lambda r: pickle.dumps({"model.layers.0.self_attn.q_proj.lora_A": [1.0, 2.0]}), {},
     "not safetensors"),
    ("wrong-shapes", lambda r: make_adapter(r, bad=_transposed), {}, "lora_A is"),
    ("nan-factor", lambda r: make_adapter(r, bad=_nan), {}, "NaN or Inf"),
    ("manifest-lies-about-rank", lambda r: make_adapter(r), {"rank": 4}, "the manifest says rank 4"),
    ("file-has-other-rank", lambda r: make_adapter(r, rank=4), {"rank": 4}, "the job trains rank 2"),
    ("other-alpha", lambda r: make_adapter(r, alpha=8.0), {"alpha": 8.0}, "the job uses alpha 4.0"),
    ("missing-module", lambda r: make_adapter(r, bad=_drop_one), {}, "lacks 1 target module"),
    ("extra-module", lambda r: make_adapter(r, targets=TARGETS + ("o_proj",)), {}, "does not target"),
    ("wrong-base-version", lambda r: make_adapter(r), {"base_version": 3}, "base version 3"),
    ("unknown-task", lambda r: make_adapter(r), {"task_id": "j-x-t999"}, "holds no lease of task j-x-t999"),
]


@pytest.mark.parametrize(("build", "changes", "reason"),
                         [pytest.param(*case[1:], id=case[0]) for case in BAD_UPLOADS])
def test_bad_uploads_are_refused_and_nothing_is_buffered(rig: Rig, leased, build, changes, reason) -> None:
    task_id, fence = leased
    files_before = rig.blob_files()
    data = build(rig)
    reply = rig.client("worker").upload(manifest(task_id, fence, data, **changes), data)
    assert not reply.accepted and reply.adapter_id == ""
    assert reason in reply.reason, reply.reason
    assert rig.ledger.adapters.buffered() == []
    assert rig.ledger.tasks.get(task_id).state == "leased"
    assert rig.blob_files() == files_before
    good = make_adapter(rig)  # the lease survives a refused upload
    assert rig.client("worker").upload(manifest(task_id, fence, good), good).accepted


def test_upload_stream_without_manifest_is_invalid(rig: Rig) -> None:
    worker = rig.client()
    err = rpc_error(lambda: worker.workers.Upload(iter([pb.UploadChunk(data=b"x")]), timeout=10,
                                                  metadata=rig.meta("worker")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "manifest" in err.details()
    err = rpc_error(lambda: worker.workers.Upload(iter([]), timeout=10, metadata=rig.meta("worker")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "no manifest" in err.details()


def test_a_second_manifest_is_invalid(rig: Rig, leased) -> None:
    task_id, fence = leased
    data = make_adapter(rig)
    chunks = [pb.UploadChunk(manifest=manifest(task_id, fence, data))] * 2 + [pb.UploadChunk(data=data)]
    stub = rig.client().workers
    err = rpc_error(lambda: stub.Upload(iter(chunks), timeout=10, metadata=rig.meta("worker")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "sent twice" in err.details()
    assert rig.ledger.adapters.buffered() == []


def test_an_adapter_over_the_size_limit_is_refused(rig: Rig, leased) -> None:
    task_id, fence = leased
    data = make_adapter(rig)
    reply = rig.client("worker").upload(manifest(task_id, fence, data, size=(256 << 20) + 1), data)
    assert not reply.accepted and "the limit is" in reply.reason


# -- pull ------------------------------------------------------------------------------------------

def test_pull_streams_a_loadable_model_folder(rig: Rig) -> None:
    out = rig.tmp / "model"
    assert rig.client("reader").pull(out) == 0
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {lineage.STAMP}
    card = {"README.md", "nomoat.json"}  # and its model card (issue 20)
    assert names == {p for p in rig.v0_files if not p.startswith("nomoat-")} | card
    assert "config.json" in names and "model.safetensors" in names
    for name in names - card:
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == rig.v0_files[name]
    assert json.loads((out / "nomoat.json").read_text())["version"] == 0
    # the folder names what it holds: version 0 of this coordinator's lineage, with every file's hash
    assert lineage.problem(out, rig.deps.history.lineage().id, 0) == ""
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello world", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    assert not list(rig.tmp.glob(".model-*"))  # no temporary folder left behind
    assert rig.client("reader").pull(out, version=0) == 0  # pulling over an existing folder


def test_pulling_a_missing_version_fails_cleanly(rig: Rig) -> None:
    out = rig.tmp / "model"
    with pytest.raises(NomoatError, match="there is no version 7"):
        rig.client("reader").pull(out, version=7)
    assert not out.exists() and not list(rig.tmp.glob(".model-*"))


def test_an_unknown_pull_format_is_refused(rig: Rig) -> None:
    err = rpc_error(lambda: rig.client("reader").models.Pull(pb.PullRequest(version=0, format=7), timeout=10,
                                                             metadata=rig.meta("reader")).next())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown pull format 7" in err.details()


def test_overlong_registration_fields_are_refused(rig: Rig) -> None:
    with pytest.raises(NomoatError, match="limited to 200 characters"):
        rig.client("worker").register("w", pb.Card(name="x"), node_id="n" * 201)
