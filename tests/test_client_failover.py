"""A client given several coordinator addresses (gateways of one coordinator, comma-separated)
reaches one that answers, and carries on through another when its gateway goes: real gRPC
servers over loopback (tests/rig.py), two of them serving the same ledger as two gateways would."""

from __future__ import annotations

import time

import pytest

from coordinator.server import bind, grpc_server
from nomoat.client import CoordinatorClient, NomoatError, addresses, channel_target
from tests.procs import free_port
from tests.rig import published, rig  # noqa: F401


def test_addresses_are_split_on_commas_and_resolved_into_one_target():
    assert addresses(" 127.0.0.1:1, localhost:2 ,") == ["127.0.0.1:1", "localhost:2"]
    assert channel_target("127.0.0.1:50051") == "127.0.0.1:50051"  # one address: as given
    assert channel_target("127.0.0.1:1,127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    with pytest.raises(NomoatError, match="HOST:PORT"):
        channel_target("127.0.0.1:1,no-such-host.invalid:2")


def test_a_dead_address_first_in_the_list_is_passed_over(rig):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    with CoordinatorClient(f"{dead},{rig.address}", rig.tokens["reader"]) as client:
        client.status()


def test_when_the_gateway_in_use_goes_the_next_call_goes_to_the_other(rig):
    other, _ = grpc_server(rig.deps)  # a second gateway on the same ledger
    port = bind(other, "127.0.0.1:0", None, None)
    other.start()
    try:
        with CoordinatorClient(f"{rig.address},127.0.0.1:{port}", rig.tokens["reader"]) as client:
            client.status()  # through the first gateway (pick_first)
            rig.server.stop(0)
            answered = None
            for _ in range(5):  # a call in flight as it went may fail; the worker's loops retry
                try:
                    answered = client.status()
                    break
                except NomoatError:
                    time.sleep(0.5)
            assert answered is not None, "the client did not move to the second gateway"
    finally:
        other.stop(0)
