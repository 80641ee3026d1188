"""Benchmark: heartbeats while long-polls and Watch streams are held on the asyncio gateway.

The coordinator's own gRPC server (``coordinator.server.grpc_server``: lanes, token interceptor,
long-polls woken by the ledger) runs in a child process on an embedded redis-server, with one
job and one leased task. The bench process first measures heartbeats alone (the baseline), then
opens ``--polls`` RequestWork long-polls and ``--watchers`` Watch streams, holds them, and
measures the same heartbeats again, then places runs in a share of the waiting workers' inboxes
and measures how long those polls take to answer. It also reads, from the child, its thread
count, and from Redis, the commands per second the held polls and watchers cost.

    python bench/gateway.py [--polls 1000] [--watchers 200] [--beats 300]

Last line: one JSON object with ``heartbeat_p99_ratio`` (loaded / alone), heartbeat p50/p99
in both phases, ``server_threads`` alone and loaded, ``redis_commands_per_s`` alone and loaded,
and ``wake_p50_ms``/``wake_p99_ms`` (run placed -> poll answered).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import redis  # noqa: E402

from bench import gateway_child  # noqa: E402

GATEWAY_ROLES = ("worker", "submitter", "reader")
GATEWAY_SETTINGS = dict(long_poll_s=60.0, max_watch_streams=100_000, max_streams_per_caller=100_000,
                        max_workers_per_token=100_000)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--polls", type=int, default=1000)
    parser.add_argument("--watchers", type=int, default=200)
    parser.add_argument("--beats", type=int, default=300)
    parser.add_argument("--wakes", type=int, default=100, help="waiting polls given a run, to time their wake-up")
    args = parser.parse_args()

    from coordinator.ledger import Ledger
    from nomoat.v1 import nomoat_pb2 as pb
    from nomoat.v1 import nomoat_pb2_grpc as rpc

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    with tempfile.TemporaryDirectory(prefix="nomoat-bench-gateway-") as tmp:
        proc = ctx.Process(target=gateway_child.serve, args=(tmp, child, GATEWAY_ROLES, GATEWAY_SETTINGS),
                           daemon=True)
        proc.start()
        info = parent.recv()
        r = redis.Redis.from_url(info["redis"])
        ledger = Ledger(r)

        def meta(role: str) -> tuple:
            return (("authorization", f"Bearer {info['tokens'][role]}"),)

        # A few channels, as a load balancer's worth of volunteers would spread over connections.
        channels = [grpc.insecure_channel(info["address"]) for _ in range(8)]
        workers = [rpc.WorkersStub(c) for c in channels]
        jobs = [rpc.JobsStub(c) for c in channels]
        path = Path(tmp) / "d.jsonl"
        path.write_text("".join(json.dumps({"text": f"record {i}: some words to train on"}) + "\n" for i in range(40)))
        from nomoat.client import CoordinatorClient

        with CoordinatorClient(info["address"], token=info["tokens"]["submitter"]) as submitter:
            job_id = submitter.submit(path, name="bench",
                                      config=pb.JobConfig(lora_rank=2, lora_alpha=4.0, target_modules=["q_proj"])).job_id
        task_id = ledger.tasks.ids(job_id)[0]
        card = pb.Card(name="RTX 4090", vram_gb=24.0)
        ids = [workers[i % 8].Register(pb.RegisterRequest(name=f"w{i}", card=card), metadata=meta("worker"),
                                       timeout=30).worker_id for i in range(args.polls)]
        secret = "bench-lease-secret"  # a lease is its worker's: heartbeats carry its worker and secret
        fence = ledger.leases.lease(task_id, time.time() + 3600, 0, max_attempts=3, worker_id=ids[0], secret=secret)

        def beats() -> list[float]:
            out = []
            for _ in range(args.beats):
                t0 = time.perf_counter()
                reply = workers[0].Heartbeat(pb.HeartbeatRequest(task_id=task_id, fence=fence, worker_id=ids[0],
                                                                 lease_secret=secret), metadata=meta("worker"),
                                             timeout=30)
                out.append((time.perf_counter() - t0) * 1000)
                assert reply.ok, reply.reason
            return out

        def redis_rate(seconds: float = 5.0) -> float:
            before = int(r.info("stats")["total_commands_processed"])
            time.sleep(seconds)
            return (int(r.info("stats")["total_commands_processed"]) - before - 2) / seconds

        def threads() -> int:
            parent.send("threads")
            return parent.recv()

        alone = beats()
        figures = {"polls": args.polls, "watchers": args.watchers,
                   "heartbeat_p50_ms_alone": round(statistics.median(alone), 2),
                   "heartbeat_p99_ms_alone": round(percentile(alone, 0.99), 2),
                   "server_threads_alone": threads(), "redis_commands_per_s_alone": round(redis_rate(), 1)}
        held = []
        for i, worker_id in enumerate(ids):
            held.append(workers[i % 8].RequestWork.future(pb.WorkRequest(worker_id=worker_id, wait_s=60),
                                                          metadata=meta("worker"), timeout=120))
        streams = []
        for i in range(args.watchers):
            call = jobs[i % 8].Watch(pb.WatchRequest(job_id=job_id), metadata=meta("reader"), timeout=120)
            next(call)
            streams.append(call)
        time.sleep(2.0)
        done_early = sum(f.done() for f in held)
        loaded = beats()
        figures.update({
            "heartbeat_p50_ms_loaded": round(statistics.median(loaded), 2),
            "heartbeat_p99_ms_loaded": round(percentile(loaded, 0.99), 2),
            "server_threads_loaded": threads(), "redis_commands_per_s_loaded": round(redis_rate(), 1),
            "polls_answered_early": done_early,
        })
        wakes = []
        for i in range(min(args.wakes, len(ids))):
            t0 = time.perf_counter()
            ledger.inbox.place(f"run-{i}", ids[i], [], ["{}"])
            reply = held[i].result(timeout=60)
            wakes.append((time.perf_counter() - t0) * 1000)
            assert reply.run_id == f"run-{i}"
        figures["wake_p50_ms"] = round(statistics.median(wakes), 2)
        figures["wake_p99_ms"] = round(percentile(wakes, 0.99), 2)
        figures["heartbeat_p99_ratio"] = round(figures["heartbeat_p99_ms_loaded"] / figures["heartbeat_p99_ms_alone"], 2)
        for f in held:
            f.cancel()
        for s in streams:
            s.cancel()
        parent.send("stop")
        proc.join(timeout=30)
        for c in channels:
            c.close()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
