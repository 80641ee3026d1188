"""TLS by default: a coordinator listening beyond loopback serves a certificate of its own CA,
and clients pin that CA by the fingerprint its join line carries (learned from the handshake,
no file to copy). Secrets stay out of argv.

The server is the coordinator's own gRPC server (tests/rig.py) bound to 0.0.0.0, every
interface: not loopback, so served with TLS; the clients reach it at 127.0.0.1.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from coordinator.gateway import tls
from coordinator.server import Coordinator
from coordinator.settings import Settings
from nomoat.cli import main
from nomoat.client import CoordinatorClient, NomoatError
from nomoat.userconfig import CONFIG_ENV
from tests import rig as rigs
from tests.rig import published  # noqa: F401  (fixtures)


@pytest.fixture
def config(tmp_path, monkeypatch) -> Path:
    """The user's config dir, where pinned CAs and credentials are kept."""
    folder = tmp_path / "config"
    monkeypatch.setenv(CONFIG_ENV, str(folder))
    return folder


@pytest.fixture
def own(tmp_path) -> tls.OwnTls:
    return tls.own_tls(tmp_path / "data" / "tls", ["0.0.0.0:0", "coord.example.org:50051"])


@pytest.fixture
def wide_rig(redis_client, published, tmp_path, own):  # noqa: F811
    r = rigs.start(redis_client, published, tmp_path, tls=own, listen="0.0.0.0:0")
    yield r
    r.close()


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:50051", True), ("127.0.0.2:50051", True), ("localhost:50051", True), ("[::1]:50051", True),
    ("0.0.0.0:50051", False), ("[::]:50051", False), ("10.1.2.3:50051", False), ("coord.example.org:1", False),
])
def test_only_a_listener_on_the_loopback_interface_may_be_plaintext(address: str, loopback: bool) -> None:
    assert tls.is_loopback(address) is loopback


def test_the_own_ca_is_made_once_and_its_keys_are_private(tmp_path, own) -> None:
    from cryptography import x509

    server = x509.load_pem_x509_certificate(own.cert.read_bytes())
    assert own.cert.read_bytes().endswith(own.ca.read_bytes())  # the server presents the CA behind it
    again = tls.own_tls(tmp_path / "data" / "tls", ["0.0.0.0:0"])  # a restart: a new server certificate
    assert again.fingerprint == own.fingerprint and own.fingerprint.startswith("sha256:")
    for key in (own.key, own.ca.with_name("ca.key")):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    assert {"nomoat-coordinator", "coord.example.org", "localhost"} <= set(dns)


def test_a_client_with_the_fingerprint_connects_and_keeps_the_ca(wide_rig, own, config) -> None:
    client = CoordinatorClient(wide_rig.address, wide_rig.tokens["reader"], ca_fingerprint=own.fingerprint)
    assert [v.version for v in client.status().versions] == [0]
    client.close()
    kept = config / "ca" / f"{own.fingerprint.split(':')[1]}.pem"
    assert kept.read_bytes() == own.ca.read_bytes()
    # The fingerprint's spellings people paste: upper case, colons between bytes.
    colons = "SHA256:" + ":".join(own.fingerprint[7:][i:i + 2] for i in range(0, 64, 2)).upper()
    again = CoordinatorClient(wide_rig.address, wide_rig.tokens["reader"], ca_fingerprint=colons)
    assert again.status().versions
    again.close()


def test_a_wrong_fingerprint_or_none_at_all_is_refused_with_a_sentence(wide_rig, config, tmp_path) -> None:
    other = tls.own_tls(tmp_path / "other", ["0.0.0.0:0"])
    with pytest.raises(NomoatError, match=f"the coordinator at {wide_rig.address} is not the one you were told of: "
                                          f"its certificate authority is not {other.fingerprint}"):
        CoordinatorClient(wide_rig.address, wide_rig.tokens["reader"], ca_fingerprint=other.fingerprint)
    with pytest.raises(NomoatError, match="is not a CA fingerprint"):
        CoordinatorClient(wide_rig.address, wide_rig.tokens["reader"], ca_fingerprint="sha256:1234")
    plain = CoordinatorClient(wide_rig.address, wide_rig.tokens["reader"])
    with pytest.raises(NomoatError, match="--ca-fingerprint from its join line"):
        plain.status()
    plain.close()
    assert wide_rig.healthy()  # refused clients left it serving (the rig's client checks with the CA file)


def test_a_fingerprint_for_a_plaintext_coordinator_says_so(redis_client, published, tmp_path, own,  # noqa: F811
                                                          config) -> None:
    r = rigs.start(redis_client, published, tmp_path)
    try:
        with pytest.raises(NomoatError, match="did not answer with TLS .*leave out --ca-fingerprint"):
            CoordinatorClient(r.address, r.tokens["reader"], ca_fingerprint=own.fingerprint)
    finally:
        r.close()


def test_the_cli_pins_by_fingerprint(wide_rig, own, config) -> None:
    env = {"NOMOAT_COORDINATOR": wide_rig.address, "NOMOAT_TOKEN": wide_rig.tokens["reader"]}
    ok = CliRunner().invoke(main, ["status", "--ca-fingerprint", own.fingerprint, "--json"], env=env)
    assert ok.exit_code == 0, ok.output
    wrong = CliRunner().invoke(main, ["status", "--json"], env={**env, "NOMOAT_CA_FINGERPRINT": "sha256:" + "0" * 64})
    assert wrong.exit_code == 1 and "is not the one you were told of" in wrong.output
    assert "Traceback" not in wrong.output


def test_the_coordinator_decides_tls_by_its_listen_address_and_says_so_in_its_join_lines(tmp_path, own) -> None:
    def node(listen: str, **changes) -> Coordinator:
        made = Coordinator(Settings(data_dir=tmp_path / listen.replace(":", "_"), listen=listen, **changes))
        made.data_dir.mkdir(parents=True)
        made._start_tls()
        made.join_code, made.join_code_new, made.ray_address = "nmt_j_code", True, "10.0.0.1:6379"
        return made

    wide = node("0.0.0.0:50051", public_address="coord.example.org:50051")
    assert wide.ca_fingerprint.startswith("sha256:") and wide.settings.tls_cert
    assert wide.ca_fingerprint == tls.fingerprint_of((wide.data_dir / "tls" / "ca.pem").read_bytes())
    line = wide.join_command()
    assert line == ("NOMOAT_TOKEN=nmt_j_code nomoat worker start --coordinator coord.example.org:50051 "
                    f"--ca-fingerprint {wide.ca_fingerprint}")
    assert f"--ca-fingerprint {wide.ca_fingerprint}" in wide.trusted_join_command()
    assert f"NOMOAT_CA_FINGERPRINT={wide.ca_fingerprint}" in wide.admin_connection()
    assert "nmt_j_code" not in wide.join_command(show_code=False)  # later starts read it from the data dir

    for loopback in ("127.0.0.1:50051", "127.0.0.2:50051"):
        plain = node(loopback)
        assert plain.ca_fingerprint == "" and plain.settings.tls_cert is None
        assert "--ca-fingerprint" not in plain.join_command() and "--tls-ca" not in plain.join_command()
    operators = node("0.0.0.0:50052", tls_cert=str(own.cert), tls_key=str(own.key))
    assert operators.ca_fingerprint == "" and operators.settings.tls_cert == str(own.cert)
    assert "--tls-ca CA.pem" in operators.join_command()


def test_the_embedded_redis_password_is_not_in_its_argv(tmp_path) -> None:
    from coordinator.ledger.redis_server import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    try:
        password = url.split(":")[2].split("@")[0]
        argv = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()
        assert password and password not in argv
        assert stat.S_IMODE(server.conf.stat().st_mode) == 0o600
    finally:
        server.stop()
