"""Load: many simulated outbound-only workers against one real coordinator over loopback.

A real coordinator process (embedded Redis, Ray head, the tiny model, its real gRPC server and
scheduler) and, in this process, ``--workers`` lightweight volunteers as asyncio gRPC clients,
each on its own channel (its own TCP connection, as a volunteer's would be). Each one registers,
long-polls for work, claims each unit with a heartbeat, "trains" for a simulated second (a
sleep, plus a heartbeat midway), uploads a tiny valid adapter (rank 1 on q_proj, zeros: it
passes the upload checks) and reports the run. Nothing is folded during the run
(fold_every is set out of reach: the folder's held-out evaluations would take the two cores the
benchmark measures), speculation is off (a twin is a second lease by design), and runs are one
unit each (target_task_seconds = the simulated unit time).

Reported: leases per second (units handed out, from the workers' side, and fences issued, from
the ledger), p50/p99 of the Heartbeat call and of RequestWork calls that did not wait, and the
time from a worker being free to holding a run. The baseline is the same loop with one worker,
measured first in the same run; ratios are against it. Checked against the ledger afterwards:
no (task, fence) handed to two workers, no task with two accepted adapters, every accepted
upload a done task whose adapter is in the fold buffer, every task pending, leased or done.

    python bench/load.py                 # 1,000 workers, ~3-5 minutes on 2 cores
    python bench/load.py --workers 200 --seconds 30

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nomoat.client import KEEPALIVE, CoordinatorClient  # noqa: E402
from nomoat.spec import TaskSpec, UnitResult  # noqa: E402
from nomoat.v1 import nomoat_pb2 as pb  # noqa: E402
from nomoat.v1 import nomoat_pb2_grpc as rpc  # noqa: E402

CARD = pb.Card(name="RTX 3060", vram_gb=12.0, backend="cuda", tflops=13.0, simulated=True)
WORK_S = 1.0  # simulated training time per unit


# -- the coordinator, as a process of its own ---------------------------------------------------


def serve(data_dir: Path, listen: str) -> None:
    """``python bench/load.py --serve``: a real coordinator with the benchmark's settings."""
    import signal
    import threading

    from coordinator.server import Coordinator
    from coordinator.settings import JobDefaults, Settings

    settings = Settings(data_dir=data_dir, listen=listen, fold_every=10**9, fold_timeout_s=1e9, speculate=False,
                        max_in_flight=1_000_000, max_workers_per_token=1_000_000, target_task_seconds=WORK_S,
                        lease_ttl_s=60.0, pending_window=2000,
                        job=JobDefaults(lora_rank=1, lora_alpha=2.0, target_modules=("q_proj",), seq_len=32,
                                        tokens_per_task=64))
    node = Coordinator(settings)
    node.start()
    print("coordinator ready", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    node.stop()


def start_coordinator(data_dir: Path, listen: str) -> "subprocess.Popen":
    import subprocess

    log = open(data_dir.parent / "coordinator.log", "wb")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", "--data-dir", str(data_dir),
                             "--listen", listen], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    end = time.monotonic() + 300
    while b"coordinator ready" not in (data_dir.parent / "coordinator.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit("the coordinator did not start; see " + str(data_dir.parent / "coordinator.log"))
        time.sleep(0.5)
    return proc


# -- the simulated volunteers -------------------------------------------------------------------


def tiny_adapter() -> bytes:
    """A valid adapter for the benchmark's job: rank 1 on every q_proj, all zeros (ΔW = 0)."""
    import torch
    from transformers import AutoConfig

    from nomoat import adapter as adapter_format
    from nomoat.tiny import tiny_model_path

    config = AutoConfig.from_pretrained(tiny_model_path())
    d = config.hidden_size
    factors = {f"model.layers.{i}.self_attn.q_proj": (torch.zeros(1, d), torch.zeros(d, 1))
               for i in range(config.num_hidden_layers)}
    return adapter_format.to_bytes(adapter_format.Adapter(factors, rank=1, alpha=2.0))


@dataclass
class Tally:
    heartbeat_s: list[float] = field(default_factory=list)
    poll_s: list[float] = field(default_factory=list)  # RequestWork calls answered without a wait
    to_lease_s: list[float] = field(default_factory=list)  # free -> holding a run
    handed: dict[tuple[str, int], set[str]] = field(default_factory=lambda: defaultdict(set))
    accepted: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    units: int = 0
    refused: int = 0
    errors: int = 0
    registered: int = 0
    register_s: float = 0.0
    exhausted: int = 0  # RESOURCE_EXHAUSTED: the server's concurrent-call limit


async def volunteer(i: int, address: str, token: str, data: bytes, tally: Tally, stop: asyncio.Event,
                    go: asyncio.Event, wait_s: float) -> None:
    import hashlib

    meta = (("authorization", f"Bearer {token}"),)
    sha = hashlib.sha256(data).hexdigest()
    async with grpc.aio.insecure_channel(address, options=KEEPALIVE) as channel:
        stub = rpc.WorkersStub(channel)
        for attempt in range(20):
            try:
                reg = await stub.Register(pb.RegisterRequest(name=f"sim-{i}", card=CARD), metadata=meta, timeout=120)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(random.uniform(0.5, 2.0) * (attempt + 1))
        else:
            tally.errors += 1
            return
        tally.registered += 1
        await go.wait()
        # Volunteers do not all ask in the same millisecond: the first poll is spread over a few
        # seconds (a thousand at once would only measure the server's queue limit).
        await asyncio.sleep(random.uniform(0, 5))
        worker_id = reg.worker_id
        free_since = time.monotonic()
        while not stop.is_set():
            try:
                started = time.monotonic()
                reply = await stub.RequestWork(pb.WorkRequest(worker_id=worker_id, wait_s=wait_s), metadata=meta,
                                               timeout=wait_s + 30)
                took = time.monotonic() - started
                if not reply.run_id:
                    if reply.poll_again_s > 0:
                        tally.poll_s.append(took)
                        await asyncio.sleep(reply.poll_again_s)
                    continue
                if took < 0.5:
                    tally.poll_s.append(took)
                tally.to_lease_s.append(time.monotonic() - free_since)
                results = []
                for raw in reply.task_specs:
                    spec = TaskSpec.from_dict(json.loads(raw))
                    tally.handed[(spec.task_id, spec.fence)].add(worker_id)
                    results.append(await unit(stub, meta, worker_id, spec, reg.lineage, data, sha, tally))
                await stub.ReportRun(pb.RunReport(worker_id=worker_id, run_id=reply.run_id,
                                                  units=[json.dumps(u.to_dict()) for u in results]),
                                     metadata=meta, timeout=60)
                free_since = time.monotonic()
            except grpc.aio.AioRpcError as exc:
                tally.errors += 1
                tally.exhausted += exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                if tally.errors < 5:
                    print(f"worker {i}: {exc.code().name} {exc.details()}", file=sys.stderr)
                await asyncio.sleep(random.uniform(0.5, 2.0))


async def unit(stub, meta, worker_id: str, spec: TaskSpec, lineage: str, data: bytes, sha: str,
               tally: Tally) -> UnitResult:
    async def beat() -> pb.HeartbeatReply:
        started = time.monotonic()
        reply = await stub.Heartbeat(pb.HeartbeatRequest(task_id=spec.task_id, fence=spec.fence,
                                                         worker_id=worker_id), metadata=meta, timeout=30)
        tally.heartbeat_s.append(time.monotonic() - started)
        return reply

    first = await beat()
    if not first.ok:
        return UnitResult(spec.task_id, spec.fence, f"the lease was lost: {first.reason}")
    await asyncio.sleep(WORK_S / 2)
    await beat()
    await asyncio.sleep(WORK_S / 2)
    manifest = pb.AdapterManifest(task_id=spec.task_id, fence=spec.fence, base_version=first.base_version, rank=1,
                                  alpha=2.0, tokens=spec.tokens, train_loss=2.0, sha256=sha, size=len(data),
                                  worker_id=worker_id, lineage=first.lineage or lineage)
    sent = await stub.Upload(iter([pb.UploadChunk(manifest=manifest), pb.UploadChunk(data=data)]), metadata=meta,
                             timeout=60)
    tally.units += 1
    if not sent.accepted:
        tally.refused += 1
        return UnitResult(spec.task_id, spec.fence, f"refused: {sent.reason}")
    tally.accepted[spec.task_id].append(sent.adapter_id)
    return UnitResult(spec.task_id, spec.fence, adapter_id=sent.adapter_id, tokens=spec.tokens, seconds=WORK_S)


async def phase(address: str, token: str, data: bytes, workers: int, seconds: float, wait_s: float,
                tally: Tally, first: int = 0) -> float:
    """Run ``workers`` volunteers: all register, then ``seconds`` of work; returns the seconds measured."""
    stop, go = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(volunteer(first + i, address, token, data, tally, stop, go, wait_s))
             for i in range(workers)]
    started = time.monotonic()
    while tally.registered + tally.errors < workers:
        await asyncio.sleep(0.5)
        if time.monotonic() - started > 600:
            break
    tally.register_s = time.monotonic() - started
    print(f"  {tally.registered} workers registered in {tally.register_s:.1f} s", file=sys.stderr)
    go.set()
    began = time.monotonic()
    await asyncio.sleep(seconds)
    stop.set()
    measured = time.monotonic() - began
    await asyncio.wait(tasks, timeout=wait_s + 60)
    for task in tasks:
        task.cancel()
    return measured


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def figures(tally: Tally, seconds: float) -> dict[str, float]:
    return {
        "leases_per_s": round(len(tally.handed) / seconds, 2),
        "units_uploaded": tally.units,
        "heartbeat_p50_ms": round(pct(tally.heartbeat_s, 0.5) * 1000, 2),
        "heartbeat_p99_ms": round(pct(tally.heartbeat_s, 0.99) * 1000, 2),
        "poll_p50_ms": round(pct(tally.poll_s, 0.5) * 1000, 2),
        "poll_p99_ms": round(pct(tally.poll_s, 0.99) * 1000, 2),
        "to_lease_p50_s": round(pct(tally.to_lease_s, 0.5), 3),
        "to_lease_p99_s": round(pct(tally.to_lease_s, 0.99), 3),
        "rpc_errors": tally.errors,
        "rpc_resource_exhausted": tally.exhausted,
        "register_s": round(tally.register_s, 1),
    }


def check_ledger(data_dir: Path, tallies: list[Tally]) -> dict[str, int]:
    """What the ledger says against what the workers saw."""
    from coordinator.ledger import keys
    from coordinator.ledger import Ledger, TaskState
    from coordinator.ledger.redis_server import EmbeddedRedis
    from coordinator.server import redis_client

    ledger = Ledger(redis_client(EmbeddedRedis(data_dir / "redis").url))
    handed: dict[tuple[str, int], set[str]] = defaultdict(set)
    accepted: dict[str, list[str]] = defaultdict(list)
    for t in tallies:
        for k, v in t.handed.items():
            handed[k] |= v
        for k, v in t.accepted.items():
            accepted[k] += v
    double_leased = sum(1 for holders in handed.values() if len(holders) > 1)
    double_accepted = sum(1 for ids in accepted.values() if len(ids) > 1)
    buffered = {a.adapter_id for a in ledger.adapters.buffered()}
    lost = 0
    for task_id, ids in accepted.items():
        task = ledger.tasks.get(task_id)
        if task is None or task.state is not TaskState.DONE or task.adapter != ids[0] or ids[0] not in buffered:
            lost += 1
    states = defaultdict(int)
    for job_id in ledger.jobs.ids():
        for task in ledger.tasks.of_job(job_id):
            states[task.state.value] += 1
    done_in_ledger = states["done"]
    fences = int(ledger.r.get(keys.FENCE) or 0)
    return {"double_leased": double_leased, "double_accepted": double_accepted, "lost": lost,
            "accepted_seen": len(accepted), "done_in_ledger": done_in_ledger, "buffered": len(buffered),
            "fences_issued": fences, "failed_tasks": states["failed"], "tasks": sum(states.values())}


def dataset(path: Path, records: int) -> None:
    from nomoat.tiny import read_fortunes

    fortunes = read_fortunes()
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(records):
            fh.write(json.dumps({"text": fortunes[i % len(fortunes)][:200]}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0, help="load phase length")
    parser.add_argument("--baseline-seconds", type=float, default=15.0)
    parser.add_argument("--wait", type=float, default=20.0, help="each long-poll's wait_s")
    parser.add_argument("--records", type=int, default=6000, help="dataset records (~1 task per 2)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--listen", default="127.0.0.1:0", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.data_dir), args.listen)
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    tmp = Path(tempfile.mkdtemp(prefix="nomoat-load-"))
    data_dir = tmp / "coordinator"
    print(f"starting the coordinator in {data_dir} ...", file=sys.stderr)
    proc = start_coordinator(data_dir, address)
    try:
        admin = (data_dir / "admin.token").read_text().strip()
        token = (data_dir / "worker.token").read_text().strip()
        path = tmp / "load.jsonl"
        dataset(path, args.records)
        with CoordinatorClient(address, admin) as client:
            reply = client.submit(path, name="load", config=pb.JobConfig(tokens_per_task=64))
        print(f"job {reply.job_id}: {reply.tasks} tasks", file=sys.stderr)
        data = tiny_adapter()
        print(f"baseline: 1 worker for {args.baseline_seconds:.0f} s ...", file=sys.stderr)
        base = Tally()
        base_s = asyncio.run(phase(address, token, data, 1, args.baseline_seconds, args.wait, base))
        print(f"load: {args.workers} workers for {args.seconds:.0f} s ...", file=sys.stderr)
        load = Tally()
        load_s = asyncio.run(phase(address, token, data, args.workers, args.seconds, args.wait, load, first=1))
        time.sleep(3)  # the last reports reach the scheduler
        ledger = check_ledger(data_dir, [base, load])
    finally:
        proc.send_signal(2)
        try:
            proc.wait(90)
        except Exception:  # noqa: BLE001
            proc.kill()
    b, lf = figures(base, base_s), figures(load, load_s)
    result = {
        "workers": args.workers, "registered": load.registered, "seconds": round(load_s, 1),
        "tasks": reply.tasks, **lf,
        "baseline": b,
        "heartbeat_p50_ratio": round(lf["heartbeat_p50_ms"] / b["heartbeat_p50_ms"], 2),
        "leases_per_s_ratio": round(lf["leases_per_s"] / max(b["leases_per_s"], 1e-9), 1),
        "ledger": ledger,
        "ok": ledger["double_leased"] == 0 and ledger["double_accepted"] == 0 and ledger["lost"] == 0,
    }
    print(f"{lf['leases_per_s']} leases/s with {args.workers} workers ({result['leases_per_s_ratio']}x one "
          f"worker's); heartbeat p50 {lf['heartbeat_p50_ms']} ms, p99 {lf['heartbeat_p99_ms']} ms; "
          f"nothing lost or double-leased: {result['ok']}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
