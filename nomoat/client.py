"""The one gRPC client, used by the command line and by workers.

Every call carries the bearer token and a deadline; large payloads are streamed in chunks well
under gRPC's 4 MiB message limit; failures become :class:`NomoatError` with a sentence a person
can act on, never a traceback.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from nomoat import direct, pinning, transfer
from nomoat.v1 import nomoat_pb2 as pb
from nomoat.v1 import nomoat_pb2_grpc as rpc

CHUNK = 1 << 20  # 1 MiB per message
DEFAULT_ADDRESS = "127.0.0.1:50051"
MAX_MESSAGE = 8 << 20
# A worker behind a home router: the router's NAT drops a connection idle for a few minutes, so
# the channel pings every 30 s, with or without a call in flight (the coordinator allows it).
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # 0: keep pinging however long the line is quiet
]


class NomoatError(RuntimeError):
    """A failure explained in one sentence; ``code``: the gRPC status the coordinator answered
    with, when it answered (a caller decides by it whether trying again can help)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class Busy(NomoatError):
    """The coordinator is serving as much of this kind of call as it takes: not an error of the
    caller's, nor a failure; try again after ``retry_after_s`` (the coordinator's hint)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.retry_after_s = retry_after_s


RETRY_AFTER = "nomoat-retry-after-s"  # the trailer a refusal for capacity carries (coordinator.gateway.lanes)


def default_address() -> str:
    return os.environ.get("NOMOAT_COORDINATOR") or DEFAULT_ADDRESS


def addresses(address: str) -> list[str]:
    """The coordinator's addresses: one, or several separated by commas (gateways of one coordinator)."""
    return [a.strip() for a in address.split(",") if a.strip()]


def channel_target(address: str) -> str:
    """The gRPC target for ``address``. Several addresses become one channel over all of them,
    each name resolved once here: gRPC's pick_first connects to the first that answers and, when
    that gateway goes, the next call connects to the next one that does (no load balancer needed)."""
    found = addresses(address)
    if len(found) < 2:
        return address
    resolved = []
    for one in found:
        host, _, port = one.rpartition(":")
        host = host[1:-1] if host.startswith("[") else host
        try:
            info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError):
            raise NomoatError(f"cannot resolve the coordinator address {one!r}; give each address as HOST:PORT, "
                              "separated by commas") from None
        resolved.extend((family, sockaddr[0], port) for family, *_, sockaddr in info[:1])
    if all(family == socket.AF_INET for family, _, _ in resolved):
        return "ipv4:" + ",".join(f"{ip}:{port}" for _, ip, port in resolved)
    return "ipv6:" + ",".join(f"[{ip if family == socket.AF_INET6 else '::ffff:' + ip}]:{port}"
                              for family, ip, port in resolved)


def _explain(exc: grpc.RpcError, address: str) -> NomoatError:
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        if "handshake" in (detail or "").lower():
            return NomoatError(f"cannot reach the coordinator at {address}: the TLS handshake failed ({detail}); "
                               "is --tls-ca the CA that signed its certificate?")
        return NomoatError(f"cannot reach the coordinator at {address} ({detail}); is it running"
                           " (and, if it uses TLS, did you pass --tls-ca, or --ca-fingerprint from its join line)?")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return NomoatError(f"the coordinator at {address} did not answer in time")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return NomoatError(f"the coordinator refused the token: {detail}", code)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return NomoatError(f"not allowed: {detail}", code)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        hint = retry_after(exc)
        if hint > 0:
            return Busy(detail, hint)
    return NomoatError(detail or f"the call failed with {code}", code)


def retry_after(exc: grpc.RpcError) -> float:
    """The seconds a refusal for capacity says to wait before trying again; 0 when it says none."""
    try:
        trailers = exc.trailing_metadata() or ()
    except Exception:  # noqa: BLE001  (an error raised before any answer has no trailers)
        return 0.0
    for key, value in trailers:
        if key == RETRY_AFTER:
            try:
                return max(0.0, float(value))
            except ValueError:
                return 0.0
    return 0.0


class CoordinatorClient:
    def __init__(self, address: str | None = None, token: str | None = None, tls_ca: str | None = None,
                 ca_fingerprint: str | None = None) -> None:
        """``tls_ca``: a CA certificate file to check the server with; ``ca_fingerprint``: the
        coordinator's own CA, named by fingerprint, learned from the handshake and pinned
        (nomoat.pinning); neither: plain gRPC (a coordinator on loopback)."""
        self.address = address or default_address()
        self.ca_fingerprint = ca_fingerprint or ""
        # Stripped: a token pasted from a file often ends in a newline, which gRPC metadata refuses.
        self.token = (token if token is not None else os.environ.get("NOMOAT_TOKEN", "")).strip()
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            *KEEPALIVE,
        ]
        target = channel_target(self.address)
        if target != self.address:  # several gateways: TLS checks the first one's name
            options.append(("grpc.default_authority", addresses(self.address)[0]))
        if ca_fingerprint:
            root = self._pinned(ca_fingerprint)
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            options.append(("grpc.ssl_target_name_override", pinning.PINNED_NAME))
            self.channel = grpc.secure_channel(target, creds, options=options)
        elif tls_ca:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.datasets = rpc.DatasetsStub(self.channel)
        self.jobs = rpc.JobsStub(self.channel)
        self.workers = rpc.WorkersStub(self.channel)
        self.models = rpc.ModelsStub(self.channel)
        self.admin = rpc.AdminStub(self.channel)
        # Pull's chunks come as raw bytes, framed by nomoat.transfer: their data reaches the file
        # as a view into the message, where the generated stub would copy it twice.
        self._pull = self.channel.unary_stream("/nomoat.v1.Models/Pull",
                                               request_serializer=pb.PullRequest.SerializeToString,
                                               response_deserializer=None)

    def _pinned(self, ca_fingerprint: str) -> bytes:
        """The pinned CA, learned from the first of the coordinator's addresses that answers."""
        error = None
        for one in addresses(self.address):
            try:
                return pinning.pinned_ca(one, ca_fingerprint)
            except pinning.PinError as exc:
                error = exc
        raise NomoatError(str(error)) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _meta(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def _call(self, method, request, timeout: float = 30.0):
        try:
            return method(request, timeout=timeout, metadata=self._meta)
        except grpc.RpcError as exc:
            raise _explain(exc, self.address) from None

    def _stream(self, method, request, timeout: float) -> Iterator:
        try:
            yield from method(request, timeout=timeout, metadata=self._meta)
        except grpc.RpcError as exc:
            raise _explain(exc, self.address) from None

    def wait_ready(self, timeout: float = 30.0) -> None:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise NomoatError(f"cannot reach the coordinator at {self.address} within {timeout:.0f} s") from None

    # -- submit -------------------------------------------------------------------------------

    def submit(
        self,
        path: Path,
        name: str = "",
        config: pb.JobConfig | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> pb.SubmitReply:
        path = Path(path)
        size = path.stat().st_size

        def chunks() -> Iterator[pb.SubmitChunk]:
            yield pb.SubmitChunk(header=pb.SubmitHeader(name=name, filename=path.name, size=size, config=config))
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(CHUNK), b""):
                    digest.update(block)
                    yield pb.SubmitChunk(data=block)
                    if progress:
                        progress(len(block))
            yield pb.SubmitChunk(sha256=digest.hexdigest())

        return self._call(self.datasets.Submit, chunks(), timeout=120 + size / (1 << 20))

    # -- status -------------------------------------------------------------------------------

    def status(self, job_id: str = "") -> pb.StatusReply:
        return self._call(self.jobs.Status, pb.StatusRequest(job_id=job_id))

    def watch(self, job_id: str, timeout: float = 7 * 24 * 3600) -> Iterator[pb.JobProgress]:
        return self._stream(self.jobs.Watch, pb.WatchRequest(job_id=job_id), timeout)

    # -- pull ---------------------------------------------------------------------------------

    def pull(self, out: Path, version: int = -1, timeout: float = 3600, fmt: str = "hf", since: int = 0,
             lineage: str = "", progress: transfer.Progress | None = None, patience_s: float = 300.0) -> int:
        """Write a version's folder into ``out``; returns the version number.

        ``fmt`` is hf (a Hugging Face folder), peft (the update since ``since``) or patches (a
        worker cache's catch-up from ``since``). The folder is checked file by file against the
        sha256 its header names and moved into place whole, with a stamp
        (:data:`nomoat.lineage.STAMP`) naming its lineage, version and files; with ``lineage``, a
        coordinator serving another lineage is refused. A stream that breaks off is resumed from
        the bytes already here (see :mod:`nomoat.transfer`), retrying with backoff until no byte
        has arrived for ``patience_s``; ``timeout`` bounds each try.
        """
        request = pb.PullRequest(version=version, since=since, format=pb.PullRequest.Format.Value(fmt.upper()))

        def call(req: pb.PullRequest) -> Iterator[bytes]:
            return self._pull(req, timeout=timeout, metadata=self._meta)

        try:
            header = transfer.pull(call, Path(out), request, explain=lambda exc: _explain(exc, self.address),
                                   lineage=lineage, address=self.address, report=progress, patience_s=patience_s)
        except transfer.PullError as exc:
            raise NomoatError(str(exc)) from None
        return header.version

    # -- workers ------------------------------------------------------------------------------

    def register(self, name: str, card: pb.Card, node_id: str = "", worker_id: str = "") -> pb.RegisterReply:
        request = pb.RegisterRequest(name=name, card=card, node_id=node_id, worker_id=worker_id)
        return self._call(self.workers.Register, request)

    def heartbeat(self, task_id: str, fence: int, worker_id: str = "", event: str = "",
                  secret: str = "") -> pb.HeartbeatReply:
        """Renew the lease of (task, fence), held by ``worker_id`` with the lease ``secret`` its spec carried."""
        request = pb.HeartbeatRequest(task_id=task_id, fence=fence, worker_id=worker_id, event=event,
                                      lease_secret=secret)
        return self._call(self.workers.Heartbeat, request, timeout=15)

    def fetch_shard(self, task_id: str, fence: int, worker_id: str = "", secret: str = "",
                    limit: int = 1 << 30) -> bytes:
        """The task's records, for the lease's holder (``worker_id`` with the lease ``secret``);
        from the object store when the coordinator names a URL for them (checked against the
        sha256 and size it names)."""
        request = pb.FetchShardRequest(task_id=task_id, fence=fence, worker_id=worker_id, lease_secret=secret)
        parts = self._stream(self.workers.FetchShard, request, 600)
        first = next(parts, None)
        if first is not None and first.url:
            if not first.url.startswith(("https://", "http://")):
                raise NomoatError("the coordinator sent an unusable address for the task's shard")
            try:
                return direct.get_all(first.url, first.sha256, first.size, limit)
            except direct.DirectError as exc:
                raise NomoatError(f"cannot fetch the task's shard from the object store: {exc}") from None
        return b"".join(p.data for p in ([first] if first is not None else [])) + b"".join(p.data for p in parts)

    def upload(self, manifest: pb.AdapterManifest, data: bytes, timeout: float = 600,
               offset: int = 0, pace: Callable[[int], object] | None = None) -> pb.UploadReply:
        """Send ``data`` from byte ``offset`` on (what the coordinator lacks, per upload_offset);
        ``pace(n)`` is called before each chunk of n bytes (an upload limit waits there)."""
        resumed = pb.AdapterManifest()
        resumed.CopyFrom(manifest)
        resumed.offset = offset

        def chunks() -> Iterator[pb.UploadChunk]:
            yield pb.UploadChunk(manifest=resumed)
            for i in range(offset, len(data), CHUNK):
                if pace is not None:
                    pace(len(data[i : i + CHUNK]))
                yield pb.UploadChunk(data=data[i : i + CHUNK])

        return self._call(self.workers.Upload, chunks(), timeout=timeout)

    def upload_target(self, manifest: pb.AdapterManifest) -> str:
        """Where to PUT the adapter of ``manifest`` (a presigned URL of the coordinator's object
        store), or "" to send it through :meth:`upload`."""
        request = pb.UploadTargetRequest(task_id=manifest.task_id, fence=manifest.fence, sha256=manifest.sha256,
                                         size=manifest.size, worker_id=manifest.worker_id,
                                         lease_secret=manifest.lease_secret)
        try:
            return self.workers.UploadTarget(request, timeout=15, metadata=self._meta).url
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # a coordinator from before object stores
                return ""
            raise _explain(exc, self.address) from None

    def upload_offset(self, task_id: str, fence: int, sha256: str, worker_id: str = "", secret: str = "") -> int:
        """How many bytes of this upload the coordinator already holds from a broken-off try
        (0 to anyone but the lease's holder: ``worker_id`` with the lease ``secret``)."""
        request = pb.UploadOffsetRequest(task_id=task_id, fence=fence, sha256=sha256, worker_id=worker_id,
                                         lease_secret=secret)
        return self._call(self.workers.UploadOffset, request, timeout=15).offset

    def request_work(self, worker_id: str, wait_s: float, stop: threading.Event | None = None) -> pb.WorkReply:
        """Long-poll for the next run placed on this (outbound-only) worker. Setting ``stop``
        cancels the poll at once (an empty reply): a volunteer's Ctrl-C does not wait it out. A
        run the coordinator placed in that instant is lost with the reply; its leases run out and
        it is issued again."""
        request = pb.WorkRequest(worker_id=worker_id, wait_s=wait_s)
        if stop is None:
            return self._call(self.workers.RequestWork, request, timeout=wait_s + 30)
        call = self.workers.RequestWork.future(request, timeout=wait_s + 30, metadata=self._meta)
        while not call.done():
            if stop.wait(0.1):
                call.cancel()
                return pb.WorkReply()
        try:
            return call.result()
        except grpc.RpcError as exc:
            raise _explain(exc, self.address) from None

    def report_run(self, worker_id: str, run_id: str, units: list[str], handed_back: list[str],
                   lease_secrets: dict[str, str] | None = None) -> None:
        """Say how each unit of a run ended (UnitResult JSON), and which were handed back unstarted,
        with each unit's lease secret (task id -> the secret its spec carried)."""
        request = pb.RunReport(worker_id=worker_id, run_id=run_id, units=units, handed_back=handed_back,
                               lease_secrets=lease_secrets or {})
        self._call(self.workers.ReportRun, request, timeout=30)

    # -- admin --------------------------------------------------------------------------------

    def worker_stats(self, worker_id: str = "") -> pb.WorkerStatsReply:
        """What this token's volunteer gave (an admin token may name a worker)."""
        return self._call(self.workers.Stats, pb.WorkerStatsRequest(worker_id=worker_id))

    def rollback(self, version: int) -> pb.VersionReply:
        return self._call(self.admin.Rollback, pb.RollbackRequest(version=version), timeout=3600)

    def unmerge(self, adapter_id: str) -> pb.VersionReply:
        return self._call(self.admin.Unmerge, pb.UnmergeRequest(adapter_id=adapter_id), timeout=3600)

    def sweep(self, dry_run: bool = False) -> pb.SweepReply:
        """The retention sweep (what it freed, or with ``dry_run`` would free)."""
        return self._call(self.admin.Sweep, pb.SweepRequest(dry_run=dry_run), timeout=3600)

    def create_token(self, role: str, name: str = "") -> pb.CreateTokenReply:
        return self._call(self.admin.CreateToken, pb.CreateTokenRequest(role=role, name=name))

    def revoke_token(self, token_or_id: str) -> bool:
        return self._call(self.admin.RevokeToken, pb.RevokeTokenRequest(token=token_or_id)).revoked

    def list_tokens(self) -> list[pb.TokenInfo]:
        return list(self._call(self.admin.ListTokens, pb.ListTokensRequest()).tokens)

    def list_volunteers(self) -> list[pb.VolunteerInfo]:
        return list(self._call(self.admin.ListVolunteers, pb.ListVolunteersRequest()).volunteers)

    def ban_volunteer(self, volunteer_id: str) -> pb.VolunteerReply:
        return self._call(self.admin.BanVolunteer, pb.VolunteerRequest(volunteer_id=volunteer_id))

    def clear_volunteer(self, volunteer_id: str) -> pb.VolunteerReply:
        return self._call(self.admin.ClearVolunteer, pb.VolunteerRequest(volunteer_id=volunteer_id))

    def rotate_join_code(self) -> str:
        return self._call(self.admin.RotateJoinCode, pb.RotateJoinCodeRequest()).join_code
