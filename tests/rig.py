"""The coordinator's real gRPC server over loopback, for the security and fuzz tests.

Built by ``coordinator.server.grpc_server`` and ``bind``, the functions the coordinator itself
uses (an asyncio server on a loop thread of its own), so the token interceptor, the message and stream limits and TLS are the real ones. The
ledger is the session's redis-server (flushed per test); version 0 is the tiny base model.
Import the fixtures into a test module: ``from tests.rig import published, rig  # noqa: F401``.
Used by the service, security and fuzz tests.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from coordinator.gateway import servicers

from coordinator.schedule import submit
from coordinator.gateway.auth import TokenRegistry
from coordinator.gateway.lanes import Limits
from coordinator.fold.folder import Folder
from coordinator.model.history import History
from coordinator.ledger import Ledger, VersionRecord
from coordinator.model.running import RunningModel
from coordinator.server import bind, grpc_server
from coordinator.settings import Settings
from coordinator.model.store import BlobStore, Store
from nomoat import adapter as adapter_format
from nomoat.client import CoordinatorClient
from nomoat.tiny import read_fortunes, tiny_model_path
from nomoat.v1 import nomoat_pb2 as pb

ROLES = ("worker", "trusted-worker", "submitter", "reader", "admin", "volunteer", "join")
RANK, ALPHA, TARGETS = 2, 4.0, ("q_proj", "v_proj")
JOB = pb.JobConfig(lora_rank=RANK, lora_alpha=ALPHA, target_modules=TARGETS, tokens_per_task=300)
TEXTS = [f"record {i}: {t}" for i, t in enumerate(read_fortunes()[2000:2060])]
# The lease secret Rig.lease grants with by default: what a test's worker shows, as a run's spec would.
SECRET = "0123456789abcdef0123456789abcdef"


@dataclass
class Published:
    model: RunningModel
    blobs: Path  # a store holding exactly version 0's files
    files: dict[str, str]
    shapes: dict[str, tuple[int, int]]


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Published:
    model = RunningModel(tiny_model_path())
    blobs = tmp_path_factory.mktemp("v0") / "blobs"
    files = model.publish(BlobStore(blobs))
    shapes = {name: (m.out_features, m.in_features) for name, m in model.model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    return Published(model, blobs, files, shapes)


@dataclass
class Tls:
    """A CA and a server certificate for 127.0.0.1 and localhost, made with ``cryptography``."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, folder: Path, name: str = "test") -> Tls:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

        def subject(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (x509.CertificateBuilder().subject_name(subject(f"{name} CA")).issuer_name(subject(f"{name} CA"))
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(valid[0]).not_valid_after(valid[1])
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        alt = x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                           x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        cert = (x509.CertificateBuilder().subject_name(subject("localhost")).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(valid[0]).not_valid_after(valid[1])
                .add_extension(alt, critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))
        folder.mkdir(parents=True, exist_ok=True)
        out = cls(folder / f"{name}-ca.pem", folder / f"{name}-server.pem", folder / f"{name}-server.key")
        out.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        return out


@dataclass
class Rig:
    address: str
    deps: servicers.Deps
    ledger: Ledger
    registry: TokenRegistry
    tokens: dict[str, str]
    tmp: Path
    server: grpc.Server
    tls: Tls | None = None
    store: Store | None = None
    v0_files: dict[str, str] = field(default_factory=dict)
    _clients: list[CoordinatorClient] = field(default_factory=list)

    def blob_files(self) -> set[str]:
        return {p.name for p in self.store.root.rglob("*") if p.is_file()}

    def client(self, role: str | None = "admin", token: str | None = None) -> CoordinatorClient:
        token = token if token is not None else (self.tokens[role] if role else "")
        client = CoordinatorClient(self.address, token=token, tls_ca=str(self.tls.ca) if self.tls else None)
        self._clients.append(client)
        return client

    def meta(self, role: str = "admin") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens[role]}"),)

    def submit(self, texts=TEXTS, config: pb.JobConfig = JOB) -> pb.SubmitReply:
        path = self.tmp / "d.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        return self.client("submitter").submit(path, name="job", config=config)

    def lease(self, task_id: str, base_version: int = 0, worker_id: str = "", secret: str = "") -> int:
        """Lease ``task_id`` as the scheduler does, placed on ``worker_id`` ("": on no named
        worker) with the lease secret ``secret`` (default :data:`SECRET`); returns its fence."""
        fence = self.ledger.leases.lease(task_id, time.time() + 60, base_version, max_attempts=5,
                                         worker_id=worker_id, secret=secret or SECRET)
        assert fence > 0
        return fence

    def healthy(self) -> bool:
        """The health check and a plain Status call both answer."""
        from grpc_health.v1 import health_pb2_grpc

        client = self.client("reader")
        reply = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        client.status()
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.server.stop(0)


def submit_job(rig: Rig, texts=TEXTS, filename: str = "d.jsonl", **config) -> submit.SubmitResult:
    """Submit JOB's config (and ``config``'s fields) over ``texts`` through the domain call the
    Submit servicer makes (no gRPC)."""
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    requested = {"lora_rank": JOB.lora_rank, "lora_alpha": JOB.lora_alpha,
                 "target_modules": list(JOB.target_modules), "tokens_per_task": JOB.tokens_per_task, **config}
    d = rig.deps
    return submit.receive(d.settings, d.ledger, d.store, d.tokenizer, list(d.shapes), [
        submit.DatasetHeader(filename, "job", len(data), requested), data,
        submit.DatasetDigest(hashlib.sha256(data).hexdigest()),
    ])


def make_adapter(shapes: dict[str, tuple[int, int]], seed: int = 0, rank: int = RANK, alpha: float = ALPHA) -> bytes:
    """A well-formed adapter for JOB's config (small random factors)."""
    gen = torch.Generator().manual_seed(seed)
    factors = {module: (torch.randn(rank, d_in, generator=gen) * 0.01, torch.randn(d_out, rank, generator=gen) * 0.01)
               for module, (d_out, d_in) in sorted(shapes.items()) if module.rsplit(".", 1)[-1] in TARGETS}
    return adapter_format.to_bytes(adapter_format.Adapter(factors, rank=rank, alpha=alpha))


def manifest(task_id: str, fence: int, data: bytes, /, **changes) -> pb.AdapterManifest:
    fields = dict(task_id=task_id, fence=fence, base_version=0, rank=RANK, alpha=ALPHA, tokens=300,
                  train_loss=2.5, sha256=hashlib.sha256(data).hexdigest(), size=len(data), worker_id="",
                  lease_secret=SECRET)
    fields.update(changes)
    return pb.AdapterManifest(**fields)


def start(redis_client, published: Published, tmp: Path, tls: Tls | None = None, cache_s: float = 5.0,
          limits: Limits | None = None, listen: str = "127.0.0.1:0", store: Store | None = None,
          **settings_) -> Rig:
    """A fresh ledger with version 0 and one token per role, served on a free port of ``listen``
    (loopback unless told otherwise) and reached at 127.0.0.1; the blob store is a folder in
    ``tmp``, or ``store`` (an object store) given version 0's files.

    ``settings_``: Settings fields other than the data dir; ``limits``: the server's lanes
    (coordinator.gateway.lanes; by default as the settings say)."""
    ledger = Ledger(redis_client)
    if store is None:
        shutil.copytree(published.blobs, tmp / "blobs")
        store = BlobStore(tmp / "blobs")
    else:
        source = BlobStore(published.blobs)
        for sha in set(published.files.values()):
            store.put_file(source.path(sha))
    ledger.versions.publish(VersionRecord(version=0, parent=-1, files=dict(published.files)))
    registry = TokenRegistry(ledger.tokens, cache_s=cache_s)
    tokens = {role: registry.create(role) for role in ROLES}
    # The rig's adapters are synthetic (make_adapter): they learned no shard, so the shard proof
    # is off here unless a test turns it on (tests/test_shardproof.py trains real ones).
    settings = Settings(data_dir=tmp, **{"shard_sigmas": 0.0, **settings_})
    history = History(ledger, store, tmp)
    deps = servicers.Deps(settings, ledger, store, registry, published.model.tokenizer, published.shapes,
                        "10.0.0.1:6379", "ray-secret", history=history,
                        operations=Folder(settings, ledger, store, published.model, history))
    server, health_servicer = grpc_server(deps, limits)
    port = bind(server, listen, str(tls.cert) if tls else None, str(tls.key) if tls else None)
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return Rig(f"127.0.0.1:{port}", deps, ledger, registry, tokens, tmp, server, tls, store, dict(published.files))


@pytest.fixture
def rig(redis_client, published, tmp_path) -> Iterator[Rig]:
    r = start(redis_client, published, tmp_path)
    yield r
    r.close()
