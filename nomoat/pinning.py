"""Trust a coordinator by its CA's fingerprint: learn the CA from the TLS handshake, pin it.

A coordinator that made its own CA (coordinator.gateway.tls) presents its server certificate
with the CA behind it. The join line names the CA by fingerprint (``sha256:<hex>`` of its DER
bytes). The client opens one TLS connection without verifying anything, takes the certificate
whose fingerprint is the one it was given from the chain the server presented, and from then on
uses it as the only root that gRPC's TLS accepts, so the server's certificate is checked against
it as usual. A coordinator that presents no such certificate is refused with a sentence. The CA
is kept in the user's config dir by fingerprint (checked again when read), so later starts do
not depend on the first handshake.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import time
from pathlib import Path

from nomoat.userconfig import config_dir, write_private

# The name the coordinator's own certificates carry (coordinator.gateway.tls.PINNED_NAME): with the
# CA pinned, the server is checked against it, whatever address it was reached by.
PINNED_NAME = "nomoat-coordinator"
_FORMAT = re.compile(r"^sha256:[0-9a-f]{64}$")


class PinError(RuntimeError):
    """The coordinator's CA could not be learned, or is not the one the fingerprint names."""


def normalise(fingerprint: str) -> str:
    """``sha256:<64 hex>``, lower case; colons between bytes and a missing prefix are accepted."""
    text = fingerprint.strip().lower()
    text = text[len("sha256:"):] if text.startswith("sha256:") else text
    text = "sha256:" + text.replace(":", "")
    if not _FORMAT.match(text):
        raise PinError(f"{fingerprint!r} is not a CA fingerprint: it looks like sha256: and 64 hex digits, "
                       "as the coordinator's join line prints it")
    return text


def _cached(fingerprint: str) -> Path:
    return config_dir() / "ca" / f"{fingerprint.split(':', 1)[1]}.pem"


def pinned_ca(address: str, fingerprint: str, patience_s: float = 15.0) -> bytes:
    """The PEM of the CA named by ``fingerprint``: kept from before, or learned from the
    coordinator at ``address`` (tries for up to ``patience_s`` while it cannot be reached)."""
    fingerprint = normalise(fingerprint)
    path = _cached(fingerprint)
    if path.exists():
        pem = path.read_bytes()
        if _fingerprint(ssl.PEM_cert_to_DER_cert(pem.decode())) == fingerprint:
            return pem
    chain = _presented_chain(address, patience_s)
    for der in chain:
        if _fingerprint(der) == fingerprint:
            pem = ssl.DER_cert_to_PEM_cert(der).encode()
            write_private(path, pem)
            return pem
    seen = ", ".join(_fingerprint(der) for der in chain[1:]) or "none"
    raise PinError(f"the coordinator at {address} is not the one you were told of: its certificate authority is "
                   f"not {fingerprint} (it presented {seen}); check --ca-fingerprint against the join line, and "
                   "that the address is right")


def _fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _presented_chain(address: str, patience_s: float) -> list[bytes]:
    """The certificates (DER) the server presents in a TLS handshake, verifying nothing."""
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") else host
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # nothing is trusted from this connection but what the pin names
    context.set_alpn_protocols(["h2"])
    end = time.monotonic() + patience_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=10) as raw, \
                    context.wrap_socket(raw, server_hostname=PINNED_NAME) as tls:
                return _chain_of(tls)
        except ssl.SSLError as exc:
            raise PinError(f"the coordinator at {address} did not answer with TLS ({exc.reason or exc}); "
                           "if it serves plain gRPC (it listens on loopback only), leave out --ca-fingerprint") from None
        except (OSError, ValueError) as exc:
            if time.monotonic() >= end:
                raise PinError(f"cannot reach the coordinator at {address} to check its certificate "
                               f"({getattr(exc, 'strerror', None) or exc}); is it running?") from None
            time.sleep(1.0)


def _chain_of(tls: ssl.SSLSocket) -> list[bytes]:
    if hasattr(tls, "get_unverified_chain"):  # Python 3.13+
        return [bytes(c) for c in tls.get_unverified_chain()]
    reader = getattr(getattr(tls, "_sslobj", None), "get_unverified_chain", None)  # 3.10-3.12: not yet public
    if reader is None:
        raise PinError("this Python cannot read the certificates a server presents; use Python 3.10 or newer, "
                       "or pass the coordinator's CA file with --tls-ca")
    return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in reader() or []]
