"""``nomoat worker start --ray``: register with the coordinator, join Ray as a node, run until stopped.

Ray mode is for machines that trust each other: the coordinator gives the Ray cluster's token
only to trusted-worker tokens (anyone holding it can run code on every node). The public runs
outbound-only (worker.outbound).

The node advertises the card as Ray custom resources (``vram_gb``, one ``nomoat_worker`` slot)
and labels, its worker id among them; the coordinator's tasks land on it when they fit, and their
specs name this worker and its card. What only this machine knows (the volunteer's token and CA,
the cache, threads) reaches the tasks through the node's environment (``worker.settings``). Ctrl-C (or SIGTERM) stops the node:
a task still running there is retried elsewhere by Ray or re-issued by the coordinator.

The agent outlives what it depends on. If its Ray node dies, or the Ray head stops answering
(a coordinator that was killed takes its head with it, and its successor starts a new one), the
agent stops the node, registers again (the coordinator says where Ray now is) and starts a new
node, backing off while the coordinator is away. Adapters that a dying task left in the outbox
are delivered from here (see worker.uploader).

The volunteer's controls (worker.controls: a pause, --hours, --idle-only) are checked every
second. When they say stop, the agent holds the node (its tasks hand back the units they have not
started), waits for the unit in training to finish, leaves the Ray cluster so that no more runs
are placed here, and rejoins once they say go.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from nomoat import raynode as ray_node
from nomoat.card import Card, to_message
from nomoat.client import CoordinatorClient, NomoatError
from nomoat.logs import fields
from nomoat.progress import ProgressFile, TaskBar
from worker import credentials, uploader
from worker.cache import default_cache_dir
from worker.controls import Controls, ControlSettings
from worker.credentials import Credentials, is_join_code
from worker.probe import ray_labels, ray_resources
from worker.settings import NodeSettings

log = logging.getLogger("nomoat.worker")

HEAD_GRACE_S = 10.0  # the head may not answer for this long before the node is replaced
DRAIN_S = 3600.0  # a pause waits at most this long for the unit in training to finish
CHECK_EVERY_S = 1.0
MAX_BACKOFF_S = 30.0


def reachable(address: str, timeout: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


class WorkerAgent:
    def __init__(self, client: CoordinatorClient, card: Card, name: str = "", ray_address: str = "",
                 cache_dir: Path | None = None, threads: int = 0, node_ip: str | None = None,
                 tls_ca: str | None = None, controls: Controls | None = None, bar: TaskBar | None = None) -> None:
        self.client = client
        # A join code is swapped for this user's volunteer credential when registering (worker.credentials).
        self.join_code = client.token if is_join_code(client.token) else ""
        self.credentials = Credentials(client.address, client.ca_fingerprint) if self.join_code else None
        self.card = card
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.ray_address = ray_address
        self.cache_dir = Path(cache_dir or default_cache_dir())
        self.threads = threads
        self.node_ip = node_ip
        # The tasks on this node connect to the coordinator themselves, checking it with this CA.
        self.tls_ca = str(Path(tls_ca).resolve()) if tls_ca else ""
        self.node: ray_node.RayNode | None = None
        self.head = ""  # the Ray head (GCS) address the node joined
        self.worker_id = ""
        self.lineage = ""  # the coordinator's model lineage: only its adapters leave the outbox
        self.outbox = uploader.Outbox(self.cache_dir / "outbox")
        self.controls = controls or Controls(ControlSettings(self.cache_dir / "control"))
        self.progress = ProgressFile(self.controls.settings.state_dir / "progress.json")
        self.bar = bar or TaskBar()
        self._stop = threading.Event()

    def start(self) -> None:
        self.client.wait_ready()
        # Registering again after the node was replaced: the same worker, under the same id.
        reply = credentials.register(self.client, self.credentials, self.name, to_message(self.card),
                                     worker_id=self.worker_id, join_code=self.join_code)
        self.worker_id, self.lineage = reply.worker_id, reply.lineage
        if not reply.ray_auth_token:
            raise NomoatError("Ray mode needs a trusted-worker token, and the coordinator gave this one no Ray "
                              "cluster token; leave out --ray to run outbound-only, or ask the operator for a "
                              "token made with `nomoat token create --role trusted-worker`")
        self.head = self.ray_address or reply.ray_address
        # Tasks on this node talk to the coordinator as this volunteer, so the leases they take
        # are this volunteer's and no other worker token can act for them.
        env = NodeSettings(cache_dir=self.cache_dir, token=self.client.token, tls_ca=self.tls_ca,
                           ca_fingerprint=self.client.ca_fingerprint,
                           torch_threads=self.threads, max_power_w=self.controls.settings.max_power_w,
                           max_upload_mbps=self.controls.settings.max_upload_mbps).env()
        if self.card.simulated:
            env["CUDA_VISIBLE_DEVICES"] = ""  # a simulated card trains on the CPU
        labels = {**ray_labels(self.card), ray_node.WORKER_ID_LABEL: self.worker_id}
        log_path = self.cache_dir / "logs" / f"ray-node-{self.worker_id}.log"
        self.node = ray_node.worker_node(self.head, reply.ray_auth_token, ray_resources(self.card),
                                         labels, log_path, env=env, node_ip=self.node_ip)
        self.node.start()

    def run(self) -> None:
        """Block until Ctrl-C / SIGTERM, replacing the node whenever it or its head goes away."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        # Its own thread: an adapter must reach a restarted coordinator before the lease it was
        # made under runs out, even while the node is being replaced.
        threading.Thread(target=self._deliver_orphans, name="outbox", daemon=True).start()
        head_lost_at = None
        while not self._stop.wait(CHECK_EVERY_S):
            allowed, why = self.controls.allowed_now()
            if not allowed:
                self.pause(why)
                continue
            self.bar.show(self.progress.read())
            if self.node.alive() and reachable(self.head):
                head_lost_at = None
                continue
            if self.node.alive():
                head_lost_at = head_lost_at or time.monotonic()
                if time.monotonic() - head_lost_at < HEAD_GRACE_S:
                    continue
                log.warning("the Ray head at %s stopped answering; leaving it", self.head)
            else:
                log.warning("the Ray node stopped (see %s)", self.node.log_path)
            head_lost_at = None
            self.rejoin()

    def rejoin(self) -> None:
        """Stop the node, then register and start a new one, backing off until it works."""
        self.stop(timeout=5.0)  # without its head, a node's own shutdown only hangs
        delay = 1.0
        while not self._stop.is_set():
            try:
                self.start()
                log.warning("worker %s rejoined the Ray cluster at %s", self.worker_id, self.head,
                            extra=fields("worker.rejoined", worker=self.worker_id, head=self.head))
                return
            except (NomoatError, ray_node.RayNodeError) as exc:
                log.warning("cannot rejoin yet (%s); trying again in %.0f s", str(exc).splitlines()[0], delay)
                self.stop(timeout=5.0)
            self._stop.wait(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)

    def pause(self, why: str) -> None:
        """Stop taking work until the controls allow it again (see the module docstring)."""
        log.info("worker %s pauses: %s", self.worker_id, why, extra=fields("worker.paused", worker=self.worker_id,
                                                                           reason=why))
        self.controls.files.hold(why)  # the node's tasks hand back what they have not started
        drained = time.monotonic() + DRAIN_S
        self._stop.wait(2 * CHECK_EVERY_S)  # a run placed just now starts, and hands its units back
        while (current := self.progress.read()) is not None and time.monotonic() < drained:
            self.bar.show(current, waiting=f"finishing {current.task_id}, then pausing")
            if self._stop.wait(CHECK_EVERY_S):
                break
        # The run's results (the units handed back) reach the coordinator before the node goes.
        self._stop.wait(2 * CHECK_EVERY_S)
        self.stop(timeout=30.0)  # out of the Ray cluster: no run is placed here while paused
        log.info("worker %s left the Ray cluster until it may train again", self.worker_id,
                 extra=fields("worker.left", worker=self.worker_id, reason=why))
        self.bar.show(None, waiting=f"paused: {why}")
        allowed = self.controls.wait_until_allowed(self._stop)
        self.controls.files.unhold()
        if allowed:
            log.info("worker %s resumes", self.worker_id, extra=fields("worker.resumed", worker=self.worker_id))
            self.rejoin()

    def _deliver_orphans(self) -> None:
        while not self._stop.wait(CHECK_EVERY_S):
            try:
                uploader.deliver_orphans(self.client, self.outbox, self.lineage)
            except Exception:  # noqa: BLE001  (the outbox must never take the agent down)
                log.exception("delivering the outbox failed")

    def stop(self, timeout: float = 30.0) -> None:
        if self.node is not None:
            self.node.stop(timeout)
        self.bar.close()
