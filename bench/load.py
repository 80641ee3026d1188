"""Load: many simulated outbound-only volunteers against real coordinator processes over loopback.

Real coordinator processes (a Redis, a Ray head, the tiny model, their real gRPC servers,
scheduler and folder) and ``--volunteers`` lightweight volunteers as asyncio gRPC clients,
spread over load-generator processes of their own (``--procs``; multiprocessing), each
volunteer on its own channel (its own TCP connection, as a volunteer's would be). Each one
registers, long-polls for work, claims each unit with a heartbeat, "trains" for a simulated
second (a sleep, plus a heartbeat midway), uploads a tiny valid adapter (rank 1 on q_proj, zeros:
it passes the upload checks) and reports the run. Nothing is folded during the run (fold_every is
set out of reach: the folder's held-out evaluations would take the cores the benchmark
measures), speculation is off (a twin is a second lease by design), and runs are one unit each
(target_task_seconds = the simulated unit time).

``--layout all``: one ``--role all`` coordinator (today's single process). ``--layout split``:
two gateways, a scheduler and a folder (``--role gateway|scheduler|folder``) on one Redis and one
data dir, the volunteers spread over the two gateways (it needs a checkout with the roles).

Reported: leases per second (units handed out, from the volunteers' side), p50/p99 of the
Heartbeat call, the time from a volunteer being free to holding a run (work is queued the whole
time), calls refused for capacity (RESOURCE_EXHAUSTED, as the volunteers saw them, by kind of
call; an Upload refused with a time to retry is waited out as the worker's uploader does, and
counted apart as ``upload_waits``), and the
gateways' CPU seconds per 1,000 calls the volunteers made (in layout all the one process also
schedules: an upper bound). The baseline is the same loop with one volunteer, measured first in
the same run; ratios are against it. Checked against the ledger afterwards: no (task, fence)
handed to two volunteers (double_leased), no task with two accepted adapters (double_accepted),
every accepted upload a done task whose adapter is in the fold buffer (else lost).

    python bench/load.py                                  # 1,000 volunteers, ~3-5 minutes on 2 cores
    python bench/load.py --volunteers 200 --seconds 30
    python bench/load.py --volunteers 10000 --layout split --procs 8

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
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
SPLIT = ("gateway", "gateway", "scheduler", "folder")  # the processes of --layout split, started in this order


def more_files() -> None:
    """A connection per volunteer: raise this process's open-file limit to its hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the coordinator processes ------------------------------------------------------------------


def serve(data_dir: Path, listen: str, role: str, redis_url: str | None) -> None:
    """``python bench/load.py --serve``: a real coordinator with the benchmark's settings."""
    import dataclasses
    import signal
    import threading

    from coordinator.server import Coordinator
    from coordinator.settings import JobDefaults, Settings

    more_files()
    settings = Settings(data_dir=data_dir, listen=listen, fold_every=10**9, fold_timeout_s=1e9, speculate=False,
                        max_in_flight=1_000_000, max_workers_per_token=1_000_000, target_task_seconds=WORK_S,
                        # One shared worker token stands for every simulated volunteer (each would
                        # have its own identity and share): no per-caller stream share here.
                        max_streams_per_caller=1_000_000, stream_share_per_caller=1e6,
                        # Outbound volunteers only: no Ray head (its start-up alone times out on a
                        # starved machine, and it would take the cores the benchmark measures).
                        ray_address="off",
                        lease_ttl_s=60.0, pending_window=2000, redis_url=redis_url,
                        job=JobDefaults(lora_rank=1, lora_alpha=2.0, target_modules=("q_proj",), seq_len=32,
                                        tokens_per_task=64))
    if role != "all":
        settings = dataclasses.replace(settings, role=role)
    node = Coordinator(settings)
    node.start()
    print("coordinator ready", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    node.stop()


@dataclass
class Coordinators:
    """The coordinator processes of a layout: their Popen handles and roles, the gateways' addresses."""

    procs: list = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)
    redis_url: str = ""
    redis: object = None  # the EmbeddedRedis the split layout shares

    def gateway_pids(self) -> list[int]:
        return [p.pid for p, role in zip(self.procs, self.roles) if role in ("all", "gateway")]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.send_signal(2)
        for proc in reversed(self.procs):
            try:
                proc.wait(90)
            except Exception:  # noqa: BLE001
                proc.kill()
        if self.redis is not None:
            self.redis.stop()


def free_address() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def start_one(data_dir: Path, listen: str, role: str, redis_url: str, log_path: Path):
    import subprocess

    log = open(log_path, "wb")
    args = [sys.executable, str(Path(__file__).resolve()), "--serve", "--data-dir", str(data_dir), "--listen", listen,
            "--role", role] + (["--redis-url", redis_url] if redis_url else [])
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    end = time.monotonic() + 300
    while b"coordinator ready" not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"the coordinator ({role}) did not start; see {log_path}")
        time.sleep(0.5)
    return proc


def start_layout(layout: str, tmp: Path) -> Coordinators:
    """``all``: one process on its embedded Redis. ``split``: a Redis of its own, then two
    gateways, a scheduler and a folder on it and on one data dir."""
    data_dir = tmp / "coordinator"
    found = Coordinators()
    if layout == "all":
        address = free_address()
        found.procs.append(start_one(data_dir, address, "all", "", tmp / "coordinator.log"))
        found.roles.append("all")
        found.gateways.append(address)
        from coordinator.ledger.redis_server import EmbeddedRedis

        found.redis_url = EmbeddedRedis(data_dir / "redis").url
        return found
    from coordinator.ledger.redis_server import EmbeddedRedis

    found.redis = EmbeddedRedis(tmp / "redis")
    found.redis_url = found.redis.start()
    for i, role in enumerate(SPLIT):
        address = free_address()
        found.procs.append(start_one(data_dir, address, role, found.redis_url, tmp / f"coordinator-{i}-{role}.log"))
        found.roles.append(role)
        if role == "gateway":
            found.gateways.append(address)
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU seconds the processes ``pids`` have used (their own threads, not children)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15)
    return total


# -- the simulated volunteers -------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _tiny_shape() -> tuple[int, int]:
    """The tiny model's hidden size and layer count."""
    from transformers import AutoConfig

    from nomoat.tiny import tiny_model_path

    config = AutoConfig.from_pretrained(tiny_model_path())
    return config.hidden_size, config.num_hidden_layers


def tiny_adapter(tag: int = 0) -> bytes:
    """A valid adapter for the benchmark's job: rank 1 on every q_proj, B all zeros (ΔW = 0).
    ``tag`` goes into one entry of A (which B zeroes out), so adapters of different tags are
    different bytes: the coordinator refuses a byte-for-byte copy of another task's adapter."""
    import torch

    from nomoat import adapter as adapter_format

    d, layers = _tiny_shape()
    factors = {f"model.layers.{i}.self_attn.q_proj": (torch.zeros(1, d), torch.zeros(d, 1)) for i in range(layers)}
    factors["model.layers.0.self_attn.q_proj"][0][0, 0] = float(tag)
    return adapter_format.to_bytes(adapter_format.Adapter(factors, rank=1, alpha=2.0))


@dataclass
class Tally:
    heartbeat_s: list[float] = field(default_factory=list)
    poll_s: list[float] = field(default_factory=list)  # RequestWork calls answered without a wait
    to_lease_s: list[float] = field(default_factory=list)  # free -> holding a run
    handed: dict = field(default_factory=dict)  # (task id, fence) -> the volunteers given it
    accepted: dict = field(default_factory=dict)  # task id -> adapter ids accepted for it
    units: int = 0
    refused: int = 0
    errors: int = 0
    registered: int = 0
    calls: int = 0  # RPCs made in the load phase (those that answered and those that failed)
    exhausted: int = 0  # RESOURCE_EXHAUSTED: refused for capacity, all kinds
    exhausted_by_kind: dict = field(default_factory=dict)  # call kind -> RESOURCE_EXHAUSTED answers
    upload_waits: int = 0  # Uploads refused with a time to retry, waited out and sent again (as worker.uploader does)
    errors_by_kind: dict = field(default_factory=dict)  # "Kind CODE" -> errors seen in the load loop

    def refused_for_capacity(self, kind: str) -> None:
        self.exhausted += 1
        self.exhausted_by_kind[kind] = self.exhausted_by_kind.get(kind, 0) + 1

    def hand(self, task_id: str, fence: int, worker_id: str) -> None:
        self.handed.setdefault(f"{task_id}/{fence}", []).append(worker_id)

    def merge(self, other: dict) -> None:
        for name in ("heartbeat_s", "poll_s", "to_lease_s"):
            getattr(self, name).extend(other[name])
        for key, holders in other["handed"].items():
            self.handed.setdefault(key, []).extend(holders)
        for key, ids in other["accepted"].items():
            self.accepted.setdefault(key, []).extend(ids)
        for name in ("units", "refused", "errors", "registered", "calls", "exhausted", "upload_waits"):
            setattr(self, name, getattr(self, name) + other[name])
        for kind, n in other["exhausted_by_kind"].items():
            self.exhausted_by_kind[kind] = self.exhausted_by_kind.get(kind, 0) + n
        for kind, n in other["errors_by_kind"].items():
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + n


def kind_of(exc: grpc.aio.AioRpcError) -> str:
    """Which call an error came from (see :func:`called`)."""
    return getattr(exc, "nomoat_kind", "?")


async def called(kind: str, call):
    """Await ``call``; an error says which kind of call it came from (``kind_of``)."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        exc.nomoat_kind = kind
        raise


async def volunteer(i: int, address: str, token: str, tally: Tally, stop, go, registered, wait_s: float) -> None:
    meta = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address, options=KEEPALIVE) as channel:
        stub = rpc.WorkersStub(channel)
        for attempt in range(20):
            try:
                reg = await stub.Register(pb.RegisterRequest(name=f"sim-{i}", card=CARD), metadata=meta, timeout=120)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    tally.refused_for_capacity("Register")
                await asyncio.sleep(random.uniform(0.5, 2.0) * (attempt + 1))
        else:
            tally.errors += 1
            with registered.get_lock():
                registered.value += 1  # (counted as done trying)
            return
        tally.registered += 1
        with registered.get_lock():
            registered.value += 1
        while not go.is_set():
            await asyncio.sleep(0.2)
        # Volunteers do not all ask in the same millisecond: the first poll is spread over a few
        # seconds (ten thousand at once would only measure the server's queue limit).
        await asyncio.sleep(random.uniform(0, 5))
        worker_id = reg.worker_id
        free_since = time.monotonic()
        while not stop.is_set():
            try:
                started = time.monotonic()
                tally.calls += 1
                reply = await called("RequestWork", stub.RequestWork(pb.WorkRequest(worker_id=worker_id, wait_s=wait_s),
                                                                     metadata=meta, timeout=wait_s + 30))
                took = time.monotonic() - started
                if not reply.run_id:
                    if reply.poll_again_s > 0:
                        tally.poll_s.append(took)
                        await asyncio.sleep(reply.poll_again_s)
                    continue
                if took < 0.5:
                    tally.poll_s.append(took)
                tally.to_lease_s.append(time.monotonic() - free_since)
                results, secrets = [], {}
                for raw in reply.task_specs:
                    spec = TaskSpec.from_dict(json.loads(raw))
                    secrets[spec.task_id] = spec.lease_secret  # what proves this run holds the lease
                    tally.hand(spec.task_id, spec.fence, worker_id)
                    results.append(await unit(stub, meta, worker_id, spec, reg.lineage, tally))
                tally.calls += 1
                await called("ReportRun", stub.ReportRun(pb.RunReport(worker_id=worker_id, run_id=reply.run_id,
                                                                      units=[json.dumps(u.to_dict()) for u in results],
                                                                      lease_secrets=secrets),
                                                         metadata=meta, timeout=60))
                free_since = time.monotonic()
            except grpc.aio.AioRpcError as exc:
                tally.errors += 1
                name = f"{kind_of(exc)} {exc.code().name}"
                tally.errors_by_kind[name] = tally.errors_by_kind.get(name, 0) + 1
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    tally.refused_for_capacity(kind_of(exc))
                if tally.errors < 5:
                    print(f"volunteer {i}: {kind_of(exc)} {exc.code().name} {exc.details()}", file=sys.stderr)
                await asyncio.sleep(random.uniform(0.5, 2.0))


async def unit(stub, meta, worker_id: str, spec: TaskSpec, lineage: str, tally: Tally) -> UnitResult:
    async def beat() -> pb.HeartbeatReply:
        started = time.monotonic()
        tally.calls += 1
        reply = await called("Heartbeat", stub.Heartbeat(
            pb.HeartbeatRequest(task_id=spec.task_id, fence=spec.fence, worker_id=worker_id,
                                lease_secret=spec.lease_secret), metadata=meta, timeout=30))
        tally.heartbeat_s.append(time.monotonic() - started)
        return reply

    first = await beat()
    if not first.ok:
        return UnitResult(spec.task_id, spec.fence, f"the lease was lost: {first.reason}")
    await asyncio.sleep(WORK_S / 2)
    await beat()
    await asyncio.sleep(WORK_S / 2)
    data = tiny_adapter(spec.fence)  # each lease's own bytes (fences are unique)
    sha = hashlib.sha256(data).hexdigest()
    manifest = pb.AdapterManifest(task_id=spec.task_id, fence=spec.fence, base_version=first.base_version, rank=1,
                                  alpha=2.0, tokens=spec.tokens, train_loss=2.0, sha256=sha, size=len(data),
                                  worker_id=worker_id, lineage=first.lineage or lineage,
                                  lease_secret=spec.lease_secret)
    sent = await upload(stub, meta, manifest, data, tally)
    tally.units += 1
    if not sent.accepted:
        tally.refused += 1
        return UnitResult(spec.task_id, spec.fence, f"refused: {sent.reason}")
    tally.accepted.setdefault(spec.task_id, []).append(sent.adapter_id)
    return UnitResult(spec.task_id, spec.fence, adapter_id=sent.adapter_id, tokens=spec.tokens, seconds=WORK_S)


async def upload(stub, meta, manifest: pb.AdapterManifest, data: bytes, tally: Tally,
                 patience_s: float = 120.0) -> pb.UploadReply:
    """Send the adapter as worker.uploader does: a refusal for capacity that names a time to come
    back (the gateway's bounded upload queue was full) is waited out, jittered, and sent again."""
    from nomoat.client import retry_after

    end = time.monotonic() + patience_s
    while True:
        tally.calls += 1
        try:
            return await called("Upload", stub.Upload(iter([pb.UploadChunk(manifest=manifest),
                                                            pb.UploadChunk(data=data)]), metadata=meta, timeout=60))
        except grpc.aio.AioRpcError as exc:
            wait = retry_after(exc) * random.uniform(0.5, 1.5)
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or wait <= 0 or time.monotonic() + wait > end:
                raise
            tally.refused_for_capacity("Upload")
            tally.upload_waits += 1
            await asyncio.sleep(wait)


def generator(first: int, count: int, addresses: list[str], token: str, wait_s: float,
              registered, go, stop, out) -> None:
    """One load-generator process: ``count`` volunteers (numbered from ``first``), spread over
    the gateways' ``addresses``, until ``stop``; its tally goes to ``out``."""
    more_files()
    tally = Tally()

    async def run() -> None:
        tasks = [asyncio.create_task(volunteer(first + i, addresses[(first + i) % len(addresses)], token,
                                               tally, stop, go, registered, wait_s)) for i in range(count)]
        while not stop.is_set():
            await asyncio.sleep(0.2)
        await asyncio.wait(tasks, timeout=wait_s + 60)
        for task in tasks:
            task.cancel()

    asyncio.run(run())
    out.put(asdict(tally))


@dataclass
class Phase:
    tally: Tally
    seconds: float
    register_s: float
    gateway_cpu_s: float


def phase(layout: Coordinators, token: str, volunteers: int, seconds: float, wait_s: float,
          procs: int, first: int = 0) -> Phase:
    """Run ``volunteers`` volunteers in ``procs`` processes: all register, then ``seconds`` of work."""
    ctx = mp.get_context("spawn")  # (the parent holds gRPC channels and torch: nothing of it is forked)
    registered, go, stop, out = ctx.Value("i", 0), ctx.Event(), ctx.Event(), ctx.Queue()
    procs = max(1, min(procs, volunteers))
    shares = [volunteers // procs + (i < volunteers % procs) for i in range(procs)]
    children, start = [], first
    for share in shares:
        children.append(ctx.Process(target=generator, args=(start, share, layout.gateways, token, wait_s,
                                                            registered, go, stop, out), daemon=True))
        start += share
    began = time.monotonic()
    for child in children:
        child.start()
    while registered.value < volunteers and time.monotonic() - began < 900:
        time.sleep(0.5)
    register_s = time.monotonic() - began
    print(f"  {registered.value} volunteers registered in {register_s:.1f} s", file=sys.stderr)
    cpu = cpu_seconds(layout.gateway_pids())
    go.set()
    began = time.monotonic()
    time.sleep(seconds)
    stop.set()
    measured = time.monotonic() - began
    cpu = cpu_seconds(layout.gateway_pids()) - cpu
    tally = Tally()
    for _ in children:
        tally.merge(out.get(timeout=wait_s + 180))
    for child in children:
        child.join(30)
    return Phase(tally, measured, register_s, cpu)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def figures(p: Phase) -> dict[str, float]:
    t = p.tally
    return {
        "leases_per_s": round(len(t.handed) / p.seconds, 2),
        "units_uploaded": t.units,
        "heartbeat_p50_ms": round(pct(t.heartbeat_s, 0.5) * 1000, 2),
        "heartbeat_p99_ms": round(pct(t.heartbeat_s, 0.99) * 1000, 2),
        "poll_p50_ms": round(pct(t.poll_s, 0.5) * 1000, 2),
        "poll_p99_ms": round(pct(t.poll_s, 0.99) * 1000, 2),
        "time_to_work_p50_s": round(pct(t.to_lease_s, 0.5), 3),
        "time_to_work_p99_s": round(pct(t.to_lease_s, 0.99), 3),
        # Refused for capacity and seen as an error (an Upload refused with a time to retry is
        # waited out, as the worker's uploader does: counted in upload_waits instead).
        "capacity_refusals": t.exhausted - t.upload_waits,
        "capacity_refusals_by_kind": dict(sorted(t.exhausted_by_kind.items())),
        "upload_waits": t.upload_waits,
        "rpc_errors": t.errors,
        "rpc_errors_by_kind": dict(sorted(t.errors_by_kind.items())),
        "calls": t.calls,
        "gateway_cpu_s_per_1000_calls": round(p.gateway_cpu_s / max(t.calls, 1) * 1000, 3),
        "register_s": round(p.register_s, 1),
    }


def check_ledger(redis_url: str, tallies: list[Tally]) -> dict[str, int]:
    """What the ledger says against what the volunteers saw."""
    from coordinator.ledger import Ledger, TaskState, keys
    from coordinator.server import redis_client

    ledger = Ledger(redis_client(redis_url))
    handed: dict[str, set[str]] = defaultdict(set)
    accepted: dict[str, list[str]] = defaultdict(list)
    for t in tallies:
        for k, v in t.handed.items():
            handed[k] |= set(v)
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
    fences = int(ledger.r.get(keys.FENCE) or 0)
    return {"double_leased": double_leased, "double_accepted": double_accepted, "lost": lost,
            "accepted_seen": len(accepted), "done_in_ledger": states["done"], "buffered": len(buffered),
            "fences_issued": fences, "failed_tasks": states["failed"], "tasks": sum(states.values())}


def dataset(path: Path, records: int) -> None:
    from nomoat.tiny import read_fortunes

    fortunes = read_fortunes()
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(records):
            fh.write(json.dumps({"text": fortunes[i % len(fortunes)][:200]}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volunteers", "--workers", type=int, default=1000, dest="volunteers")
    parser.add_argument("--layout", choices=("all", "split"), default="all",
                        help="all: one --role all process; split: two gateways, a scheduler and a folder")
    parser.add_argument("--procs", type=int, default=0,
                        help="load-generator processes (default: one per 2,500 volunteers, at least one)")
    parser.add_argument("--seconds", type=float, default=60.0, help="load phase length")
    parser.add_argument("--baseline-seconds", type=float, default=15.0)
    parser.add_argument("--wait", type=float, default=20.0, help="each long-poll's wait_s")
    parser.add_argument("--records", type=int, default=0,
                        help="dataset records (~1 task per 2; default: enough that work stays queued)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--listen", default="127.0.0.1:0", help=argparse.SUPPRESS)
    parser.add_argument("--role", default="all", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.data_dir), args.listen, args.role, args.redis_url)
        return
    more_files()
    procs = args.procs or max(1, math.ceil(args.volunteers / 2500))
    records = args.records or max(3000, 6 * args.volunteers)
    tmp = Path(tempfile.mkdtemp(prefix="nomoat-load-"))
    print(f"starting the coordinator ({args.layout}) in {tmp} ...", file=sys.stderr)
    layout = start_layout(args.layout, tmp)
    data_dir = tmp / "coordinator"
    try:
        admin = (data_dir / "admin.token").read_text().strip()
        token = (data_dir / "worker.token").read_text().strip()
        path = tmp / "load.jsonl"
        dataset(path, records)
        with CoordinatorClient(layout.gateways[0], admin) as client:
            reply = client.submit(path, name="load", config=pb.JobConfig(tokens_per_task=64))
        print(f"job {reply.job_id}: {reply.tasks} tasks", file=sys.stderr)
        print(f"baseline: 1 volunteer for {args.baseline_seconds:.0f} s ...", file=sys.stderr)
        base = phase(layout, token, 1, args.baseline_seconds, args.wait, 1)
        print(f"load: {args.volunteers} volunteers in {procs} processes for {args.seconds:.0f} s ...", file=sys.stderr)
        load = phase(layout, token, args.volunteers, args.seconds, args.wait, procs, first=1)
        time.sleep(3)  # the last reports reach the scheduler
        ledger = check_ledger(layout.redis_url, [base.tally, load.tally])
    finally:
        layout.stop()
    b, lf = figures(base), figures(load)
    result = {
        "volunteers": args.volunteers, "layout": args.layout, "procs": procs, "registered": load.tally.registered,
        "seconds": round(load.seconds, 1), "tasks": reply.tasks, **lf,
        "double_leased": ledger["double_leased"], "double_accepted": ledger["double_accepted"], "lost": ledger["lost"],
        "baseline": b,
        "heartbeat_p50_ratio": round(lf["heartbeat_p50_ms"] / b["heartbeat_p50_ms"], 2),
        "leases_per_s_ratio": round(lf["leases_per_s"] / max(b["leases_per_s"], 1e-9), 1),
        "ledger": ledger,
        "ok": ledger["double_leased"] == 0 and ledger["double_accepted"] == 0 and ledger["lost"] == 0,
    }
    print(f"{lf['leases_per_s']} leases/s with {args.volunteers} volunteers ({result['leases_per_s_ratio']}x one "
          f"volunteer's); heartbeat p50 {lf['heartbeat_p50_ms']} ms, p99 {lf['heartbeat_p99_ms']} ms; time to work "
          f"p99 {lf['time_to_work_p99_s']} s; {lf['capacity_refusals']} refused for capacity; nothing lost or "
          f"double-leased: {result['ok']}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
