"""The coordinator process: wires the ledger, store, running model, scheduler, folder and gRPC.

Start-up order: Redis (embedded unless --redis-url), tokens, Ray (a head of its own, with its own
token, unless --ray-address names the operator's cluster, whose token it then uses),
the running model (version 0 is the base model, published on first start; later starts load the
newest version), then the gRPC server and two loops: the scheduler and the folder. Shutdown
runs the same list backwards.

``Settings.role`` picks the parts: ``all`` runs every one; ``gateway`` serves gRPC and HTTP only
(no loops, no Ray driver); ``scheduler`` and ``folder`` run that loop only. Each loop runs while
its process leads the role (coordinator.ledger.leaders) and writes under that lease's fence, so
any number of processes of any roles can share one Redis.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import redis
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.fold import evaluators, rollback

from coordinator.gateway import servicers, tls
from coordinator.gateway.aio_server import LoopHealth, LoopServer
from coordinator.gateway.auth import AuthInterceptor, TokenRegistry
from coordinator.gateway.decoding import MessageCheck
from coordinator.gateway.lanes import Lanes, Limits
from coordinator.gateway.long_polls import Wakeups
from coordinator.schedule import roster
from coordinator.fold.folder import Folder
from coordinator.model.history import History
from coordinator.ledger import Ledger, VersionRecord, connect
from coordinator.ledger.leaders import Leadership, NotLeader, Term
from coordinator.ledger.versions import VersionConflict
from coordinator.model.running import RunningModel
from coordinator.ledger.redis_server import EmbeddedRedis
from coordinator.schedule.replication import Replication
from coordinator.schedule.scheduler import Scheduler
from coordinator.settings import Settings
from coordinator.model import retention
from coordinator.model.store import open_store
from coordinator.collect.partial_uploads import PartialUploads, Sweeper
from coordinator.gateway.web.server import WebServer
from nomoat import raynode as ray_node

log = logging.getLogger("nomoat.coordinator")


def base_model_folder(spec: str) -> Path:
    if spec == "tiny":
        from nomoat.tiny import tiny_model_path

        return tiny_model_path()
    folder = Path(spec).expanduser()
    if not (folder / "config.json").exists():
        raise SystemExit(f"--base-model {spec}: not a Hugging Face model folder (no config.json)")
    return folder


def redis_client(url: str) -> redis.Redis:
    """A client that rides out a Redis restart, or a Sentinel failover (coordinator.ledger.connect)."""
    return connect.redis_client(url)


def _secret_file(path: Path) -> str:
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    return path.read_text().strip()


MAX_MESSAGE = 8 << 20  # bytes in one gRPC message, either way; streams carry 1 MiB chunks
# Outbound workers sit behind home routers whose NAT forgets an idle connection within minutes:
# they ping every 30 s (nomoat.client), which the server must allow without a call in flight and
# without counting them as abuse; it pings idle clients itself every minute to drop dead ones.
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),  # 0: never close a connection for pinging too often
]


def grpc_server(deps: servicers.Deps, limits: Limits | None = None) -> tuple[LoopServer, LoopHealth]:
    """Every servicer behind the token interceptor, with message and stream limits and the open
    health check, served by ``grpc.aio`` on a loop thread of its own (its lanes:
    coordinator.gateway.lanes; ``limits``: as the settings say unless given); not yet bound to an
    address (see :func:`bind`) or started."""
    lanes = deps.lanes = Lanes(limits or Limits.of(deps.settings))
    holder: dict[str, object] = {}

    async def lookup(method: str, token: str):
        return await lanes.run(lanes.for_method(method), deps.registry.lookup, token)

    async def build() -> grpc.aio.Server:
        server = grpc.aio.server(
            interceptors=[AuthInterceptor(deps.registry, lookup), MessageCheck()],
            options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                     ("grpc.max_send_message_length", MAX_MESSAGE), *KEEPALIVE],
        )
        deps.wakeups = Wakeups(deps.ledger, asyncio.get_running_loop())
        servicers.add_all(server, deps)
        holder["health"] = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(holder["health"], server)
        return server

    def stopped() -> None:
        deps.wakeups.stop()
        lanes.shutdown()

    server = LoopServer(build, on_stop=stopped)
    return server, LoopHealth(server, holder["health"])


def bind(server: LoopServer, listen: str, tls_cert: str | None = None, tls_key: str | None = None) -> int:
    """Listen on ``listen`` (TLS when given a certificate and key); returns the port."""
    if tls_cert:
        creds = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
        port = server.add_secure_port(listen, creds)
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise SystemExit(f"cannot listen on {listen}: the address is in use or invalid")
    return port


class Coordinator:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = Path(settings.data_dir)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sweeper: Sweeper | None = None  # partial uploads of leases that ended (coordinator.collect.partial_uploads)
        self._redis_server: EmbeddedRedis | None = None
        self._ray_head: ray_node.RayNode | None = None
        self._ray_temp_dir: Path | None = None
        self.scheduler_term = Term()  # the scheduler's fence, shared with its outbound dispatcher
        self.server: LoopServer | None = None
        self.web: WebServer | None = None  # the HTTP port, when settings.http names one
        self.web_error = ""  # why it could not be served, when it could not

    # -- start-up -----------------------------------------------------------------------------

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self._start_redis()
        self.registry = TokenRegistry(self.ledger.tokens)
        self.admin_token = self.registry.ensure_file(self.data_dir / "admin.token", "admin")
        self.worker_token = self.registry.ensure_file(self.data_dir / "worker.token", "worker")
        # For machines that trust each other only: it is given the Ray cluster's token.
        self.trusted_token = self.registry.ensure_file(self.data_dir / "trusted-worker.token", "trusted-worker")
        # What the public join line carries: it may only register, minting each volunteer a
        # credential of its own (coordinator.schedule.roster).
        self.join_code, self.join_code_new = roster.ensure_join_code(
            self.ledger, self.registry, self.data_dir / roster.JOIN_CODE_FILE)
        self._start_tls()
        self.store = open_store(self.settings.store, self.data_dir, self.settings.store_endpoint)
        self.replication = Replication(self.settings, self.ledger, self.store)
        self._start_model()
        self._start_ray()
        if self.settings.serves:
            self._start_grpc()
        self._start_loops()
        if self.settings.serves:
            self._start_http()

    def _start_tls(self) -> None:
        """TLS by default (coordinator.gateway.tls): a listener beyond loopback without
        --tls-cert/--tls-key serves a certificate of the coordinator's own CA, which clients pin
        by the fingerprint the join lines carry."""
        self.ca_fingerprint = ""
        self.own_tls = None
        if self.settings.tls_cert or tls.is_loopback(self.settings.listen):
            return
        if self.settings.insecure_plaintext:
            log.warning("gRPC on %s is plain text (--insecure-plaintext): tokens cross the network in the clear",
                        self.settings.listen)
            return
        self.own_tls = tls.own_tls(self.data_dir / "tls", [self.settings.listen, self.settings.public_address])
        self.ca_fingerprint = self.own_tls.fingerprint
        self.settings = replace(self.settings, tls_cert=str(self.own_tls.cert), tls_key=str(self.own_tls.key))
        log.info("gRPC is served with TLS, by the coordinator's own CA %s (%s)", self.ca_fingerprint,
                 self.own_tls.ca)

    def _start_redis(self) -> None:
        url = self.settings.redis_url
        if not url:
            self._redis_server = EmbeddedRedis(self.data_dir / "redis")
            url = self._redis_server.start()
        self.r = redis_client(url)
        self.r.ping()
        self.ledger = Ledger(self.r, connect.durability_for(url))
        self.ledger.index()  # once per start: indexes and counters a ledger from before them lacks
        if self._redis_server is not None:
            self._spawn("redis-watch", self._watch_redis)

    def _watch_redis(self) -> None:
        """Restart the embedded redis-server if it dies; clients ride out the gap (redis_client)."""
        delay = 0.5
        while not self._stopping.wait(delay):
            if self._redis_server.alive():
                delay = 0.5
                continue
            log.warning("the embedded redis-server exited; restarting it on the same port and files")
            try:
                self._redis_server.restart()
                log.warning("the embedded redis-server is back (pid %s)", self._redis_server.pid)
            except Exception:  # noqa: BLE001  (keep trying: the ledger is useless without it)
                log.exception("restarting redis-server failed")
                delay = min(delay * 2, 10.0)

    def _start_model(self) -> None:
        from coordinator.model.running import resolve_device

        try:
            device = resolve_device(self.settings.device)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        self.device = device
        self.history = History(self.ledger, self.store, self.data_dir, device)
        latest = self.ledger.versions.latest()
        if latest is None:
            self.model = RunningModel(base_model_folder(self.settings.base_model), device)
            files = self.model.publish(self.store)
            try:
                self.ledger.versions.publish(VersionRecord(version=0, parent=-1, files=files,
                                                           metrics={"base_model": self.settings.base_model}))
                log.info("version 0 is the base model %s", self.settings.base_model)
            except (VersionConflict, redis.WatchError):  # another process of this coordinator came first
                latest = self.ledger.versions.latest()
        if latest is not None:
            self.model = self.history.rebuild(latest)
            log.info("resuming from version %d", latest)
        log.info("model lineage %s", self.history.lineage().id)  # fixed with version 0, once
        self.shapes = {name: (m.out_features, m.in_features) for name, m in self.model.model.named_modules()
                       if isinstance(m, torch.nn.Linear)}

    def _start_ray(self) -> None:
        """Join the operator's Ray cluster with its own token, or start a head with ours.

        Raises RayClusterError (a sentence) when the operator's cluster cannot be used.
        """
        self.ray_dispatcher = None
        if not (self.settings.schedules and self.settings.uses_ray):
            self._without_ray()
            return
        address = self.settings.ray_address
        if address:
            # The cluster's token is the operator's; workers are given the same one to join it.
            self.ray_token = ray_node.operator_token(self.settings.ray_token_file)
            ray_node.check_token(address, self.ray_token)
        else:
            self.ray_token = _secret_file(self.data_dir / "ray.token")
        ray_node.use_ray_token(self.ray_token)
        import ray

        if not address:
            record = self.data_dir / "ray-head.json"
            if ray_node.stop_leftovers(record):  # an earlier coordinator here was killed outright
                log.warning("stopped what was left of the Ray head of an earlier coordinator")
            temp_dir = Path(tempfile.mkdtemp(prefix="nomoat-ray-"))
            self._ray_temp_dir = temp_dir
            self._ray_head, address = ray_node.head_node(
                self.settings.ray_node_ip, self.settings.ray_port, self.ray_token, temp_dir,
                self.data_dir / "logs" / "ray-head.log",
            )
            self._ray_head.start()
            ray_node.remember(self._ray_head, temp_dir, record)
        self.ray_address = address
        try:
            ray.init(address=address, namespace="nomoat", log_to_driver=False, configure_logging=False)
        except ConnectionError as exc:
            raise ray_node.RayClusterError(f"cannot join the Ray cluster at {address}: {exc}") from None
        from coordinator.schedule.ray_dispatch import RayDispatcher
        from coordinator.schedule.inbox_dispatch import OutboundDispatcher
        from coordinator.schedule.transport import Dispatchers

        # One scheduler, two transports: trusted Ray nodes and outbound-only volunteers. The Ray
        # one also takes evaluation tasks (trusted workers only: --eval-on).
        self.ray_dispatcher = RayDispatcher()
        self.dispatcher = Dispatchers(self.ray_dispatcher, OutboundDispatcher(
            self.ledger, self.settings.outbound_liveness_s, term=self.scheduler_term))

    def _without_ray(self) -> None:
        """A process that drives no Ray: a gateway or a folder (or any role with --ray-address off).
        A gateway still hands the operator's cluster (--ray-address) to trusted workers; a
        scheduler places runs on outbound volunteers only."""
        from coordinator.schedule.inbox_dispatch import OutboundDispatcher
        from coordinator.schedule.transport import Dispatchers

        address = self.settings.ray_address if self.settings.uses_ray else None
        self.ray_address, self.ray_token = "", ""
        if address:
            self.ray_token = ray_node.operator_token(self.settings.ray_token_file)
            self.ray_address = address
        self.dispatcher = Dispatchers(OutboundDispatcher(self.ledger, self.settings.outbound_liveness_s,
                                                         term=self.scheduler_term))

    def _start_grpc(self) -> None:
        deps = servicers.Deps(self.settings, self.ledger, self.store, self.registry, self.model.tokenizer,
                            self.shapes, self.ray_address, self.ray_token, history=self.history,
                            uploads=PartialUploads(self.data_dir / "uploads"), replication=self.replication)
        self.deps = deps
        self._sweeper = Sweeper(deps.uploads, lambda task_id, fence: not self.ledger.leases.problem(task_id, fence),
                                self.settings.upload_sweep_s, self.settings.partial_upload_max_age_s).start()
        self.server, self.health = grpc_server(deps)
        port = bind(self.server, self.settings.listen, self.settings.tls_cert, self.settings.tls_key)
        host = self.settings.listen.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"
        if self.settings.listen.endswith(":0"):  # a free port was asked for: tell everyone the real one
            self.settings = replace(self.settings, listen=self.address)
        deps.settings = self.settings
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    def _start_loops(self) -> None:
        """The scheduler and the folder, each campaigning for its leader lease and running its
        loop while it leads (coordinator.ledger.leaders). An admin's rollback or unmerge, received
        by any gateway, is carried out by the folding leader under its fence (coordinator.fold.rollback)."""
        from coordinator.schedule.ray_dispatch import task_need

        model_config = self.model.model.config
        if self.settings.schedules:
            self.scheduler = Scheduler(self.settings, self.ledger, self.dispatcher, self.worker_token,
                                       lambda job_config: task_need(model_config, job_config),
                                       replication=self.replication, term=self.scheduler_term)
            self.scheduling = Leadership(self.r, "scheduler", self.settings.leader_ttl_s)
            self._spawn("lead-scheduler", lambda: self.scheduling.run(self._stopping))
            self._spawn("scheduler", self._schedule_loop)
        if self.settings.folds or self.settings.serves:
            self.folder = Folder(self.settings, self.ledger, self.store, self.model, self.history,
                                 evaluator=self._evaluator())
        if self.settings.serves:
            self.deps.operations = self.folder
        if self.settings.folds:
            self.folding = Leadership(self.r, "folder", self.settings.leader_ttl_s)
            self._spawn("lead-folder", lambda: self.folding.run(self._stopping))
            self._spawn("folder", self._fold_loop)
            if self.settings.sweep_every_s > 0:
                self._spawn("sweeper", self._sweep_loop)

    def _begin_scheduling(self) -> None:
        """A new term as the scheduler (this process's first, or a takeover): every lease gets one
        TTL from now to be renewed, counted from when a scheduler watches again (the previous one
        may have been dead for a while, and workers could not be told anything meanwhile)."""
        moved = self.ledger.leases.reset(time.time() + self.settings.lease_ttl_s)
        if moved:
            log.info("%d leases from before this scheduler took over must be renewed within %.0f s", moved,
                     self.settings.lease_ttl_s)

    def _evaluator(self) -> evaluators.Evaluator:
        """Where the folder's evaluations run (--eval-on; coordinator.fold.evaluators.evaluator_for)."""
        try:
            chosen = evaluators.evaluator_for(
                self.settings, self.device, evaluators.OnCoordinator(self.model, self.settings.eval_dtype),
                self.ray_dispatcher, lineage=self.history.lineage().id, token=self.worker_token,
                n_params=sum(p.numel() for p in self.model.model.parameters()))
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        if isinstance(chosen, evaluators.OnWorkers):
            log.info("evaluations run on trusted workers' cards when one is up (--eval-on %s), else on the "
                     "coordinator's %s", self.settings.eval_on, self.device)
        else:
            log.info("evaluations run on the coordinator's %s", self.device)
        return chosen

    def _start_http(self) -> None:
        """The dashboard and /metrics on their own port, opened with a reader token (one is kept in
        the data dir for the operator). Not being able to listen is noted in ``web_error``, not
        raised: the coordinator serves its workers either way (the command decides)."""
        if not self.settings.http:
            return
        self.reader_token = self.registry.ensure_file(self.data_dir / "reader.token", "reader")
        try:
            # The coordinator's own certificate only where the dashboard is reachable from elsewhere:
            # a browser on this machine would balk at a CA it was never told of.
            secure = self.own_tls is None or not tls.is_loopback(self.settings.http)
            self.web = WebServer(self.settings.http, self.ledger, self.settings, self.registry,
                                 self.settings.http_interval_s, self.settings.tls_cert if secure else None,
                                 self.settings.tls_key if secure else None)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.web_error = f"the dashboard cannot listen on {self.settings.http}: {reason}"
            log.warning("%s", self.web_error)
            return
        self.web.start()
        log.info("dashboard at %s", self.web.url)

    def _spawn(self, name: str, body) -> None:
        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _schedule_loop(self) -> None:
        term = 0
        while not self._stopping.wait(self.settings.tick_s):
            fence = self.scheduling.fence()
            if fence is None:
                continue  # a standby: another process schedules
            try:
                if self.scheduling.terms != term:
                    term = self.scheduling.terms
                    self._begin_scheduling()
                idle = self.scheduler.tick(leader=fence)
                # For the folder, which may be another process: fold these jobs' last adapters now.
                self.ledger.jobs.set_idle(idle, max(5.0, 10 * self.settings.tick_s))
            except NotLeader as exc:
                log.warning("this process stopped scheduling mid-round: %s", exc)
            except redis.ConnectionError as exc:
                log.warning("Redis is unreachable (%s); retrying", exc)
            except Exception:  # noqa: BLE001  (the loop must outlive one bad round)
                log.exception("scheduler round failed")

    def _fold_loop(self) -> None:
        while not self._stopping.wait(self.settings.tick_s):
            fence = self.folding.fence()
            if fence is None:
                continue  # a standby: another process folds
            try:  # an admin's rollback or unmerge (queued by any gateway) first, then a fold if due
                rollback.carry_out(self.folder, self.ledger.operations, fence)
                self.folder.maybe_fold(self.ledger.jobs.idle(), leader=fence)
            except NotLeader as exc:
                log.warning("this process stopped folding: %s", exc)
            except redis.ConnectionError as exc:
                log.warning("Redis is unreachable (%s); retrying", exc)
            except Exception:  # noqa: BLE001
                log.exception("fold round failed")

    def _sweep_loop(self) -> None:
        """The retention sweeper (coordinator.model.retention), beside the folder in its process and
        only while it leads the folder (one sweeper at a time, under the folder's lock)."""
        while not self._stopping.wait(self.settings.sweep_every_s):
            if self.folding.fence() is None:
                continue
            try:
                retention.sweep_under(self.settings, self.ledger, self.store, self.history.dir, self.folder.lock)
            except redis.ConnectionError as exc:
                log.warning("Redis is unreachable (%s); retrying", exc)
            except Exception:  # noqa: BLE001
                log.exception("retention sweep failed")

    # -- shutdown -----------------------------------------------------------------------------

    def _pin(self) -> str:
        """How a client is told to check this coordinator: its own CA's fingerprint, or the
        operator's CA file; "" for plain gRPC on loopback."""
        if self.ca_fingerprint:
            return f" --ca-fingerprint {self.ca_fingerprint}"
        return " --tls-ca CA.pem" if self.settings.tls_cert else ""

    def join_command(self, show_code: bool = True) -> str:
        """What the public runs: an outbound-only worker (no Ray, no open port), with the join
        code (``show_code``; else read from the data dir's file)."""
        code = self.join_code if show_code else f"$(cat {self.data_dir / roster.JOIN_CODE_FILE})"
        notes = []
        if not self.join_code:  # rotated on another gateway: only the operator has it (roster.ensure_join_code)
            code = "JOIN_CODE"
            notes.append("JOIN_CODE: the one `nomoat volunteer rotate-join-code` printed")
        line = f"NOMOAT_TOKEN={code} nomoat worker start --coordinator {self.settings.join_address}{self._pin()}"
        if "--tls-ca" in line:
            notes.append("CA.pem: the CA that signed --tls-cert")
        return line + ("  # " + "; ".join(notes) if notes else "")

    def admin_connection(self) -> str:
        """The environment that points ``nomoat`` commands at this coordinator as its admin."""
        pin = f" NOMOAT_CA_FINGERPRINT={self.ca_fingerprint}" if self.ca_fingerprint else ""
        return (f"NOMOAT_COORDINATOR={self.settings.join_address}{pin} "
                f"NOMOAT_TOKEN=$(cat {self.data_dir / 'admin.token'})")

    def trusted_join_command(self) -> str:
        """What a machine that trusts this one runs to join the Ray cluster (never give it out:
        its token lets the holder run code on every node)."""
        return (f"NOMOAT_TOKEN=$(cat {self.data_dir / 'trusted-worker.token'}) nomoat worker start --ray "
                f"--coordinator {self.settings.join_address} --ray-address {self.ray_address}{self._pin()}")

    def wait(self) -> None:
        self._stopping.wait()

    def stop(self) -> None:
        self._stopping.set()
        if self.web is not None:
            self.web.stop()
        if self.server is not None:
            self.health.enter_graceful_shutdown()
            self.server.stop(grace=5).wait()
        for thread in self._threads:
            thread.join(timeout=60)
        if self._sweeper is not None:
            self._sweeper.stop()
        try:
            import ray

            ray.shutdown()
        except Exception:  # noqa: BLE001
            log.exception("ray.shutdown failed")
        if self._ray_head is not None:
            self._ray_head.stop()
            (self.data_dir / "ray-head.json").unlink(missing_ok=True)
            # Ray's session files (sockets, its own logs); ours are in data_dir/logs. After a crash
            # they stay until the next start here has stopped what is left of that head.
            shutil.rmtree(self._ray_temp_dir, ignore_errors=True)
        if self._redis_server is not None:
            self._redis_server.stop()
