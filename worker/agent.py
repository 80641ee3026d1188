"""``nomoat worker start``: register with the coordinator, join Ray as a node, run until stopped.

The node advertises the card as Ray custom resources (``vram_gb``, one ``nomoat_worker`` slot)
and labels; the coordinator's tasks land on it when they fit. Ctrl-C (or SIGTERM) stops the node:
a task still running there is retried elsewhere by Ray or re-issued by the coordinator.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path

from nomoat.client import CoordinatorClient
from nomoat.v1 import nomoat_pb2 as pb
from worker import node as ray_node
from worker.cache import default_cache_dir
from worker.probe import Card, ray_labels, ray_resources

log = logging.getLogger("nomoat.worker")


def card_message(card: Card) -> pb.Card:
    return pb.Card(name=card.name, vram_gb=card.vram_gb, compute_capability=card.compute_capability,
                   bf16=card.bf16, backend=card.backend, simulated=card.simulated, tflops=card.tflops)


class WorkerAgent:
    def __init__(self, client: CoordinatorClient, card: Card, name: str = "", ray_address: str = "",
                 cache_dir: Path | None = None, threads: int = 0, node_ip: str | None = None) -> None:
        self.client = client
        self.card = card
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.ray_address = ray_address
        self.cache_dir = Path(cache_dir or default_cache_dir())
        self.threads = threads
        self.node_ip = node_ip
        self.node: ray_node.RayNode | None = None
        self.worker_id = ""
        self._stop = threading.Event()

    def start(self) -> None:
        self.client.wait_ready()
        reply = self.client.register(self.name, card_message(self.card))
        self.worker_id = reply.worker_id
        address = self.ray_address or reply.ray_address
        env = {
            "NOMOAT_WORKER_ID": self.worker_id,
            "NOMOAT_CACHE_DIR": str(self.cache_dir),
            "NOMOAT_TORCH_THREADS": str(self.threads),
        }
        if self.card.simulated:
            env["CUDA_VISIBLE_DEVICES"] = ""  # a simulated card trains on the CPU
        log_path = self.cache_dir / "logs" / f"ray-node-{self.worker_id}.log"
        self.node = ray_node.worker_node(address, reply.ray_auth_token, ray_resources(self.card),
                                         ray_labels(self.card), log_path, env=env, node_ip=self.node_ip)
        self.node.start()

    def run(self) -> None:
        """Block until Ctrl-C / SIGTERM or until the node dies."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        while not self._stop.wait(1.0):
            if not self.node.alive():
                raise RuntimeError(f"the Ray node stopped unexpectedly; see {self.node.log_path}")

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
