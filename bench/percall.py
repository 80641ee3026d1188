"""Benchmark: the gateway's CPU cost per call, by kind of call, against a trivial call on the same server.

The coordinator's own gRPC server (``coordinator.server.grpc_server``: lanes, token interceptor,
servicers, the real domain code) runs in a child process on an embedded redis-server, as in
bench/gateway.py. The bench process (an asyncio gRPC client, ``--concurrency`` calls in flight
on ``--channels`` connections) makes ``--calls`` calls of each kind, in the order a volunteer
makes them, and reads the child's CPU seconds (user + system, every thread of it) and the
redis-server's before and after each kind:

* ``Check``: the standard health check on the same server (no token, no domain, no Redis): the
  floor a grpc.aio call costs in this process; every other kind is reported as a ratio to it.
* ``Register``: a new worker (the shared worker token).
* ``RequestWork``: a poll that finds nothing (``wait_s`` 0), and ``RequestWork+run``: one that
  finds a run placed in the worker's inbox.
* ``Heartbeat``: a run's renewal (worker id and lease secret, as a volunteer sends it).
* ``Upload``: a tiny valid adapter (rank 1 on q_proj, zeros) under its lease, accepted.
* ``ReportRun``: the run's report (its one unit, with its lease secret).

Printed per kind: gateway CPU ms per call, its ratio to ``Check``, Redis CPU ms per call, Redis
commands per call (round trips are at most this), and calls/s at the given concurrency.

    python bench/percall.py [--calls 2000] [--concurrency 32] [--channels 16]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import redis  # noqa: E402

from bench import gateway_child  # noqa: E402
from coordinator.settings import JobDefaults  # noqa: E402

GATEWAY_ROLES = ("worker", "submitter")
GATEWAY_SETTINGS = dict(long_poll_s=60.0, max_streams_per_caller=100_000, max_workers_per_token=1_000_000,
                        max_upload_streams=1024, lease_ttl_s=600.0,
                        job=JobDefaults(lora_rank=1, lora_alpha=2.0, target_modules=("q_proj",), seq_len=32,
                                        tokens_per_task=64))


@dataclass
class Unit:
    """A unit leased to a worker, as its run's spec gives it."""

    task_id: str
    fence: int
    lease_secret: str
    tokens: int = 64
    adapter_id: str = ""


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_calls(make, n: int, concurrency: int) -> float:
    """``make(i)`` (a coroutine) for i in 0..n-1, ``concurrency`` at a time; the wall seconds."""
    queue = iter(range(n))

    async def lane() -> None:
        for i in queue:
            await make(i)

    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - began


async def measure(args, info, tmp: Path) -> dict:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from coordinator.ledger import Ledger
    from nomoat.client import CoordinatorClient
    from nomoat.spec import UnitResult
    from nomoat.v1 import nomoat_pb2 as pb
    from nomoat.v1 import nomoat_pb2_grpc as rpc

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from load import tiny_adapter  # the same adapter bench/load.py's volunteers upload

    n = args.calls
    r = redis.Redis.from_url(info["redis"])
    ledger = Ledger(r)
    meta = (("authorization", f"Bearer {info['tokens']['worker']}"),)
    path = tmp / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i}: a few words to train on, then some more"}) + "\n"
                            for i in range(8 * n)))
    with CoordinatorClient(info["address"], token=info["tokens"]["submitter"]) as submitter:
        job_id = submitter.submit(path, name="percall", config=pb.JobConfig(tokens_per_task=64)).job_id
    task_ids = ledger.tasks.ids(job_id)[:n]
    assert len(task_ids) == n, f"the job has {len(task_ids)} tasks, fewer than --calls {n}"
    # Each upload its own bytes (the coordinator refuses a copy of another task's adapter), made
    # before the clock starts.
    blobs = [tiny_adapter(s) for s in range(n)]
    shas = [hashlib.sha256(b).hexdigest() for b in blobs]
    channels = [grpc.aio.insecure_channel(info["address"]) for _ in range(args.channels)]
    workers = [rpc.WorkersStub(c) for c in channels]
    healths = [health_pb2_grpc.HealthStub(c) for c in channels]
    card = pb.Card(name="RTX 3060", vram_gb=12.0, backend="cuda", tflops=13.0, simulated=True)
    ids: list[str] = [""] * n
    specs: list[Unit] = []
    runs: list[str] = []
    lineage = ""

    async def check(i: int) -> None:
        await healths[i % len(healths)].Check(health_pb2.HealthCheckRequest(), timeout=60)

    async def register(i: int) -> None:
        nonlocal lineage
        reply = await workers[i % len(workers)].Register(pb.RegisterRequest(name=f"w{i}", card=card), metadata=meta,
                                                         timeout=60)
        ids[i] = reply.worker_id
        lineage = reply.lineage

    async def poll(i: int) -> None:
        reply = await workers[i % len(workers)].RequestWork(pb.WorkRequest(worker_id=ids[i], wait_s=0),
                                                            metadata=meta, timeout=60)
        assert not reply.run_id

    def place() -> None:
        """One run of one unit in each worker's inbox, leased as the scheduler leases it."""
        from coordinator.ledger.leases import new_secret, secret_hash

        deadline = time.time() + 3600
        for i, (task_id, worker_id) in enumerate(zip(task_ids, ids)):
            secret = new_secret()
            fence = ledger.leases.lease(task_id, deadline, 0, 3, worker_id=worker_id, secret=secret)
            spec = Unit(task_id, fence, secret)
            specs.append(spec)
            runs.append(f"run-{i}")
            ledger.inbox.place(f"run-{i}", worker_id, [(task_id, fence)],
                               [json.dumps({"task_id": task_id, "fence": fence, "lease_secret": secret})],
                               {task_id: secret_hash(secret)})

    async def take(i: int) -> None:
        reply = await workers[i % len(workers)].RequestWork(pb.WorkRequest(worker_id=ids[i], wait_s=0),
                                                            metadata=meta, timeout=60)
        assert reply.run_id == runs[i], reply

    async def beat(i: int) -> None:
        s = specs[i % n]
        reply = await workers[i % len(workers)].Heartbeat(
            pb.HeartbeatRequest(task_id=s.task_id, fence=s.fence, worker_id=ids[i % n], lease_secret=s.lease_secret),
            metadata=meta, timeout=60)
        assert reply.ok, reply.reason

    async def upload(i: int) -> None:
        s = specs[i]
        manifest = pb.AdapterManifest(task_id=s.task_id, fence=s.fence, base_version=0, rank=1, alpha=2.0,
                                      tokens=s.tokens, train_loss=2.0, sha256=shas[i], size=len(blobs[i]),
                                      worker_id=ids[i], lineage=lineage, lease_secret=s.lease_secret)
        reply = await workers[i % len(workers)].Upload(iter([pb.UploadChunk(manifest=manifest),
                                                             pb.UploadChunk(data=blobs[i])]), metadata=meta, timeout=60)
        assert reply.accepted, reply.reason
        s.adapter_id = reply.adapter_id  # (for the report)

    async def report(i: int) -> None:
        s = specs[i]
        unit = UnitResult(s.task_id, s.fence, adapter_id=s.adapter_id, tokens=s.tokens, seconds=1.0)
        await workers[i % len(workers)].ReportRun(pb.RunReport(worker_id=ids[i], run_id=runs[i],
                                                               units=[json.dumps(unit.to_dict())],
                                                               lease_secrets={s.task_id: s.lease_secret}),
                                                  metadata=meta, timeout=60)

    def commands() -> int:
        return int(r.info("stats")["total_commands_processed"])

    figures: dict[str, dict] = {}

    async def kind(name: str, make, count: int = n) -> None:
        gw, rd, cmd = cpu_s(info["pid"]), cpu_s(info["redis_pid"]), commands()
        wall = await run_calls(make, count, args.concurrency)
        gw, rd, cmd = cpu_s(info["pid"]) - gw, cpu_s(info["redis_pid"]) - rd, commands() - cmd - 1
        figures[name] = {"gateway_cpu_ms": round(gw / count * 1000, 3), "redis_cpu_ms": round(rd / count * 1000, 3),
                         "redis_commands": round(cmd / count, 2), "calls_per_s": round(count / wall, 1)}
        print(f"  {name:16s} {figures[name]}", file=sys.stderr)

    await run_calls(check, 200, args.concurrency)  # warm: connections up, code paths imported
    await kind("Check", check)
    await kind("Register", register)
    await kind("RequestWork", poll)
    place()
    await kind("RequestWork+run", take)
    await kind("Heartbeat", beat, 2 * n)  # a run beats more than once
    await kind("Upload", upload)
    await kind("ReportRun", report)
    for c in channels:
        await c.close()
    floor = figures["Check"]["gateway_cpu_ms"] or 1e-3
    for f in figures.values():
        f["ratio_to_check"] = round(f["gateway_cpu_ms"] / floor, 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls of each kind")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight at once")
    parser.add_argument("--channels", type=int, default=16, help="client connections")
    args = parser.parse_args()

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    with tempfile.TemporaryDirectory(prefix="nomoat-bench-percall-") as tmp:
        proc = ctx.Process(target=gateway_child.serve, args=(tmp, child, GATEWAY_ROLES, GATEWAY_SETTINGS),
                           daemon=True)
        proc.start()
        info = parent.recv()
        print(f"gateway pid {info['pid']} at {info['address']}", file=sys.stderr)
        try:
            figures = asyncio.run(measure(args, info, Path(tmp)))
        finally:
            parent.send("stop")
            proc.join(timeout=30)
    # What a volunteer's unit costs the gateway: a poll that finds a run, two heartbeats, an upload, a report.
    unit = ["RequestWork+run", "Heartbeat", "Heartbeat", "Upload", "ReportRun"]
    per_unit = sum(figures[k]["gateway_cpu_ms"] for k in unit)
    result = {"calls": args.calls, "concurrency": args.concurrency, "kinds": figures,
              "gateway_cpu_ms_per_unit": round(per_unit, 2),
              "heartbeat_cpu_ms": figures["Heartbeat"]["gateway_cpu_ms"],
              "heartbeat_ratio_to_check": figures["Heartbeat"]["ratio_to_check"],
              "heartbeats_per_core_s": round(1000 / max(figures["Heartbeat"]["gateway_cpu_ms"], 1e-3))}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
