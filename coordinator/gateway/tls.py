"""TLS by default: a coordinator that listens beyond loopback without a certificate makes its own.

Its own certificate authority (kept in ``DATA_DIR/tls``, the key mode 0600, made once) signs a
server certificate for the addresses it listens on and is reached at (made again on every
start, so a new ``--public-address`` is covered). The server presents the certificate with the
CA behind it, so a client can learn the CA from the handshake itself and pin it by its
fingerprint, ``sha256:`` and the hex sha256 of the CA certificate's DER bytes, which every join
line and the admin's connection string carry (nomoat.pinning; kubeadm's
discovery-token-ca-cert-hash). Nothing needs copying.

Which listeners may stay plaintext: those on the loopback interface alone (127.0.0.0/8, ::1,
``localhost``): nothing beyond this machine can reach them. Any other address, the wildcards
0.0.0.0 and :: included, is served with TLS.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

# The name every certificate this module makes carries, and the name a client that pins the CA
# checks the server's certificate against (nomoat.pinning): the pinned CA is the coordinator's
# identity, whatever address (a NAT, a load balancer, a DNS name) a volunteer reaches it by.
PINNED_NAME = "nomoat-coordinator"
CA_DAYS = 3650
SERVER_DAYS = 825


@dataclass(frozen=True)
class OwnTls:
    cert: Path  # the server certificate followed by the CA's (what the server presents)
    key: Path
    ca: Path
    fingerprint: str  # "sha256:<hex>" of the CA certificate's DER bytes


def host_of(address: str) -> str:
    """The host part of HOST:PORT ("[::1]:5" -> "::1")."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT listens on the loopback interface alone (127.0.0.0/8, ::1, localhost)."""
    host = host_of(address)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, it may be reachable from elsewhere


def fingerprint_of(cert_pem: bytes) -> str:
    """``sha256:<hex>`` of a certificate's DER bytes."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def own_tls(folder: Path, addresses: list[str]) -> OwnTls:
    """The coordinator's own CA (made on first use) and a server certificate for ``addresses``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    ca_path, ca_key_path = folder / "ca.pem", folder / "ca.key"
    if not (ca_path.exists() and ca_key_path.exists()):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _ca_certificate(ca_key)
        _write(ca_key_path, _private(ca_key))
        _write(ca_path, ca.public_bytes(serialization.Encoding.PEM), private=False)
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _server_certificate(ca, ca_key, key, addresses)
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    _write(key_path, _private(key))
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM) + ca_path.read_bytes(), private=False)
    return OwnTls(cert_path, key_path, ca_path, fingerprint_of(ca_path.read_bytes()))


def _names(addresses: list[str]) -> list:
    """The certificate's subject alternative names: the pinned name, loopback, this machine's
    name, and every host the coordinator listens on or is reached at (wildcards left out)."""
    from cryptography import x509

    hosts = [PINNED_NAME, "localhost", "127.0.0.1", "::1", socket.gethostname(), *map(host_of, addresses)]
    names, seen = [], set()
    for host in hosts:
        if not host or host in seen or host in ("0.0.0.0", "::"):
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _ca_certificate(ca_key):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"nomoat coordinator CA ({socket.gethostname()})")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(ca_key, hashes.SHA256()))


def _server_certificate(ca, ca_key, key, addresses: list[str]):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PINNED_NAME)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(_names(addresses)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))


def _private(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = True) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    tmp.replace(path)
