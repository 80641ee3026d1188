"""The join code across gateways: the ledger names the one current join code (its hash), so a
rotation on any gateway is taken by every gateway at once and the old code refused by every one,
and a gateway whose data dir holds an older copy neither revives it nor mints another. Two
gateways here are two gRPC servers on one Redis, each with its own token registry (its own cache),
as two processes would be."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from grpc_health.v1 import health_pb2

from coordinator.gateway.auth import TokenRegistry, hash_token
from coordinator.schedule import roster
from coordinator.server import bind, grpc_server
from nomoat.card import to_message
from nomoat.client import CoordinatorClient, NomoatError
from tests.rig import Rig, published, rig  # noqa: F401  (fixtures)
from worker.probe import parse_simulated

CARD = parse_simulated("RTX 3060:12:13")


@pytest.fixture
def second(rig: Rig) -> Iterator[tuple[str, TokenRegistry]]:  # noqa: F811
    """Another gateway on the rig's Redis: its own server and token registry; (address, registry)."""
    registry = TokenRegistry(rig.ledger.tokens)
    deps = dataclasses.replace(rig.deps, registry=registry)
    server, health = grpc_server(deps)
    port = bind(server, "127.0.0.1:0")
    server.start()
    health.set("", health_pb2.HealthCheckResponse.SERVING)
    yield f"127.0.0.1:{port}", registry
    server.stop(0)


def joins(address: str, code: str, name: str) -> str:
    """Register with ``code`` at ``address`` as a new volunteer; its credential."""
    with CoordinatorClient(address, token=code) as client:
        return client.register(name, to_message(CARD)).credential


def test_a_join_code_rotated_on_one_gateway_is_refused_on_every_gateway_at_once(rig: Rig, second) -> None:  # noqa: F811
    other, _ = second
    old = rig.tokens["join"]
    rig.ledger.volunteers.set_join_code(hash_token(old))  # as the coordinator's start records it
    assert joins(other, old, "early")  # the other gateway has looked the old code up lately
    with rig.client("admin") as admin:
        new = admin.rotate_join_code()
    for address in (rig.address, other):
        with pytest.raises(NomoatError, match="refused the token"):
            joins(address, old, "late")
        assert joins(address, new, "fresh").startswith("nmt_v_")


def test_a_live_join_code_the_ledger_does_not_name_registers_no_one(rig: Rig) -> None:  # noqa: F811
    rig.ledger.volunteers.set_join_code(hash_token(rig.tokens["join"]))
    stray = rig.registry.create("join", name="a join code left behind")  # live, but not the current one
    with pytest.raises(NomoatError, match="replaced by a newer one"):
        joins(rig.address, stray, "stray")


def test_a_gateway_whose_data_dir_holds_an_older_join_code_neither_revives_it_nor_makes_another(
        rig: Rig, second, tmp_path) -> None:  # noqa: F811
    other, other_registry = second
    mine, theirs = tmp_path / "a" / roster.JOIN_CODE_FILE, tmp_path / "b" / roster.JOIN_CODE_FILE
    mine.parent.mkdir()
    theirs.parent.mkdir()
    code, made = roster.ensure_join_code(rig.ledger, rig.registry, mine)
    assert made
    theirs.write_text(code)  # the other gateway's data dir got the same code (as an operator copies it)
    assert roster.ensure_join_code(rig.ledger, other_registry, theirs) == (code, False)
    new = roster.rotate_join_code(rig.ledger, rig.registry, mine)
    joins_before = sum(1 for t in rig.registry.list() if t.role == "join")
    # The other gateway restarts: its copy is out of date, and the ledger's code stays the current one.
    assert roster.ensure_join_code(rig.ledger, other_registry, theirs) == ("", False)
    assert not theirs.exists()
    assert rig.ledger.volunteers.join_code() == hash_token(new)
    assert sum(1 for t in rig.registry.list() if t.role == "join") == joins_before
    assert joins(other, new, "after-restart")
    # The gateway that rotated it restarts with its own copy: in step, nothing changes.
    assert roster.ensure_join_code(rig.ledger, rig.registry, mine) == (new, False)
