"""Benchmark: what a long run leaves on disk and in Redis, with and without the sweeper (issue 20).

    nice python bench/gc.py                  # 200 versions of the tiny model, twice (a few minutes)
    python bench/gc.py --versions 40         # a quick run

Each run starts an empty ledger (its own embedded redis-server) and blob folder, and makes
``--versions`` versions the way the folder does, with the real pieces but without the held-out
evaluations (this measures storage, not quality): a job of ``--job-lines`` records every
``--versions-per-job`` versions (the one before it finished), two adapters per version leased,
uploaded and accepted through the ledger (one adapter in ten refused at the fold), their exact
product folded into the tiny model's fp32 master (coordinator.fold.folding), and the version
published with its patch, its model card and, every ``snapshot_every`` (10) versions, its whole
folder. The second run sweeps (coordinator.model.retention, the default policy) every
``--sweep-every`` versions, as the folder's process does; retention's day-long waits (refused
adapters, finished jobs) are taken as passed (each sweep runs as if ``keep_days`` + 1 days
later), which is where a run that lasts longer than that settles.

Last line JSON: ``disk_gc_ratio`` and ``redis_gc_ratio`` (with the sweeper over without: blob
bytes; Redis ``used_memory`` above an empty ledger's), and the figures behind them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

RANK, ALPHA = 4, 8.0


def one_run(args: argparse.Namespace, work: Path, sweep: bool) -> dict:
    import redis
    import torch

    from coordinator.fold import folding
    from coordinator.ledger import Ledger, VersionRecord
    from coordinator.ledger.records import FoldedAdapter, JobState
    from coordinator.ledger.redis_server import EmbeddedRedis
    from coordinator.model import modelcard, retention
    from coordinator.model.running import RunningModel
    from coordinator.model.store import BlobStore
    from coordinator.schedule.submit import submit
    from coordinator.settings import JobDefaults, Settings
    from nomoat import adapter as fmt
    from nomoat.tiny import read_demo, tiny_model_path

    embedded = EmbeddedRedis(work / "redis")
    client = redis.Redis.from_url(embedded.start())
    try:
        empty = int(client.info("memory")["used_memory"])
        ledger = Ledger(client)
        store = BlobStore(work / "blobs")
        settings = Settings(data_dir=work, job=JobDefaults(lora_rank=RANK, lora_alpha=ALPHA, tokens_per_task=600))
        policy = retention.Policy.of(settings)
        model = RunningModel(tiny_model_path())
        ledger.versions.publish(VersionRecord(version=0, parent=-1, files=model.publish(store),
                                              metrics={"base_model": "tiny"}))
        lineage = ledger.versions.lineage() or ledger.versions.fix_lineage(
            __import__("nomoat.lineage", fromlist=["new_lineage"]).new_lineage(ledger.versions.get(0).files))
        targets = model.shapes(list(settings.job.target_modules))
        texts = read_demo()
        job_id, seed, swept = "", 0, 0
        for number in range(1, args.versions + 1):
            if (number - 1) % args.versions_per_job == 0:
                if job_id:
                    ledger.jobs.finish(job_id, JobState.DONE)
                start = (number * 37) % max(1, len(texts) - args.job_lines)
                data = "".join(json.dumps({"text": t}) + "\n" for t in texts[start : start + args.job_lines]).encode()
                job_id = submit(settings, ledger, store, model.tokenizer, list(targets), data, "d.jsonl",
                                f"job-{number}", {}).job_id
            folded = []
            for _ in range(2 + (number % 10 == 0)):  # one version in ten also has an adapter refused
                seed += 1
                gen = torch.Generator().manual_seed(seed)
                adapter = fmt.Adapter({m: (torch.randn(RANK, d_in, generator=gen) * 0.01,
                                           torch.randn(d_out, RANK, generator=gen) * 0.001)
                                       for m, (d_out, d_in) in targets.items()}, rank=RANK, alpha=ALPHA)
                task_id = ledger.leases.pending(1)
                if not task_id:  # the job ran out of tasks: a new one is submitted next version
                    break
                fence = ledger.leases.lease(task_id[0], time.time() + 600, number - 1, max_attempts=3)
                sha = store.put(fmt.to_bytes(adapter))
                accepted = ledger.adapters.accept(task_id[0], fence, sha, worker_id=f"w-{seed % 7}",
                                                  base_version=number - 1, rank=RANK, alpha=ALPHA, tokens=600)
                folded.append((accepted.detail, adapter))
            if number % 10 == 0 and len(folded) > 2:
                ledger.adapters.reject(folded.pop()[0], "refused by the bench")
            weights = [1.0 / len(folded)] * len(folded)
            patch = folding.build_patch([a for _, a in folded], weights)
            folding.apply_patch(model.master(patch.modules()), patch)
            ids = [(i, w) for (i, _), w in zip(folded, weights)]
            card = modelcard.make(ledger, store, base_model="tiny", lineage=lineage.id, version=number,
                                  parent=number - 1, eval_loss=2.0, folded=ids, job_ids=[job_id])
            ledger.versions.publish(VersionRecord(
                version=number, parent=number - 1, patch=store.put(fmt.to_bytes(patch)),
                files=model.publish(store) if number % settings.snapshot_every == 0 else {},
                adapters=tuple(FoldedAdapter(i, w, 0) for i, w in ids), eval_loss=2.0,
                metrics={"jobs": [job_id], modelcard.CARD_KEY: card}, job_id=job_id), folded=ids)
            if sweep and number % args.sweep_every == 0:
                later = time.time() + (policy.keep_days + 1) * retention.DAY
                retention.sweep(ledger, store, policy, versions_dir=work / "versions", now=later)
                swept += 1
        blobs = list(store.list())
        return {"versions": args.versions, "sweeps": swept, "blobs": len(blobs),
                "disk_bytes": sum(b.size for b in blobs),
                "redis_bytes": int(client.info("memory")["used_memory"]) - empty,
                "redis_keys": int(client.dbsize())}
    finally:
        client.close()
        embedded.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", type=int, default=200)
    parser.add_argument("--versions-per-job", type=int, default=10)
    parser.add_argument("--job-lines", type=int, default=300)
    parser.add_argument("--sweep-every", type=int, default=10)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    figures = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="nomoat-gc-") as tmp:
        for name, sweep in (("without", False), ("with", True)):
            started = time.time()
            figures[name] = one_run(args, Path(tmp) / name, sweep)
            figures[name]["seconds"] = round(time.time() - started, 1)
            print(f"{name} the sweeper: {figures[name]}", file=sys.stderr)
    without, with_ = figures["without"], figures["with"]
    print(json.dumps({
        "disk_gc_ratio": round(with_["disk_bytes"] / without["disk_bytes"], 3),
        "redis_gc_ratio": round(with_["redis_bytes"] / without["redis_bytes"], 3),
        **{f"{k}_{name}": v for name, run in figures.items() for k, v in run.items()},
        "total_seconds": round(time.time() - t0, 1),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
