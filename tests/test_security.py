"""Who may do what, over real gRPC on loopback: tokens and roles, TLS, own-task leases, limits.

The server is the coordinator's own (``coordinator.server.grpc_server`` and ``bind``, see
tests/rig.py); the ledger is the session's real redis-server.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.ledger import keys
from coordinator.gateway.auth import PERMISSIONS, TokenRegistry, token_id
from coordinator.ledger import Ledger
from coordinator.server import MAX_MESSAGE
from nomoat.cli import main
from nomoat.client import CoordinatorClient, NomoatError
from nomoat.v1 import nomoat_pb2 as pb
from tests import rig as rigs
from tests.rig import Rig, Tls, make_adapter, manifest, published, rig  # noqa: F401  (fixtures)

CARD = pb.Card(name="RTX 3060", vram_gb=12.0)


def methods() -> list[tuple[str, bool, bool]]:
    """(path, client streaming, server streaming) of every RPC in the proto."""
    return [(f"/{s.full_name}/{m.name}", m.client_streaming, m.server_streaming)
            for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods]


def raw_call(channel: grpc.Channel, method: str, client_streaming: bool, server_streaming: bool,
             payload: list[bytes], metadata=(), timeout: float = 10.0):
    """Call ``method`` with already-serialized bytes; returns the raw reply bytes (a list if streamed)."""
    if client_streaming:
        call = (channel.stream_stream if server_streaming else channel.stream_unary)(method)
        request = iter(payload)
    else:
        call = (channel.unary_stream if server_streaming else channel.unary_unary)(method)
        request = payload[0] if payload else b""
    reply = call(request, timeout=timeout, metadata=metadata)
    return list(reply) if server_streaming else reply


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


# -- tokens and roles ----------------------------------------------------------------------------


def test_no_token_or_a_bad_token_is_unauthenticated_with_a_sentence(rig: Rig) -> None:
    with pytest.raises(NomoatError, match="refused the token: no token: pass --token or set NOMOAT_TOKEN"):
        rig.client(None).status()
    with pytest.raises(NomoatError, match=r"refused the token: the token is not valid \(unknown or revoked\)"):
        rig.client(token="nmt_a_made-up").status()
    for path, cs, ss in methods():
        code, detail = code_of(lambda: raw_call(rig.client(None).channel, path, cs, ss, [b""]))
        assert code == grpc.StatusCode.UNAUTHENTICATED and detail.startswith("no token"), (path, code)


def test_health_check_needs_no_token(rig: Rig) -> None:
    reply = health_pb2_grpc.HealthStub(rig.client(None).channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("role", rigs.ROLES)
def test_each_role_reaches_exactly_its_methods(rig: Rig, role: str) -> None:
    """Every RPC of the proto, called with an empty request: PERMISSION_DENIED iff not allowed."""
    channel = rig.client(role).channel
    for path, cs, ss in methods():
        allowed = role == "admin" or role in PERMISSIONS.get(path, set())
        code, detail = code_of(lambda: raw_call(channel, path, cs, ss, [b""], rig.meta(role)))
        if allowed:
            assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                                grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED), (role, path, code, detail)
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, (role, path, code)
            assert detail == f"a {role} token may not call {path.rsplit('/', 1)[-1]}"


@pytest.mark.parametrize("role", ["reader", "submitter", "worker"])
def test_only_admin_may_manage_tokens(rig: Rig, role: str) -> None:
    client = rig.client(role)
    for call in (lambda: client.create_token("admin"), client.list_tokens, lambda: client.revoke_token("x")):
        with pytest.raises(NomoatError, match=f"not allowed: a {role} token may not call"):
            call()


def test_create_list_revoke_round_trip(rig: Rig) -> None:
    admin = rig.client("admin")
    made = admin.create_token("submitter", "alice")
    assert made.token.startswith("nmt_s_") and made.token_id == token_id(made.token)
    listed = {t.token_id: t for t in admin.list_tokens()}
    assert listed[made.token_id].role == "submitter" and listed[made.token_id].name == "alice"
    assert made.token not in str(admin.list_tokens())  # only ids are listed
    assert len(listed) == len(rigs.ROLES) + 1

    alice = rig.client(token=made.token)
    assert [(v.version, v.parent) for v in alice.status().versions] == [(0, -1)]  # the rig's base model
    assert admin.revoke_token(made.token_id)  # by id; immediate on this coordinator
    with pytest.raises(NomoatError, match="not valid"):
        alice.status()
    assert made.token_id not in {t.token_id for t in admin.list_tokens()}
    with pytest.raises(NomoatError, match="no such token"):
        admin.revoke_token(made.token)  # by the token itself: already gone

    other = admin.create_token("reader")
    assert admin.revoke_token(other.token)
    with pytest.raises(NomoatError, match="not valid"):
        rig.client(token=other.token).status()
    with pytest.raises(NomoatError, match="unknown role 'root'"):
        admin.create_token("root")


def test_a_revocation_reaches_another_coordinator_within_its_cache_time(rig: Rig) -> None:
    other = TokenRegistry(Ledger(rig.ledger.r).tokens, cache_s=0.5)  # a second coordinator on the same Redis
    token = rig.registry.create("worker")
    assert other.lookup(token) is not None
    rig.registry.revoke(token)
    assert rig.registry.lookup(token) is None
    deadline = time.monotonic() + 2.0
    while other.lookup(token) is not None:
        assert time.monotonic() < deadline, "the revoked token was still accepted after the cache time"
        time.sleep(0.05)


def test_a_revoked_data_dir_token_is_replaced_not_revived(rig: Rig, tmp_path) -> None:
    path = tmp_path / "worker.token"
    first = rig.registry.ensure_file(path, "worker")
    rig.ledger.r.hdel(keys.TOKENS, token_id(first))  # Redis lost it: the same token comes back
    assert rig.registry.ensure_file(path, "worker") == first and rig.registry.lookup(first)
    rig.registry.revoke(first)  # an operator revoked it: a restart must not bring it back
    second = rig.registry.ensure_file(path, "worker")
    assert second != first and path.read_text().strip() == second
    assert rig.registry.lookup(first) is None and rig.registry.lookup(second).role == "worker"
    assert path.stat().st_mode & 0o777 == 0o600


def test_token_commands(rig: Rig) -> None:
    runner = CliRunner()
    base = ["--coordinator", rig.address, "--token", rig.tokens["admin"]]
    made = runner.invoke(main, [*base, "token", "create", "--role", "reader", "--name", "bob"])
    assert made.exit_code == 0, made.output
    token = made.stdout.strip()
    assert made.stdout == token + "\n" and token.startswith("nmt_r_")  # $(nomoat token create ...) works
    assert rig.registry.lookup(token).role == "reader"

    listed = runner.invoke(main, [*base, "token", "list"])
    assert listed.exit_code == 0 and f"{token_id(token)}  reader" in listed.stdout and "bob" in listed.stdout
    assert token not in listed.stdout

    denied = runner.invoke(main, ["--coordinator", rig.address, "--token", token, "token", "list"])
    assert denied.exit_code == 1 and "not allowed: a reader token may not call ListTokens" in denied.stderr
    assert "Traceback" not in denied.output

    revoked = runner.invoke(main, ["token", "revoke", token_id(token), *base])  # options after the command too
    assert revoked.exit_code == 0 and rig.registry.lookup(token) is None
    again = runner.invoke(main, [*base, "token", "revoke", token])
    assert again.exit_code == 1 and "no such token" in again.stderr
    for command in ("create", "revoke", "list"):
        helped = runner.invoke(main, ["token", command, "--help"])
        assert helped.exit_code == 0 and "Example: " in helped.stdout


# -- TLS -----------------------------------------------------------------------------------------


@pytest.fixture
def tls_rig(redis_client, published, tmp_path):  # noqa: F811
    tls = Tls.make(tmp_path / "tls")
    r = rigs.start(redis_client, published, tmp_path, tls=tls)
    yield r
    r.close()


def test_tls_with_the_right_ca_works_and_everything_else_fails_with_a_sentence(tls_rig: Rig, tmp_path) -> None:
    assert tls_rig.healthy()
    assert [(v.version, v.parent) for v in tls_rig.client("reader").status().versions] == [(0, -1)]

    plain = CoordinatorClient(tls_rig.address, token=tls_rig.tokens["reader"])
    with pytest.raises(NomoatError, match=r"cannot reach the coordinator .* if it uses TLS, did you pass --tls-ca"):
        plain.status()
    plain.close()

    wrong = Tls.make(tmp_path / "other", name="other")
    stranger = CoordinatorClient(tls_rig.address, token=tls_rig.tokens["reader"], tls_ca=str(wrong.ca))
    with pytest.raises(NomoatError, match=f"cannot reach the coordinator at {tls_rig.address}: the TLS handshake "
                                          r"failed .*; is --tls-ca the CA that signed its certificate\?"):
        stranger.status()
    stranger.close()
    assert tls_rig.healthy()  # the refused handshakes left it serving


# -- a lease is its worker's from the moment it is granted ---------------------------------------


SECRET = "5ec12e75ec12e75ec12e75ec12e75ec1"


@pytest.fixture
def two_workers(rig: Rig):
    """Two volunteers with their own worker tokens, each registered once, and a task leased to
    Alice's worker with a secret only her run's spec carries."""
    alice = rig.client(token=rig.registry.create("worker", "alice"))
    bob = rig.client(token=rig.registry.create("worker", "bob"))
    ids = {"alice": alice.register("alice", CARD).worker_id, "bob": bob.register("bob", CARD).worker_id}
    task_id = rig.ledger.tasks.ids(rig.submit().job_id)[0]
    return alice, bob, ids, task_id, rig.lease(task_id, worker_id=ids["alice"], secret=SECRET)


def assert_refused_all(rig: Rig, client: CoordinatorClient, task_id: str, fence: int, worker_id: str,
                       secret: str) -> None:
    """``client`` naming ``worker_id`` with ``secret`` cannot renew, read the shard, resume or
    upload, and learns nothing but that it holds no such lease."""
    neutral = f"this worker holds no lease of task {task_id} under fence {fence}"
    beat = client.heartbeat(task_id, fence, worker_id, secret=secret)
    assert not beat.ok and beat.reason == neutral
    with pytest.raises(NomoatError, match=neutral) as caught:
        client.fetch_shard(task_id, fence, worker_id, secret)
    assert "not found" in str(caught.value).lower() or "no lease" in str(caught.value)
    data = make_adapter(rig.deps.shapes, seed=7)
    m = manifest(task_id, fence, data, worker_id=worker_id, lease_secret=secret)
    assert client.upload_offset(task_id, fence, m.sha256, worker_id, secret) == 0
    stolen = client.upload(m, data)
    assert not stolen.accepted and stolen.reason == neutral
    assert not list((rig.tmp / "uploads").glob("*.part")) if (rig.tmp / "uploads").exists() else True


def test_a_lease_is_its_workers_and_nobody_else_can_use_it_even_with_the_right_fence(rig: Rig,
                                                                                  two_workers) -> None:
    """The hijack: Bob, a volunteer with a worker token of his own, knows the task id and the
    fence (even the right one) of a lease placed on Alice's worker, and calls first."""
    alice, bob, ids, task_id, fence = two_workers
    for worker_id, secret in [(ids["bob"], ""), (ids["bob"], "guess"), (ids["alice"], ""), (ids["alice"], "guess"),
                              ("", SECRET), (ids["bob"], SECRET)]:
        assert_refused_all(rig, bob, task_id, fence, worker_id, secret)
    # Alice's own token without the secret, or the secret under another of her workers, is refused too.
    laptop = alice.register("alice-laptop", CARD).worker_id
    for worker_id, secret in [(ids["alice"], ""), (laptop, SECRET), (ids["alice"], SECRET[::-1])]:
        assert_refused_all(rig, alice, task_id, fence, worker_id, secret)
    assert rig.ledger.tasks.get(task_id).state == "leased" and not rig.ledger.adapters.buffered()

    # Nothing any of that did took the lease from Alice's run, which shows its worker and secret.
    assert alice.heartbeat(task_id, fence, ids["alice"], secret=SECRET).ok
    assert alice.fetch_shard(task_id, fence, ids["alice"], SECRET)
    data = make_adapter(rig.deps.shapes)
    done = alice.upload(manifest(task_id, fence, data, worker_id=ids["alice"], lease_secret=SECRET), data)
    assert done.accepted, done.reason
    assert rig.ledger.workers.get(ids["alice"]).tasks_done == 1 and rig.ledger.workers.get(ids["bob"]).tasks_done == 0
    # After it is done the holder's retry is a duplicate; Bob still learns nothing.
    again = alice.upload(manifest(task_id, fence, data, worker_id=ids["alice"], lease_secret=SECRET), data)
    assert again.accepted and again.adapter_id == done.adapter_id
    assert bob.heartbeat(task_id, fence, ids["bob"]).reason == f"this worker holds no lease of task {task_id} " \
                                                               f"under fence {fence}"


def test_no_refusal_names_a_fence_or_a_holder(rig: Rig, two_workers) -> None:
    """A wrong fence is answered with the fence the caller sent and nothing else: not the current
    one, not whose lease it is."""
    alice, bob, ids, task_id, fence = two_workers
    for guess in (fence - 1, fence + 1, fence + 100):
        for client, worker_id in ((bob, ids["bob"]), (alice, ids["alice"])):
            beat = client.heartbeat(task_id, guess, worker_id, secret=SECRET)
            assert not beat.ok and beat.reason == f"this worker holds no lease of task {task_id} under fence {guess}"
            assert str(fence) not in beat.reason.replace(task_id, "").replace(str(guess), "") and ids["alice"] not in beat.reason


def test_a_reissued_lease_belongs_to_the_worker_it_is_placed_on_with_a_new_secret(rig: Rig, two_workers) -> None:
    alice, bob, ids, task_id, fence = two_workers
    assert alice.heartbeat(task_id, fence, ids["alice"], secret=SECRET).ok
    assert rig.ledger.leases.expire(time.time() + 3600) == [task_id]
    new = rig.lease(task_id, worker_id=ids["bob"], secret="new" + SECRET)
    assert not bob.heartbeat(task_id, new, ids["bob"], secret=SECRET).ok  # the old secret does not carry over
    assert bob.heartbeat(task_id, new, ids["bob"], secret="new" + SECRET).ok
    stale = alice.heartbeat(task_id, fence, ids["alice"], secret=SECRET)
    assert not stale.ok and stale.reason == f"this worker holds no lease of task {task_id} under fence {fence}"
    assert not alice.heartbeat(task_id, new, ids["alice"], secret="new" + SECRET).ok


def test_admin_is_exempt_and_takes_nothing(rig: Rig, two_workers) -> None:
    alice, _, ids, task_id, fence = two_workers
    admin = rig.client("admin")
    assert admin.heartbeat(task_id, fence).ok and admin.fetch_shard(task_id, fence)
    assert alice.heartbeat(task_id, fence, ids["alice"], secret=SECRET).ok
    assert rig.ledger.tasks.get(task_id).holder_worker == ids["alice"]


def test_a_report_speaks_only_for_its_own_run_and_leases(rig: Rig, two_workers) -> None:
    """Bob cannot report on (or hand back) a run placed on Alice's worker, and Alice's report
    must show each unit's lease secret."""
    from coordinator.schedule.inbox_dispatch import OutboundDispatcher
    from nomoat.spec import LoraConfig, TaskSpec, TrainConfig, UnitResult

    alice, bob, ids, task_id, fence = two_workers
    spec = TaskSpec(task_id, "job", fence, 0, 300, rig.address, "", LoraConfig(2, 4.0, ("q_proj",)),
                    TrainConfig(64, 4, 1e-3, 1, 0), 60.0, lease_secret=SECRET)
    dispatcher = OutboundDispatcher(rig.ledger)
    dispatcher.submit([spec], {}, "outbound:" + ids["alice"])
    run_id = next(iter(dispatcher._runs))
    unit = UnitResult(task_id, fence, "boom").to_dict()
    import json

    with pytest.raises(NomoatError, match=f"worker {ids['bob']} has no run"):
        bob.report_run(ids["bob"], run_id, [json.dumps(unit)], [task_id], {task_id: SECRET})
    with pytest.raises(NomoatError, match="registered with another"):
        bob.report_run(ids["alice"], run_id, [], [task_id], {task_id: SECRET})
    with pytest.raises(NomoatError, match="with the lease secret its spec carried"):
        alice.report_run(ids["alice"], run_id, [], [task_id], {task_id: "guess"})
    assert rig.ledger.tasks.get(task_id).state == "leased"
    alice.report_run(ids["alice"], run_id, [], [task_id], {task_id: SECRET})
    assert rig.ledger.tasks.get(task_id).state == "pending"  # handed back by its holder


# -- message and stream limits -------------------------------------------------------------------


def test_an_oversized_message_is_refused_and_the_server_keeps_working(rig: Rig) -> None:
    big = MAX_MESSAGE + 1024
    channel = grpc.insecure_channel(rig.address, options=[("grpc.max_send_message_length", 4 * big)])
    try:
        code, detail = code_of(lambda: raw_call(channel, "/nomoat.v1.Jobs/Status", False, False,
                                                [pb.StatusRequest(job_id="x" * big).SerializeToString()],
                                                rig.meta("reader")))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in detail, (code, detail)
        task_id = rig.ledger.tasks.ids(rig.submit().job_id)[0]
        # A manifest within the job's adapter bound (else it is refused before a byte is read).
        first = pb.AdapterManifest(task_id=task_id, fence=rig.lease(task_id), size=1000, sha256="0" * 64,
                                   lease_secret=rigs.SECRET)
        chunks = [pb.UploadChunk(manifest=first).SerializeToString(),  # a stream's single message, too
                  pb.UploadChunk(data=bytes(big)).SerializeToString()]
        code, detail = code_of(lambda: raw_call(channel, "/nomoat.v1.Workers/Upload", True, False, chunks,
                                                rig.meta("worker")))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, detail)
    finally:
        channel.close()
    assert rig.healthy()


def test_streams_beyond_the_concurrency_limit_are_refused(redis_client, published, tmp_path) -> None:  # noqa: F811
    # The limit is per kind of stream (coordinator.gateway.lanes): heartbeats have their own.
    small = rigs.start(redis_client, published, tmp_path, max_watch_streams=4)
    try:
        job_id = small.submit().job_id  # running: its Watch streams stay open
        outcomes, streams = [], []  # kept: a dropped stream is cancelled
        for i in range(6):  # each from a reader of its own: one caller holds only its share of a kind
            streams.append(small.client(token=small.registry.create("reader", f"reader-{i}")).watch(job_id, timeout=10))
            try:
                outcomes.append(next(streams[-1]).job.job_id == job_id)
            except NomoatError as exc:
                outcomes.append(str(exc))
        assert outcomes[:4] == [True] * 4, outcomes
        assert all("as many Watch streams as it takes (4)" in o for o in outcomes[4:]), outcomes
    finally:
        small.close()  # cancels the open streams


# -- one join line, individual identities --------------------------------------------------------


def test_two_volunteers_of_one_join_line_the_one_sending_bad_work_is_excluded_alone(rig: Rig) -> None:
    """Both join with the same join code, both start on probation. Mallory hands in broken
    adapters (and fails the replica runs that check honest's work); Mallory alone is excluded,
    and honest, who joined with the same line, keeps getting work."""
    import json
    import math
    from dataclasses import replace

    import torch

    from coordinator.schedule import standing
    from coordinator.schedule.inbox_dispatch import OutboundDispatcher
    from coordinator.schedule.replication import Replication
    from coordinator.schedule.scheduler import Scheduler
    from coordinator.schedule.transport import Dispatchers, Need
    from nomoat import adapter as adapter_format
    from nomoat.spec import UnitResult
    from worker.outbound import parse_specs

    settings = replace(rig.deps.settings, listen=rig.address, speculate=False, max_attempts=100)
    replication = Replication(settings, rig.ledger, rig.store)
    rig.deps.replication = replication  # the collect step holds replicated runs, as the coordinator's does
    scheduler = Scheduler(settings, rig.ledger, Dispatchers(OutboundDispatcher(rig.ledger)), rig.tokens["worker"],
                          task_need=lambda config: Need(1.0), replication=replication)
    line = rig.tokens["join"]  # the one public join line
    volunteers = {}
    for name in ("honest", "mallory"):
        client = rig.client(token=line)
        reply = client.register(name, CARD)
        client.token = reply.credential
        volunteers[name] = (client, reply.worker_id, reply.volunteer_id)
    assert volunteers["honest"][2] != volunteers["mallory"][2]
    rig.submit(texts=rigs.TEXTS * 3)

    def broken() -> bytes:
        good = adapter_format.from_bytes(make_adapter(rig.deps.shapes))
        module = sorted(good.factors)[0]
        a, b = good.factors[module]
        b = b.clone()
        b[0, 0] = math.nan
        return adapter_format.to_bytes(adapter_format.Adapter({**good.factors, module: (a, b)}, good.rank, good.alpha))

    def work_round(seed: int) -> dict[str, int]:
        """One scheduler round; each volunteer does the run it was given. Units per volunteer."""
        scheduler.tick()
        given = {}
        for name, (client, worker_id, _) in volunteers.items():
            work = client.request_work(worker_id, 0.2)
            specs = parse_specs(list(work.task_specs))
            given[name] = len(specs)
            units = []
            for spec in specs:
                data = broken() if name == "mallory" else make_adapter(rig.deps.shapes, seed=seed)
                up = client.upload(manifest(spec.task_id, spec.fence, data, worker_id=worker_id,
                                            lease_secret=spec.lease_secret, base_version=spec.base_version), data)
                assert up.accepted == (name == "honest"), up.reason
                units.append(UnitResult(spec.task_id, spec.fence, "" if up.accepted else up.reason,
                                        adapter_id=up.adapter_id, tokens=300, seconds=1.0))
            if work.run_id:
                client.report_run(worker_id, work.run_id, [json.dumps(u.to_dict()) for u in units], [],
                                  {spec.task_id: spec.lease_secret for spec in specs})
        return given

    def level(name: str) -> standing.Level:
        return standing.standing(rig.ledger.trust.get(volunteers[name][2])).level

    for seed in range(40):
        work_round(seed)
        if level("mallory") is standing.Level.EXCLUDED:
            break
    assert level("mallory") is standing.Level.EXCLUDED
    assert level("honest") is not standing.Level.EXCLUDED
    honest_record = rig.ledger.trust.get(volunteers["honest"][2])
    assert honest_record.refused == 0, honest_record.recent  # nothing of mallory's was held against honest
    after = [work_round(100 + i) for i in range(4)]
    assert sum(r["honest"] for r in after) >= 2, after  # honest keeps getting work, mallory none
    assert all(r["mallory"] == 0 for r in after), after
