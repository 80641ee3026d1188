"""Benchmark: a pull's throughput against raw gRPC over loopback, both measured in the same run.

A model folder of ``--mb`` MB in ``--shards`` bf16 safetensors shards of random weights (plus a
config and the shard index) is published as version 0 into a fresh blob store with a real
ledger (an embedded redis-server), and served, in a child process, by the coordinator's own gRPC
server (``coordinator.server.grpc_server``: the real Models service, token interceptor and
message limits). Beside it, in the same child, a minimal server-streaming service with the same
server options sends the same blob files, read in the same chunk size, as raw bytes: no
protobuf, no framing, no checks. That is the ceiling a pull is measured against.

The pull side is ``CoordinatorClient.pull``, the call ``nomoat pull`` and the worker cache
make: every byte written to disk, every file's sha256 checked, the folder stamped and renamed
into place. The raw side only counts the bytes it receives. Both run alternately, ``--repeats``
times each after one warm-up of each (the blob files are then in the page cache for both); the
figure is each side's best run, since on a shared machine the slow runs measure the neighbours.

    python bench/pull.py [--mb 400] [--shards 4] [--repeats 5] [--chunk-kib 2048]

Last line: one JSON object with ``pull_vs_raw_grpc`` (target >= 0.7), ``pull_mb_s``,
``raw_grpc_mb_s`` and every run. Other benchmarks call :func:`measure` on a folder of their own
(bench/scale.py pulls its 1B model through it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RAW_METHOD = "/bench.Raw/Stream"


@dataclass(frozen=True)
class PullFigures:
    bytes: int
    chunk: int
    pull_mb_s: float  # best of the repeats
    raw_grpc_mb_s: float
    pull_vs_raw_grpc: float  # best against best
    paired_median: float  # the median of pull / raw over runs side by side (load shifts cancel)
    pull_runs: list[float]
    raw_runs: list[float]
    # CPU seconds per GB, client and server processes together: what a machine without a spare
    # core pays, and the throughput ratio that follows when CPU is all that limits
    pull_cpu_s_per_gb: float
    raw_cpu_s_per_gb: float
    pull_vs_raw_grpc_cpu: float


def make_folder(folder: Path, mb: int = 400, shards: int = 4, seed: int = 0) -> Path:
    """A Hugging Face-like folder of ``mb`` MB of random bf16 weights in ``shards`` shards."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    per_shard = mb * 10**6 // shards // 2  # bf16 elements
    rows = 4096
    weight_map, names = {}, [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    for i, name in enumerate(names):
        tensors = {}
        left, j = per_shard, 0
        while left > 0:  # matrices of 4096 x up to 4096, like a 1-8B model's projections
            cols = min(rows, max(1, left // rows))
            key = f"model.layers.{i}.mlp.proj_{j}.weight"
            tensors[key] = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
            weight_map[key] = name
            left -= rows * cols
            j += 1
        save_file(tensors, folder / name, metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    return folder


def _put(store, source: Path) -> str:
    """``source`` into the blob store, streamed (a shard of several GB never in memory)."""
    digest = hashlib.sha256()
    with open(source, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    sha = digest.hexdigest()
    target = store.path(sha)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return sha


def _raw_handler(blobs: list[Path], chunk: int) -> grpc.GenericRpcHandler:
    def stream(request: bytes, context) -> object:
        for blob in blobs:
            with open(blob, "rb") as fh:
                while block := fh.read(chunk):
                    yield block

    return grpc.method_handlers_generic_handler("bench.Raw", {
        "Stream": grpc.unary_stream_rpc_method_handler(stream, request_deserializer=None, response_serializer=None)})


def _serve(folder: str, data_dir: str, chunk: int, conn) -> None:
    """The child: the real Models service and the raw one, until the parent says stop."""
    import redis
    from grpc_health.v1 import health_pb2

    from coordinator.model import pull

    from coordinator.gateway import servicers
    from coordinator.gateway.auth import TokenRegistry
    from coordinator.model.history import History
    from coordinator.ledger import Ledger, VersionRecord
    from coordinator.ledger.redis_server import EmbeddedRedis
    from coordinator.server import MAX_MESSAGE, bind, grpc_server
    from coordinator.settings import Settings
    from coordinator.model.store import BlobStore

    pull.CHUNK = chunk  # the one knob this benchmark turns
    data = Path(data_dir)
    embedded = EmbeddedRedis(data / "redis")
    servers: list[grpc.Server] = []
    try:
        ledger = Ledger(redis.Redis.from_url(embedded.start()))
        store = BlobStore(data / "blobs")
        files = {str(p.relative_to(folder)): _put(store, p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}
        ledger.versions.publish(VersionRecord(version=0, parent=-1, files=files))
        registry = TokenRegistry(ledger.tokens)
        token = registry.create("reader")
        settings = Settings(data_dir=data)
        deps = servicers.Deps(settings, ledger, store, registry, None, {}, "", "",
                            history=History(ledger, store, data))
        real, health_servicer = grpc_server(deps)
        port = bind(real, "127.0.0.1:0")
        real.start()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        # The baseline: a plain threaded server with the limits the threaded gateway had.
        raw = grpc.server(futures.ThreadPoolExecutor(max_workers=32),
                          options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                   ("grpc.max_send_message_length", MAX_MESSAGE)],
                          maximum_concurrent_rpcs=256)
        raw.add_generic_rpc_handlers((_raw_handler([store.path(files[p]) for p in sorted(files)], chunk),))
        raw_port = raw.add_insecure_port("127.0.0.1:0")
        raw.start()
        servers = [real, raw]
        conn.send((port, raw_port, token, sum(store.size(s) for s in files.values())))
        conn.recv()  # stop
    except Exception as exc:  # noqa: BLE001  (the parent reports it)
        conn.send(exc)
    finally:
        for s in servers:
            s.stop(0)
        embedded.stop()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _raw_once(channel: grpc.Channel) -> tuple[int, float]:
    stream = channel.unary_stream(RAW_METHOD, request_serializer=None, response_deserializer=None)
    start, n = time.perf_counter(), 0
    for message in stream(b"", timeout=3600):
        n += len(message)
    return n, time.perf_counter() - start


def _pull_once(client, out: Path, cpu: Callable[[], float]) -> tuple[float, float]:
    """Seconds and CPU seconds of one pull (removing the folder after it counts in neither)."""
    start, cpu_start = time.perf_counter(), cpu()
    client.pull(out, 0)
    took, cpu_took = time.perf_counter() - start, cpu() - cpu_start
    shutil.rmtree(out)
    return took, cpu_took


def measure(folder: Path, repeats: int = 3, chunk: int | None = None, work_dir: Path | None = None) -> PullFigures:
    """Serve ``folder`` as version 0 (child process) and time ``CoordinatorClient.pull`` of it
    against raw gRPC streaming of the same bytes; each side's best of ``repeats`` after a warm-up."""
    from coordinator.model import pull
    from nomoat.client import MAX_MESSAGE, CoordinatorClient

    chunk = chunk or pull.CHUNK
    tmp = Path(tempfile.mkdtemp(prefix="nomoat-bench-pull-", dir=work_dir))
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(str(folder), str(tmp / "server"), chunk, child), daemon=True)
    server.start()
    try:
        answer = parent.recv()
        if isinstance(answer, Exception):
            raise answer
        port, raw_port, token, total = answer
        raw_channel = grpc.insecure_channel(f"127.0.0.1:{raw_port}",
                                            options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
        raw_runs, pull_runs, cpu = [], [], {"raw": 0.0, "pull": 0.0}

        def cpu_now() -> float:
            return time.process_time() + _cpu_s(server.pid)

        with CoordinatorClient(f"127.0.0.1:{port}", token=token) as client:
            client.wait_ready()
            for i in range(repeats + 1):  # the first of each is the warm-up
                before = cpu_now()
                n, took = _raw_once(raw_channel)
                if n != total:
                    raise RuntimeError(f"the raw stream sent {n} bytes, not {total}")
                raw_cpu = cpu_now() - before
                pulled, pull_cpu = _pull_once(client, tmp / "out", cpu_now)
                if i:
                    raw_runs.append(total / took / 1e6)
                    pull_runs.append(total / pulled / 1e6)
                    cpu["raw"] += raw_cpu
                    cpu["pull"] += pull_cpu
                print(f"  {'warm-up' if not i else f'run {i}'}: raw gRPC {total / took / 1e6:7.1f} MB/s   "
                      f"pull {total / pulled / 1e6:7.1f} MB/s", flush=True)
        raw_channel.close()
    finally:
        parent.send("stop")
        server.join(60)
        shutil.rmtree(tmp, ignore_errors=True)
    best_pull, best_raw = max(pull_runs), max(raw_runs)
    gb = total * repeats / 1e9
    return PullFigures(total, chunk, round(best_pull, 1), round(best_raw, 1), round(best_pull / best_raw, 3),
                       round(statistics.median(p / r for p, r in zip(pull_runs, raw_runs)), 3),
                       [round(r, 1) for r in pull_runs], [round(r, 1) for r in raw_runs],
                       round(cpu["pull"] / gb, 2), round(cpu["raw"] / gb, 2),
                       round(cpu["raw"] / cpu["pull"], 3) if cpu["pull"] else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=400, help="Size of the model folder.")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-kib", type=int, default=0, help="Bytes per message (default: the coordinator's).")
    parser.add_argument("--folder", type=Path, default=None, help="Pull this folder instead of a made-up one.")
    args = parser.parse_args()
    made = None
    if args.folder is None:
        made = Path(tempfile.mkdtemp(prefix="nomoat-bench-model-"))
        started = time.perf_counter()
        make_folder(made, args.mb, args.shards)
        print(f"made a {args.mb} MB folder in {args.shards} bf16 shards in {time.perf_counter() - started:.0f} s")
    try:
        figures = measure(args.folder or made, args.repeats, args.chunk_kib << 10 or None)
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    print(f"{figures.bytes / 1e6:.0f} MB in {figures.chunk >> 10} KiB chunks: pull {figures.pull_mb_s} MB/s, "
          f"raw gRPC {figures.raw_grpc_mb_s} MB/s (best of {args.repeats}): pull_vs_raw_grpc "
          f"{figures.pull_vs_raw_grpc}, run by run {figures.paired_median} (median)")
    print(f"CPU, client and server together: pull {figures.pull_cpu_s_per_gb} s/GB, raw gRPC "
          f"{figures.raw_cpu_s_per_gb} s/GB (ratio {figures.pull_vs_raw_grpc_cpu})")
    print(json.dumps(asdict(figures)))


if __name__ == "__main__":
    main()
