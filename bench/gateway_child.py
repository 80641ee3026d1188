"""The real gateway in a child process, for the gateway benchmarks (bench/gateway.py, bench/percall.py).

``serve`` runs the coordinator's own gRPC server (``coordinator.server.grpc_server``: lanes,
token interceptor, servicers, the domain code) over a fresh ledger on an embedded redis-server,
with version 0 of the tiny model published, and answers its parent on a pipe: first what a
client needs (address, tokens, the Redis URL, the gateway's and redis-server's pids), then
``"threads"`` (the gateway's thread count) until ``"stop"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import redis


def serve(data_dir: str, conn, roles: tuple[str, ...], settings_changes: dict[str, Any]) -> None:
    """The child: the gateway, with tokens of ``roles`` and Settings(``settings_changes``), until told to stop."""
    from grpc_health.v1 import health_pb2

    from coordinator.gateway import servicers
    from coordinator.gateway.auth import TokenRegistry
    from coordinator.ledger import Ledger, VersionRecord
    from coordinator.ledger.redis_server import EmbeddedRedis
    from coordinator.model.history import History
    from coordinator.model.running import RunningModel
    from coordinator.model.store import BlobStore
    from coordinator.server import bind, grpc_server
    from coordinator.settings import Settings
    from nomoat.tiny import tiny_model_path

    data = Path(data_dir)
    embedded = EmbeddedRedis(data / "redis")
    url = embedded.start()
    try:
        ledger = Ledger(redis.Redis.from_url(url))
        store = BlobStore(data / "blobs")
        model = RunningModel(tiny_model_path())
        ledger.versions.publish(VersionRecord(version=0, parent=-1, files=model.publish(store)))
        registry = TokenRegistry(ledger.tokens)
        tokens = {role: registry.create(role) for role in roles}
        settings = Settings(data_dir=data, **settings_changes)
        shapes = {n: (m.out_features, m.in_features) for n, m in model.model.named_modules()
                  if m.__class__.__name__ == "Linear"}
        deps = servicers.Deps(settings, ledger, store, registry, model.tokenizer, shapes, "", "",
                              history=History(ledger, store, data))
        server, health = grpc_server(deps)
        port = bind(server, "127.0.0.1:0")
        server.start()
        health.set("", health_pb2.HealthCheckResponse.SERVING)
        conn.send({"address": f"127.0.0.1:{port}", "tokens": tokens, "redis": url, "pid": os.getpid(),
                   "redis_pid": embedded.proc.pid if embedded.proc else 0})
        while (ask := conn.recv()) != "stop":
            if ask == "threads":
                conn.send(int(Path("/proc/self/status").read_text().split("Threads:")[1].split()[0]))
        server.stop(1)
    finally:
        embedded.stop()
