"""Benchmark: the coordinator and a worker's cache at 1B parameters (issue 11).

    nice python bench/scale.py                 # ~1.1B Llama on the CPU (under 10 minutes once built)
    nice python bench/scale.py --device cuda   # the coordinator's model and evaluations on a GPU
    python bench/scale.py --layers 2 --hidden 512 --intermediate 1408   # a small smoke run
    python bench/scale.py --store s3 --size small   # object storage (a SeaweedFS on loopback), quick

With ``--store s3`` the bench starts a SeaweedFS (tests/seaweed.py) and the coordinator's blob store
is a bucket on it: pulls and catch-ups go by presigned URLs, and ``pull_vs_raw_s3`` compares the
real pull (every byte written and checked) with plain GETs of the same objects from the same
server (received and dropped). ``coordinator_bytes_per_version`` is what the gateway moved itself
(its byte counter: pulls, shards, uploads) over the versions made: 0 with object storage.

A Llama built from a LlamaConfig (TinyLlama's shape by default: hidden 2048, MLP 5632, 22 layers,
32 heads, 4 KV heads, vocab 32000: 1.1B parameters) with random weights (this measures cost, not
quality), saved once in bf16 shards (``save_pretrained(max_shard_size=...)``) under
``--cache-dir`` and reused. Then, each part in its own process so that each one's peak RSS
(VmHWM) is its own:

* **coordinator** (the real pieces, in process: embedded redis-server, ledger, blob store,
  RunningModel, History, Folder, and the real gRPC server with the real Models service): load the
  base, publish version 0, submit a job, and fold ``--folds`` times K = 4 rank-16 adapters with
  every gate (norm, per-adapter held-out gate, fold check; the budget ``--eval-tokens``), each
  fold publishing its version as the server does (a patch; a whole snapshot every
  ``snapshot_every`` versions, timed apart as ``snapshot_seconds``); build the newest version's
  Hugging Face folder (from the nearest snapshot plus patches, tensor by tensor); then serve.
* **worker**: over loopback gRPC, time a raw stream of the newest folder's bytes (a bare gRPC
  handler on the same server, reading the same blob files, 1 MiB messages, received and
  dropped), then the real pull of that folder (``CoordinatorClient.pull``: writes and checks
  every file), and the raw stream again; then catch a worker cache (worker/cache.py) up: version 0
  in full, then the newest version by patch.

The memory bound is issue 11's: 4P (the fp32 master) + 2P (one published bf16 copy) + 1 GB.
redis-server is a process of its own and is not counted (it holds the ledger, never blobs).

The last line is JSON: ``coordinator_seconds_per_fold`` (gates + fold + publish, mean over the
folds), ``peak_rss_vs_bound`` (the coordinator's VmHWM over the bound), ``pull_vs_raw_grpc``
(raw stream seconds over pull seconds, the better of the two raw runs), ``published_dtype``,
and every figure behind them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

GB = 1 << 30
RANK, ALPHA, K = 16, 32.0, 4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RAW_METHOD = "/bench.Raw/Stream"


def vm_hwm_bytes() -> int:
    """This process's peak resident set size so far (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def log(*parts: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


# -- build the base model (once) -----------------------------------------------------------------


def model_dir(args: argparse.Namespace) -> Path:
    name = f"llama-h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}-s{args.shard_size}"
    return Path(args.cache_dir) / name


def build(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from nomoat.tiny import tiny_model_path

    out = model_dir(args)
    if (out / "config.json").exists():
        return {"built": False}
    t0 = time.time()
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 2 bytes a parameter, not 4
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".build-"))
    model.save_pretrained(tmp, max_shard_size=args.shard_size)
    AutoTokenizer.from_pretrained(tiny_model_path()).save_pretrained(tmp)
    tmp.rename(out)
    return {"built": True, "build_seconds": round(time.time() - t0, 1)}


# -- the coordinator part ------------------------------------------------------------------------


def random_adapter(shapes: dict[str, tuple[int, int]], seed: int, scale: float):
    import torch

    from nomoat.adapter import Adapter

    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(RANK, d_in, generator=g) / d_in ** 0.5,
                   torch.randn(d_out, RANK, generator=g) * scale)
               for m, (d_out, d_in) in shapes.items()}
    return Adapter(factors, rank=RANK, alpha=ALPHA)


def plain_folds(args: argparse.Namespace, ledger, store, model, shapes) -> list[dict]:
    """``--catch-up-only``: each version the fold's exact product of K random adapters, applied to
    the fp32 master and published with its patch as the folder does, without the gates' evaluations
    (what a catch-up fetches is the same; a starved CPU cannot afford 1.1B forward passes)."""
    import torch

    from coordinator.fold import folding
    from coordinator.ledger import VersionRecord
    from nomoat import adapter as fmt

    folds, seed = [], 0
    for _ in range(args.folds):
        base = ledger.versions.latest()
        t0, c0 = time.time(), time.process_time()
        adapters = [random_adapter(shapes, seed + i, args.adapter_scale) for i in range(1, K + 1)]
        seed += K
        patch = folding.build_patch(adapters, [1.0 / K] * K)
        with torch.no_grad():
            folding.apply_patch(model.master(patch.modules()), patch)
        ledger.versions.publish(VersionRecord(version=base + 1, parent=base, patch=store.put(fmt.to_bytes(patch))))
        folds.append({"version": base + 1, "seconds": round(time.time() - t0, 1),
                      "cpu_seconds": round(time.process_time() - c0, 1), "patch_bytes": len(fmt.to_bytes(patch))})
        log(f"plain fold -> version {base + 1}", folds[-1])
    return folds


def coordinator(args: argparse.Namespace) -> None:
    import grpc
    import redis
    import torch

    from coordinator.gateway import servicers
    from coordinator.gateway.auth import TokenRegistry
    from coordinator.fold.folder import Folder
    from coordinator.model.history import History
    from coordinator.ledger import Ledger, VersionRecord
    from coordinator.model.running import RunningModel, pulled, resolve_device
    from coordinator.ledger.redis_server import EmbeddedRedis
    from coordinator.server import bind, grpc_server
    from coordinator.settings import JobDefaults, Settings
    from coordinator.model import pull
    from coordinator.model.store import BlobStore, open_store
    from coordinator.schedule.submit import submit
    from nomoat import adapter as fmt
    from nomoat.tiny import read_demo

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    figures: dict = {}
    device = resolve_device(args.device)
    # shard_sigmas 0: its adapters are random (a cost benchmark), they learned no shard
    settings = Settings(data_dir=work, fold_every=K, fold_timeout_s=1e9, eval_tokens=args.eval_tokens,
                        eval_dtype=args.eval_dtype, shard_sigmas=0.0,
                        device=device, snapshot_every=args.snapshot_every,
                        job=JobDefaults(lora_rank=RANK, lora_alpha=ALPHA, seq_len=args.seq_len,
                                        tokens_per_task=2048))
    embedded = EmbeddedRedis(work / "redis")
    url = embedded.start()
    try:
        ledger = Ledger(redis.Redis.from_url(url))
        store = open_store(args.store_url, work) if args.store_url else BlobStore(work / "blobs")
        t0 = time.time()
        model = RunningModel(Path(args.base), device)
        figures["load_seconds"] = round(time.time() - t0, 1)
        params = sum(p.numel() for p in model.model.parameters())
        figures["params"] = params
        figures["rss_after_load_gb"] = round(vm_hwm_bytes() / GB, 2)
        t0 = time.time()
        files = model.publish(store)
        figures["publish_v0_seconds"] = round(time.time() - t0, 1)
        ledger.versions.publish(VersionRecord(version=0, parent=-1, files=files))
        history = History(ledger, store, work, device)
        folder = Folder(settings, ledger, store, model, history)
        shapes = model.shapes(TARGETS)
        texts = read_demo()
        if args.catch_up_only:
            folds = plain_folds(args, ledger, store, model, shapes)
        else:
            data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
            job = submit(settings, ledger, store, model.tokenizer, list(shapes), data, "demo.jsonl", "scale", {})
            figures["validation_records"] = job.validation_records
            t0 = time.time()
            folder.record_base_losses()  # the parent's evaluation, once per version (and then reused)
            figures["parent_eval_seconds"] = round(time.time() - t0, 1)
            folds = []
            seed = 0
            for _ in range(args.folds):
                base = ledger.versions.latest()
                for _ in range(K):
                    seed += 1
                    task_id = ledger.leases.pending(1)[0]
                    fence = ledger.leases.lease(task_id, time.time() + 3600, base, max_attempts=3)
                    sha = store.put(fmt.to_bytes(random_adapter(shapes, seed, args.adapter_scale)))
                    accepted = ledger.adapters.accept(task_id, fence, sha, base_version=base, tokens=2048, rank=RANK,
                                                      alpha=ALPHA)
                    assert accepted.ok, accepted.detail
                t0, c0 = time.time(), time.process_time()
                number = folder.maybe_fold(set())
                seconds, cpu = time.time() - t0, time.process_time() - c0
                if number is None:
                    raise SystemExit("the fold published nothing: every adapter was refused (see the log)")
                record = ledger.versions.get(number)
                folds.append({"version": number, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                              "eval_loss": round(record.eval_loss, 4),
                              "parent_loss": round(record.metrics["parent_loss"], 4),
                              "paired_se": record.metrics.get("paired_se"), "snapshot": bool(record.files)})
                log(f"fold -> version {number}: {seconds:.1f} s", folds[-1])
        figures["folds"] = folds
        latest = ledger.versions.latest()
        newest = {}
        if not args.catch_up_only:
            t0 = time.time()
            newest = history.hf_files(latest)  # its folder from the nearest snapshot + patches, streamed
            figures["snapshot_build_seconds"] = round(time.time() - t0, 1)
            t0 = time.time()
            model.publish(store)  # what a snapshot version costs the fold that makes it
            figures["snapshot_seconds"] = round(time.time() - t0, 1)
        sent = pulled(newest)
        figures["pull_bytes"] = sum(store.size(s) for s in sent.values())
        figures["rss_before_serving_gb"] = round(vm_hwm_bytes() / GB, 2)

        registry = TokenRegistry(ledger.tokens)
        token = registry.create("admin")  # admin: the raw stream is not a method of the proto
        deps = servicers.Deps(settings, ledger, store, registry, model.tokenizer, shapes, "", "", history=history,
                            operations=folder)
        server, _ = grpc_server(deps)
        order = [sha for _, sha in sorted(sent.items())]

        async def raw(request: bytes, context):  # the same bytes as the pull, with nothing around them
            for sha in order:  # read off the loop, as the gateway reads a pull's blocks
                with open(store.path(sha), "rb") as fh:
                    while block := await asyncio.to_thread(fh.read, 1 << 20):
                        yield block

        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Raw", {
            "Stream": grpc.unary_stream_rpc_method_handler(raw, request_deserializer=None, response_serializer=None),
        })])
        port = bind(server, "127.0.0.1:0")
        server.start()
        planned = pull.plan(ledger, history, store, pull.Format.HF, 0, 0 if args.catch_up_only else latest)
        links = pull.links(store, planned, 3600)  # the same objects, for plain GETs
        urls = [links[f.path] for f in planned.files if f.path in links]
        url_sizes = [f.size for f in planned.files if f.path in links]
        catch_up = pull.plan(ledger, history, store, pull.Format.PATCHES, 0, latest)  # a cache at 0 fetches this
        ready = {"address": f"127.0.0.1:{port}", "token": token, "lineage": history.lineage().id,
                 "latest": latest, "bytes": figures["pull_bytes"], "urls": urls, "url_sizes": url_sizes,
                 "pull_files_bytes": sum(f.size for f in planned.files),
                 "catch_up_planned_bytes": sum(f.size for f in catch_up.files), "catch_up_only": args.catch_up_only}
        (work / "ready.json").write_text(json.dumps(ready))
        sys.stdin.read()  # serve until the bench closes our stdin
        server.stop(grace=2).wait()
        moved = ledger.counters.tally().gateway_bytes
        figures["gateway_bytes"] = moved
        figures["coordinator_bytes_per_version"] = round(sum(moved.values()) / max(1, latest))
        figures["peak_rss_gb"] = round(vm_hwm_bytes() / GB, 3)
        figures["published_dtype"] = str(model.base_dtype).removeprefix("torch.")
        figures["device"] = device
        (work / "coordinator.json").write_text(json.dumps(figures))
    finally:
        embedded.stop()


# -- the worker part -----------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import grpc

    from nomoat.client import MAX_MESSAGE, CoordinatorClient
    from worker.cache import ModelCache

    work = Path(args.work)
    ready = json.loads((work / "ready.json").read_text())
    figures: dict = {}

    def raw_stream() -> float:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
        with grpc.insecure_channel(ready["address"], options=options) as channel:
            call = channel.unary_stream(RAW_METHOD, request_serializer=None, response_deserializer=None)
            t0 = time.time()
            got = sum(len(b) for b in call(b"", metadata=(("authorization", f"Bearer {ready['token']}"),),
                                           timeout=3600))
            seconds = time.time() - t0
        assert got == ready["bytes"], (got, ready["bytes"])
        return seconds

    def raw_s3() -> float:
        """Plain GETs of the pull's objects from the store, received and dropped (no hash, nothing
        written), with the pull's own concurrency: the same ranges over the same number of threads."""
        from concurrent.futures import ThreadPoolExecutor

        from nomoat import fetch

        sizes = ready["url_sizes"]
        work_items = [(url, a, b) for url, size in zip(ready["urls"], sizes) for a, b in fetch.ranges(size, 0, fetch.RANGE)]

        def one(item: tuple[str, int, int]) -> int:
            url, a, b = item
            fetch.get_range(url, a, b, memoryview(bytearray(b - a)))
            return b - a

        t0 = time.time()
        with ThreadPoolExecutor(fetch.THREADS) as pool:
            got = sum(pool.map(one, work_items))
        assert got == ready["pull_files_bytes"], (got, ready["pull_files_bytes"])
        return time.time() - t0

    class Counting(ModelCache):
        """The cache as a worker runs it, counting the bytes its pulls receive (its bar's advances)."""

        received = 0

        def _bar(self):
            bar = super()._bar()
            advance = bar.advance

            def counted(n: int) -> None:
                Counting.received += n
                advance(n)

            bar.advance = counted
            return bar

    direct = bool(ready["urls"])
    raw = raw_s3 if direct else raw_stream
    with CoordinatorClient(ready["address"], ready["token"]) as client:
        from nomoat.transfer import Quiet

        class Timed(Quiet):  # when the header came: the rest of the pull is the transfer itself
            header_at = 0.0

            def start(self, header, held, note) -> None:
                Timed.header_at = Timed.header_at or time.time()

        if ready["catch_up_only"]:
            return catch_up(client, ready, work, figures, Counting)
        raws = [raw()]
        out = work / "pulled"
        t0 = time.time()
        client.pull(out, ready["latest"], progress=Timed())
        figures["pull_seconds"] = round(time.time() - t0, 2)
        figures["pull_header_seconds"] = round(Timed.header_at - t0, 2)  # the Pull call: plan, URLs
        raws.append(raw())
        name = "raw_s3" if direct else "raw_grpc"
        if direct:
            from nomoat import fetch

            figures["fetch_threads"], figures["fetch_range_bytes"] = fetch.THREADS, fetch.RANGE  # pull and raw alike
        figures[f"{name}_seconds"] = [round(r, 2) for r in raws]
        figures["pull_mb_s"] = round(ready["pull_files_bytes"] / figures["pull_seconds"] / 1e6, 1)
        figures[f"{name}_mb_s"] = round(ready["pull_files_bytes"] / min(raws) / 1e6, 1)
        shutil.rmtree(out, ignore_errors=True)
        catch_up(client, ready, work, figures, Counting)


def catch_up(client, ready: dict, work: Path, figures: dict, Counting) -> None:
    """A worker cache: version 0 in full, then the newest by patch, then checked again; the
    bytes each fetched, and the worker's figures written."""
    cache = Counting(work / "cache")
    t0 = time.time()
    cache.ensure(client, ready["lineage"], 0)
    figures["cache_full_pull_seconds"] = round(time.time() - t0, 1)
    figures["cache_full_pull_bytes"] = Counting.received
    Counting.received = 0
    t0 = time.time()
    cache.ensure(client, ready["lineage"], ready["latest"])
    figures["cache_catch_up_seconds"] = round(time.time() - t0, 1)
    figures["cache_catch_up_bytes"] = Counting.received  # what the catch-up by patch fetched
    figures["catch_up_planned_bytes"] = ready["catch_up_planned_bytes"]
    figures["catch_up_vs_full_bytes"] = round(Counting.received / max(1, figures["cache_full_pull_bytes"]), 4)
    t0 = time.time()
    cache.ensure(client, ready["lineage"], ready["latest"])  # checked against its stamp: memoised
    figures["cache_check_seconds"] = round(time.time() - t0, 2)
    figures["worker_peak_rss_gb"] = round(vm_hwm_bytes() / GB, 3)
    figures["cache_full_pull_mb_s"] = round(figures["cache_full_pull_bytes"] / max(figures["cache_full_pull_seconds"], 1e-3) / 1e6, 1)
    (work / "worker.json").write_text(json.dumps(figures))


# -- the bench -----------------------------------------------------------------------------------


def part(args: argparse.Namespace, name: str, **extra: str) -> subprocess.Popen:
    argv = [sys.executable, __file__, "--part", name]
    for key, value in {**vars(args), **extra}.items():
        if key == "part" or value is None or value is False:
            continue
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    # Idle OpenMP threads sleep instead of spinning: on a CPU shared with other busy processes a
    # spinning team stalls every parallel region (bench/fold.py measured it).
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    return subprocess.Popen(argv, stdin=subprocess.PIPE, text=True, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="the coordinator's device: cpu, cuda or auto")
    parser.add_argument("--cache-dir", default="/tmp/nomoat-scale", help="where the base model is built, once")
    parser.add_argument("--work", default=None, help="scratch dir for a run (default: a fresh one, removed after)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-size", default="500MB", help="the base's max_shard_size")
    parser.add_argument("--eval-tokens", type=int, default=512, help="the evaluation budget (Settings.eval_tokens)")
    parser.add_argument("--eval-dtype", default="fp32", choices=["fp32", "bf16"], help="Settings.eval_dtype")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--snapshot-every", type=int, default=10)
    parser.add_argument("--adapter-scale", type=float, default=2e-4, help="size of the random adapters' B")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--store", default="folder", choices=["folder", "s3"],
                        help="the blob store: the data dir's folder, or a bucket on a SeaweedFS started for the run")
    parser.add_argument("--size", default="", choices=["", "small", "1.1b"],
                        help="small: a 2-layer, 512-wide Llama, for a quick run; 1.1b: TinyLlama's shape "
                             "(the default shape, named); either overrides the shape flags")
    parser.add_argument("--catch-up-only", action="store_true",
                        help="publish --folds versions by the fold's exact product without the gates' evaluations, "
                             "then only a worker cache's full pull of version 0 and its catch-up by patch")
    parser.add_argument("--part", default="", help=argparse.SUPPRESS)
    parser.add_argument("--base", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store-url", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size == "small":
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 512, 1408, 2, 8, 4
    elif args.size == "1.1b":
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab = 2048, 5632, 22, 32, 4, 32000
    if args.part == "build":
        print(json.dumps(build(args)))
        return 0
    if args.part == "coordinator":
        coordinator(args)
        return 0
    if args.part == "worker":
        worker(args)
        return 0

    t_start = time.time()
    base = model_dir(args)
    built = subprocess.run([sys.executable, __file__, "--part", "build", *shape_argv(args)],
                           check=True, capture_output=True, text=True)
    result: dict = json.loads(built.stdout.strip().splitlines()[-1])
    log(f"base model: {base} ({'built' if result['built'] else 'reused'})")
    work = Path(args.work or tempfile.mkdtemp(prefix="nomoat-scale-run-", dir=args.cache_dir))
    work.mkdir(parents=True, exist_ok=True)
    seaweed = None
    if args.store == "s3":
        from tests.seaweed import SeaweedFS, use

        seaweed = SeaweedFS(work / "seaweed").start()
        use(seaweed)  # the parts inherit the standard AWS variables
        args.store_url = f"s3://nomoat-bench/scale-{os.getpid()}"
    try:
        t0 = time.time()
        coord = part(args, "coordinator", work=str(work), base=str(base))
        while not (work / "ready.json").exists():
            if coord.poll() is not None:
                raise SystemExit("the coordinator part failed (see above)")
            time.sleep(0.5)
        result["coordinator_part_seconds"] = round(time.time() - t0, 1)
        log("coordinator ready; pulling")
        w = part(args, "worker", work=str(work), base=str(base))
        w.stdin.close()
        if w.wait() != 0:
            raise SystemExit("the worker part failed (see above)")
        coord.stdin.close()
        if coord.wait() != 0:
            raise SystemExit("the coordinator part failed (see above)")
        c = json.loads((work / "coordinator.json").read_text())
        wk = json.loads((work / "worker.json").read_text())
    finally:
        if seaweed is not None:
            seaweed.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    params = c["params"]
    bound = 4 * params + 2 * params + GB
    folds = c["folds"]
    summary = {
        "coordinator_seconds_per_fold": round(sum(f["seconds"] for f in folds) / len(folds), 1),
        # CPU seconds the coordinator process spent per fold (all its threads): the wall time on a
        # CPU that other processes share is this over the share it got.
        "coordinator_cpu_seconds_per_fold": round(sum(f.get("cpu_seconds", 0) for f in folds) / len(folds), 1),
        "peak_rss_vs_bound": round(c["peak_rss_gb"] * GB / bound, 3),
        **({} if args.catch_up_only else
           {"pull_vs_raw_s3": round(min(wk["raw_s3_seconds"]) / wk["pull_seconds"], 3)} if args.store == "s3" else
           {"pull_vs_raw_grpc": round(min(wk["raw_grpc_seconds"]) / wk["pull_seconds"], 3)}),
        "coordinator_bytes_per_version": c["coordinator_bytes_per_version"], "store": args.store,
        "published_dtype": c["published_dtype"],
        "params": params, "bound_gb": round(bound / GB, 2), "eval_tokens": args.eval_tokens,
        "eval_dtype": args.eval_dtype,
        **{k: v for k, v in c.items() if k not in ("params",)}, **wk, **result,
        "total_seconds": round(time.time() - t_start, 1),
    }
    print(json.dumps(summary))
    return 0


def shape_argv(args: argparse.Namespace) -> list[str]:
    return ["--cache-dir", args.cache_dir, "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
            "--layers", str(args.layers), "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
            "--vocab", str(args.vocab), "--shard-size", args.shard_size]


if __name__ == "__main__":
    raise SystemExit(main())
