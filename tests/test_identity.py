"""One join line, individual identities: the join code only registers, and registering with it
mints each volunteer a credential of its own, kept by the worker and reused; joins are rate
limited; new volunteers are on probation; the operator lists, bans, clears and rotates.

Real gRPC on loopback with the coordinator's own interceptor (tests/rig.py), the session's
real Redis, and the worker's real registration code.
"""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import replace

import grpc
import pytest
from click.testing import CliRunner

from coordinator.ledger.volunteers import ALL_FULL, SOURCE_FULL
from coordinator.schedule import standing
from coordinator.schedule.inbox_dispatch import OutboundDispatcher, node_id_of
from coordinator.schedule.replication import Replication
from coordinator.schedule.roster import source_of
from coordinator.schedule.scheduler import Scheduler
from coordinator.schedule.transport import Dispatchers, Need
from nomoat.card import to_message
from nomoat.cli import main
from nomoat.client import CoordinatorClient, NomoatError
from nomoat.v1 import nomoat_pb2 as pb
from tests.rig import Rig, published, rig  # noqa: F401  (fixtures)
from worker.credentials import Credentials, is_join_code
from worker.outbound import OutboundWorker, parse_specs
from worker.probe import parse_simulated

CARD = parse_simulated("RTX 3060:12:13")


def join(r: Rig, name: str = "vol") -> tuple[CoordinatorClient, pb.RegisterReply]:
    """Register with the join code as a new volunteer; the client then carries its credential."""
    client = r.client("join")
    reply = client.register(name, to_message(CARD))
    client.token = reply.credential
    return client, reply


def scheduler(r: Rig, **changes) -> tuple[Scheduler, OutboundDispatcher]:
    settings = replace(r.deps.settings, listen=r.address, speculate=False, **changes)
    dispatcher = OutboundDispatcher(r.ledger)
    return Scheduler(settings, r.ledger, Dispatchers(dispatcher), r.tokens["worker"], task_need=lambda c: Need(1.0),
                     replication=Replication(settings, r.ledger, r.store)), dispatcher


# -- the join code ----------------------------------------------------------------------------------


def test_the_join_code_only_registers_and_mints_a_credential_shown_once(rig: Rig) -> None:
    code = rig.client("join")
    with pytest.raises(NomoatError, match="not allowed: a join token may not call Status"):
        code.status()
    with pytest.raises(NomoatError, match="not allowed: a join token may not call RequestWork"):
        code.request_work("w-x", 0)
    reply = code.register("alice", to_message(CARD))
    assert reply.credential.startswith("nmt_v_") and not is_join_code(reply.credential)
    assert reply.volunteer_id == hashlib.sha256(reply.credential.encode()).hexdigest()
    assert rig.ledger.workers.get(reply.worker_id).token == reply.volunteer_id  # the worker is the volunteer's
    assert rig.registry.lookup(reply.credential).role == "volunteer"
    # The credential is a worker's: it works, and registering with it mints nothing new.
    mine = rig.client(token=reply.credential)
    again = mine.register("alice", to_message(CARD), worker_id=reply.worker_id)
    assert (again.worker_id, again.credential, again.volunteer_id) == (reply.worker_id, "", reply.volunteer_id)
    assert mine.request_work(reply.worker_id, 0).run_id == ""
    assert reply.ray_auth_token == ""  # never the Ray cluster's token


def test_one_join_line_makes_separate_volunteers_each_with_its_own_limits(rig: Rig) -> None:
    rig.deps.settings = replace(rig.deps.settings, max_workers_per_token=1)
    alice, a = join(rig, "alice")
    bob, b = join(rig, "bob")
    assert a.volunteer_id != b.volunteer_id
    with pytest.raises(NomoatError, match="already has 1 active workers"):
        alice.register("alice's second card", to_message(CARD))
    # Alice's limit is hers alone: bob's card registers, and so do further joiners.
    assert bob.register("bob", to_message(CARD), worker_id=b.worker_id).worker_id == b.worker_id
    assert join(rig, "carol")[1].worker_id
    # What a volunteer sees of itself is its own.
    assert [w.worker_id for w in alice.worker_stats().workers] == [a.worker_id]
    assert [w.worker_id for w in bob.worker_stats().workers] == [b.worker_id]


def test_joins_are_rate_limited_per_address_and_overall(rig: Rig) -> None:
    rig.deps.settings = replace(rig.deps.settings, joins_per_address=2)
    join(rig)
    join(rig)
    with pytest.raises(NomoatError, match=r"2 volunteers joined from 127\.0\.0\.1 within the last 60 minutes, "
                                          "the most one address may; a worker that joined already keeps its "
                                          "credential"):
        join(rig)
    assert len(rig.ledger.volunteers.all()) == 2  # the refused join minted nothing
    # Counted in Redis, so every gateway agrees; overall as well as per address.
    v = rig.ledger.volunteers
    assert v.admit("10.0.0.1", 5, 4, 3600) == 0 and v.admit("10.0.0.2", 5, 4, 3600) == 0
    assert v.admit("10.0.0.3", 5, 4, 3600) == ALL_FULL  # 2 from 127.0.0.1 and 2 others: 4 of 4
    assert v.admit("127.0.0.1", 2, 100, 3600) == SOURCE_FULL
    rig.deps.settings = replace(rig.deps.settings, joins_per_address=100, joins_overall=4)
    with pytest.raises(NomoatError, match="too many volunteers are joining at once right now"):
        join(rig)


def test_the_source_of_a_peer() -> None:
    assert source_of("ipv4:203.0.113.9:50122") == "203.0.113.9"
    assert source_of("ipv6:[2001:db8::1]:443") == "2001:db8::1"
    assert source_of("unix:/tmp/s") == "/tmp/s"


# -- probation -------------------------------------------------------------------------------------


def test_a_new_volunteer_gets_one_unit_at_a_time_and_every_unit_is_replicated(rig: Rig) -> None:
    trusted = rig.client("worker")
    veteran = trusted.register("veteran", to_message(CARD)).worker_id
    newcomer, joined = join(rig, "newcomer")
    for client, worker_id in ((trusted, veteran), (newcomer, joined.worker_id)):
        client.request_work(worker_id, 0)
        rig.ledger.workers.record_run(worker_id, node_id_of(worker_id), 100_000, 1.0)  # a fast card
    record = rig.ledger.trust.get(joined.volunteer_id)
    assert record.probation and standing.standing(record).level is standing.Level.PROBATION
    assert standing.replicate_rate(record, 0.05) == 1.0
    s, _ = scheduler(rig, max_units_per_run=4, target_task_seconds=1e9)
    rig.deps.replication = s.replication
    rig.submit()
    s.tick()
    runs = {w: parse_specs(list(c.request_work(w, 1).task_specs))
            for c, w in ((trusted, veteran), (newcomer, joined.worker_id))}
    assert len(runs[veteran]) == 4 and len(runs[joined.worker_id]) == 1
    # Its unit, handed in, is held for a replica run by the other volunteer.
    from tests.rig import make_adapter, manifest

    (spec,) = runs[joined.worker_id]
    data = make_adapter(rig.deps.shapes, seed=1)
    assert newcomer.upload(manifest(spec.task_id, spec.fence, data, worker_id=joined.worker_id,
                                     lease_secret=spec.lease_secret), data).accepted
    assert rig.ledger.replicas.get(spec.task_id) is not None
    assert rig.ledger.trust.get(joined.volunteer_id).held == 1
    assert standing.standing(rig.ledger.trust.get(joined.volunteer_id)).share == 0  # none until it is checked


def test_a_volunteer_on_probation_is_given_no_twin_of_anothers_task(rig: Rig) -> None:
    """Near a job's end an idle card may race a slow run (a speculative twin: the first accepted
    result wins). A newcomer on probation is not given one, however fast its card: answering at
    once with anything, it would take an honest run's place beyond its one unit at a time. A
    trusted volunteer's idle card is."""
    from tests.rig import TEXTS

    slow = rig.client("worker")
    veteran = slow.register("veteran", to_message(CARD)).worker_id
    newcomer, joined = join(rig, "newcomer")
    fast = rig.client(token=rig.registry.create("worker", "fast"))  # a trusted volunteer of its own
    for client, worker_id, tokens in ((slow, veteran, 1), (newcomer, joined.worker_id, 100_000)):
        client.request_work(worker_id, 0)
        rig.ledger.workers.record_run(worker_id, node_id_of(worker_id), tokens, 1.0)
    s = Scheduler(replace(rig.deps.settings, listen=rig.address, speculate=True), rig.ledger,
                  Dispatchers(OutboundDispatcher(rig.ledger)), rig.tokens["worker"], task_need=lambda c: Need(1.0))
    (task_id,) = rig.ledger.tasks.ids(rig.submit(texts=TEXTS[:3]).job_id)
    s.tick()
    assert rig.ledger.tasks.get(task_id).holder_worker == veteran  # trusted first: the slow card has it
    s.tick()
    assert newcomer.request_work(joined.worker_id, 0).task_specs == []  # no twin for the newcomer
    assert rig.ledger.tasks.get(task_id).twin == ""
    fast_id = fast.register("fast", to_message(CARD)).worker_id
    fast.request_work(fast_id, 0)
    rig.ledger.workers.record_run(fast_id, node_id_of(fast_id), 100_000, 1.0)
    s.tick()
    (spec,) = parse_specs(list(fast.request_work(fast_id, 0).task_specs))  # the trusted one races it
    assert rig.ledger.tasks.get(task_id).twin == spec.task_id


# -- the operator's commands -----------------------------------------------------------------------


def test_a_ban_refuses_the_credential_at_once_and_gives_its_leases_back(rig: Rig) -> None:
    vol, joined = join(rig, "mallory")
    vol.request_work(joined.worker_id, 0)
    s, _ = scheduler(rig, max_units_per_run=1)
    rig.submit()
    s.tick()
    (spec,) = parse_specs(list(vol.request_work(joined.worker_id, 1).task_specs))
    assert vol.heartbeat(spec.task_id, spec.fence, joined.worker_id, secret=spec.lease_secret).ok  # training it
    reply = rig.client("admin").ban_volunteer(joined.volunteer_id[:10])  # a unique prefix will do
    assert (reply.volunteer_id, reply.leases_dropped) == (joined.volunteer_id, 1)
    with pytest.raises(NomoatError, match="refused the token"):
        vol.heartbeat(spec.task_id, spec.fence, joined.worker_id, secret=spec.lease_secret)
    assert spec.task_id in rig.ledger.leases.expire()  # the scheduler's next round takes it back
    assert standing.standing(rig.ledger.trust.get(joined.volunteer_id)).level is standing.Level.EXCLUDED
    (listed,) = [v for v in rig.client("admin").list_volunteers() if v.volunteer_id == joined.volunteer_id]
    assert (listed.standing, listed.name, list(listed.worker_ids)) == ("banned", "mallory", [joined.worker_id])
    # A pardon does not lift a ban.
    rig.client("admin").clear_volunteer(joined.volunteer_id)
    assert rig.ledger.trust.get(joined.volunteer_id).banned


def test_clearing_a_record_starts_the_volunteer_over_on_probation(rig: Rig) -> None:
    _, joined = join(rig)
    for _ in range(8):
        rig.ledger.trust.record(joined.volunteer_id, "norm", "too large")
    assert standing.standing(rig.ledger.trust.get(joined.volunteer_id)).level is standing.Level.EXCLUDED
    rig.client("admin").clear_volunteer(joined.worker_id)  # named by one of its workers
    assert standing.standing(rig.ledger.trust.get(joined.volunteer_id)).level is standing.Level.PROBATION


def test_rotating_the_join_code_keeps_those_who_joined(rig: Rig) -> None:
    alice, a = join(rig, "alice")
    rig.ledger.volunteers.set_join_code(hashlib.sha256(rig.tokens["join"].encode()).hexdigest())
    new = rig.client("admin").rotate_join_code()
    assert is_join_code(new) and (rig.tmp / "join.code").read_text().strip() == new
    assert stat.S_IMODE((rig.tmp / "join.code").stat().st_mode) == 0o600
    with pytest.raises(NomoatError, match="refused the token"):
        rig.client("join").register("late", to_message(CARD))
    assert rig.client(token=new).register("late", to_message(CARD)).credential
    assert alice.register("alice", to_message(CARD), worker_id=a.worker_id).worker_id == a.worker_id


def test_the_volunteer_commands(rig: Rig) -> None:
    _, joined = join(rig, "dora")
    env = {"NOMOAT_COORDINATOR": rig.address, "NOMOAT_TOKEN": rig.tokens["admin"]}
    runner = CliRunner()
    listed = runner.invoke(main, ["volunteer", "list", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    rows = {row["volunteerId"]: row for row in json.loads(listed.stdout)}
    assert rows[joined.volunteer_id]["standing"] == "probation" and rows[joined.volunteer_id]["name"] == "dora"
    assert rows[hashlib.sha256(rig.tokens["worker"].encode()).hexdigest()]["role"] == "worker"
    text = runner.invoke(main, ["volunteer", "list"], env=env)
    assert joined.volunteer_id[:16] in text.stdout and "on probation" in text.stdout
    banned = runner.invoke(main, ["volunteer", "ban", joined.volunteer_id[:12]], env=env)
    assert banned.exit_code == 0 and "is banned; 0 of its leases" in banned.stdout
    unknown = runner.invoke(main, ["volunteer", "clear", "ffff0000"], env=env)
    assert unknown.exit_code == 1 and "no volunteer 'ffff0000'" in unknown.output and "Traceback" not in unknown.output
    rotated = runner.invoke(main, ["volunteer", "rotate-join-code"], env=env)
    assert rotated.exit_code == 0 and is_join_code(rotated.stdout.strip())
    worker = runner.invoke(main, ["volunteer", "list"], env={**env, "NOMOAT_TOKEN": rig.tokens["worker"]})
    assert worker.exit_code == 1 and "a worker token may not call ListVolunteers" in worker.output
    for command in ("list", "ban", "clear", "rotate-join-code"):
        helped = runner.invoke(main, ["volunteer", command, "--help"])
        assert helped.exit_code == 0 and "Example: " in helped.stdout


# -- the worker keeps its credential ---------------------------------------------------------------


def test_a_worker_keeps_its_credential_and_the_users_other_cards_reuse_it(rig: Rig, tmp_path) -> None:
    def start_worker(name: str) -> OutboundWorker:
        client = rig.client("join")
        worker = OutboundWorker(client, CARD, name=name, cache_dir=tmp_path / name,
                                credentials=Credentials(client.address, root=tmp_path / "config"))
        worker.start()
        return worker

    first = start_worker("card-0")
    kept = Credentials(rig.address, root=tmp_path / "config")
    record = json.loads(kept.path.read_text())
    assert stat.S_IMODE(kept.path.stat().st_mode) == 0o600
    assert first.client.token == record["credential"] == kept.load() and first.node.token == kept.load()
    second = start_worker("card-1")  # the same user's other card
    restarted = start_worker("card-0")  # a restart
    volunteers = {rig.ledger.workers.get(w.worker_id).token for w in (first, second, restarted)}
    assert volunteers == {record["volunteer_id"]} and len(rig.ledger.volunteers.all()) == 1
    # A credential the coordinator does not know (its ledger is new) joins again...
    rig.ledger.r.hdel("nomoat:tokens", record["volunteer_id"])
    rig.registry._cache.clear()
    rejoined = start_worker("card-2")
    assert rejoined.client.token == kept.load() != record["credential"] and len(rig.ledger.volunteers.all()) == 2
    # ... one the operator banned is a sentence naming the file, not a new identity.
    banned = rig.ledger.workers.get(rejoined.worker_id).token
    rig.client("admin").ban_volunteer(banned)
    with pytest.raises(NomoatError, match=f"refused this volunteer's credential \\(kept in {kept.path}\\): the "
                                          "operator banned it"):
        start_worker("card-3")
    assert len(rig.ledger.volunteers.all()) == 2


def test_a_kept_credential_is_per_coordinator(tmp_path) -> None:
    by_address = Credentials("10.0.0.1:50051", root=tmp_path)
    pinned = Credentials("10.0.0.1:50051", "sha256:" + "ab" * 32, root=tmp_path)
    assert by_address.path != pinned.path
    pinned.save("nmt_v_x", "v1")
    assert by_address.load() == "" and pinned.load() == "nmt_v_x"


def test_the_join_code_may_not_manage_volunteers(rig: Rig) -> None:
    channel = rig.client("join").channel
    call = channel.unary_unary("/nomoat.v1.Admin/ListVolunteers")
    with pytest.raises(grpc.RpcError) as err:
        call(b"", timeout=10, metadata=rig.meta("join"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
