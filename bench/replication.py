"""Replication: how far two honest runs of one task are apart, and what replicating costs.

Two parts, both on the CPU, both against a baseline measured in the same run:

``tolerance``: the real trainer trains the tiny model on one shard several times. Two runs with
the same seed and plan; the same seed at another micro-batch (what another card's memory plan
does, the same effective batch); another seed (an honest run of other work: what a replica that
did not repeat the task looks like); the first run scaled x50 and a random update of its size.
Each row prints the relative distance of the updates (coordinator.schedule.replication.distance) and the
training-loss gap; ``replica_tolerance`` and ``replica_loss_tolerance`` must separate the first
two from the rest.

``cost``: the real Scheduler, collect workflow, replica groups and Folder (a real tiny model),
with tests/fakes.py's FakeDispatcher standing in for Ray's cards: the same job runs with no
replication (the baseline), at the default 5 %, and at 5 % with one malicious volunteer of five
(it hands in every adapter scaled x50). Each row prints the tokens trained, the share of them
that were replica runs, and total compute against the baseline.

    python bench/replication.py             # ~3 minutes; last line is one JSON object
    python bench/replication.py --part cost --tasks 400
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fakes, tests.rig
from coordinator.collect import accept  # noqa: E402
from coordinator.schedule import replication
from coordinator.fold.folder import Folder  # noqa: E402
from coordinator.model.history import History  # noqa: E402
from coordinator.model.running import RunningModel  # noqa: E402
from coordinator.ledger.redis_server import EmbeddedRedis  # noqa: E402
from coordinator.schedule.replication import Replication  # noqa: E402
from coordinator.schedule.scheduler import Scheduler  # noqa: E402
from coordinator.schedule.transport import Need  # noqa: E402
from coordinator.model.store import BlobStore  # noqa: E402
from coordinator.collect.partial_uploads import PartialUploads  # noqa: E402
from nomoat import adapter as adapter_format  # noqa: E402
from nomoat.tiny import read_fortunes, tiny_model_path  # noqa: E402
from tests.fakes import FakeCard, FakeDispatcher  # noqa: E402
from tests.rig import ALPHA, RANK, TARGETS, Published, start, submit_job  # noqa: E402
from worker.trainer import LoraSpec, TrainSpec, train_adapter  # noqa: E402


# -- tolerance ----------------------------------------------------------------------------------


def tolerance(records: int) -> dict:
    texts = read_fortunes()[:records]
    lora = LoraSpec(rank=8, alpha=16.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    # The default job's task as a fold of 4 trains it: batch 8 / 4, at sqrt(4) x the lr.
    plan = TrainSpec(seq_len=128, batch_size=2, micro_batch=2, learning_rate=4e-3, seed=7)
    runs = {}
    for name, spec in (("honest", plan), ("same seed, same plan", plan),
                       ("same seed, micro-batch 1", replace(plan, micro_batch=1)),
                       ("another seed", replace(plan, seed=8))):
        runs[name] = train_adapter(tiny_model_path(), texts, lora, spec)
        print(f"trained {name}: {runs[name][1].steps} steps, {runs[name][1].tokens} tokens, "
              f"loss {runs[name][1].train_loss:.4f}", flush=True)
    base, base_result = runs.pop("honest")
    scaled = adapter_format.Adapter({m: (a, b * 50) for m, (a, b) in base.factors.items()}, base.rank, base.alpha)
    gen = torch.Generator().manual_seed(0)
    noise = {m: (torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen))
             for m, (a, b) in base.factors.items()}
    noise = adapter_format.Adapter(noise, base.rank, base.alpha)
    size = replication.folding.delta_norm(base) / replication.folding.delta_norm(noise)
    random = adapter_format.Adapter({m: (a * size ** 0.5, b * size ** 0.5) for m, (a, b) in noise.factors.items()},
                                    base.rank, base.alpha)
    rows = [{"run": name, "distance": replication.distance(base, a), "loss_gap": abs(r.train_loss - base_result.train_loss)}
            for name, (a, r) in runs.items()]
    rows += [{"run": "scaled x50", "distance": replication.distance(base, scaled), "loss_gap": None},
             {"run": "random, same norm", "distance": replication.distance(base, random), "loss_gap": None}]
    for row in rows:
        gap = "-" if row["loss_gap"] is None else f"{row['loss_gap']:.2e}"
        print(f"  {row['run']:<26} distance {row['distance']:.3e}   loss gap {gap}", flush=True)
    return {"steps": base_result.steps, "tokens": base_result.tokens, "rows": rows}


# -- cost ------------------------------------------------------------------------------------------


def result(shapes: dict, seed: int, scale: float) -> bytes:
    """An honest run's adapter is a function of its seed (as the trainer's is: see tolerance)."""
    gen = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(RANK, d_in, generator=gen) * 0.01, torch.randn(d_out, RANK, generator=gen) * 0.01 * scale)
               for m, (d_out, d_in) in sorted(shapes.items()) if m.rsplit(".", 1)[-1] in TARGETS}
    return adapter_format.to_bytes(adapter_format.Adapter(factors, rank=RANK, alpha=ALPHA))


def run_job(client: redis.Redis, published: Published, tmp: Path, texts: list[str], fraction: float,
            scales: dict[str, float]) -> dict:
    client.flushdb()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rig = start(client, published, tmp)
    try:
        settings = replace(rig.deps.settings, fold_every=4, fold_timeout_s=1e9, speculate=False, max_units_per_run=1,
                           replicate_fraction=fraction)
        people = {}
        for name, scale in scales.items():
            token = rig.registry.create("worker", name=name)
            identity = rig.registry.lookup(token)
            rig.ledger.workers.register(f"w-{name}", name=name, card=b"", token=identity.token_hash)
            people[f"w-{name}"] = (identity, scale)
        repl = Replication(settings, rig.ledger, rig.store)
        fold = Folder(settings, rig.ledger, rig.store, RunningModel(tiny_model_path()),
                      History(rig.ledger, rig.store, tmp))
        job = submit_job(rig, texts=texts).job_id
        partials = PartialUploads(tmp / "uploads")

        def upload(spec, worker_id: str) -> str:
            identity, scale = people[worker_id]
            data = result(rig.deps.shapes, spec.train.seed, scale)
            m = accept.Manifest(task_id=spec.task_id, fence=spec.fence, base_version=spec.base_version, rank=RANK,
                                 alpha=ALPHA, tokens=spec.tokens, train_loss=2.5,
                                 sha256=hashlib.sha256(data).hexdigest(), size=len(data), worker_id=worker_id)
            got = accept.upload(rig.ledger, rig.store, rig.deps.shapes, partials, identity, m, 0, [data],
                                 max_bytes=1 << 26, replication=repl)
            return "" if got.ok else got.detail

        fake = FakeDispatcher([FakeCard(f"node-{w}", 8.0, 300.0, worker=w) for w in people], upload=upload)
        scheduler = Scheduler(settings, rig.ledger, fake, "", lambda c: Need(1.0),
                              replication=repl)
        for _ in range(20000):
            idle = scheduler.tick(fake.now)
            fold.maybe_fold(idle, now=fake.now)
            for worker in people:
                rig.ledger.r.zadd("nomoat:workers", {worker: fake.now})
            if rig.ledger.jobs.get(job).state.value != "running":
                break
            fake.advance(1.0)
        record = rig.ledger.jobs.get(job)
        units = [(s.task_id, s.tokens) for run in fake.submitted for s in run.specs]
        trained = sum(t for _, t in units)
        replicas = sum(t for task, t in units if ".r" in task)
        groups = [g for g in (rig.ledger.replicas.get(t) for t in rig.ledger.tasks.ids(job)) if g]
        return {"tasks": record.total_tasks, "state": record.state.value, "tokens_trained": trained,
                "replica_tokens": replicas, "replicated_tasks": len(groups),
                "thirds": sum(1 for g in groups if len(g.runs) > 1),
                "folded": record.adapters_folded, "rejected": record.adapters_rejected}
    finally:
        rig.close()


def cost(tasks: int) -> dict:
    # tests/rig.JOB trains 300-token tasks; about 300 / 20 records a task.
    texts = [f"record {i}: {t}" for i, t in enumerate(read_fortunes() * 4)][: tasks * 6]
    model = RunningModel(tiny_model_path())
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        blobs = tmp / "v0"
        files = model.publish(BlobStore(blobs))
        shapes = {n: (m.out_features, m.in_features) for n, m in model.model.named_modules()
                  if isinstance(m, torch.nn.Linear)}
        published = Published(model, blobs, files, shapes)
        server = EmbeddedRedis(tmp / "redis")
        server.start()
        client = redis.Redis.from_url(server.url)
        honest = {n: 1.0 for n in ("alice", "bob", "carol", "dave")}
        rows = {}
        try:
            for name, fraction, scales in (("baseline (no replication)", 0.0, honest), ("5 %", 0.05, honest),
                                           ("5 %, one of five malicious", 0.05, {**honest, "mallory": 50.0})):
                rows[name] = row = run_job(client, published, tmp / "run", texts, fraction, scales)
                print(f"  {name:<28} {row['tasks']} tasks {row['state']}: {row['tokens_trained']} tokens trained, "
                      f"{row['replica_tokens']} in replicas ({row['replicated_tasks']} tasks replicated, "
                      f"{row['thirds']} thirds), {row['folded']} folded, {row['rejected']} rejected", flush=True)
        finally:
            client.close()
            server.stop()
    base = rows["baseline (no replication)"]["tokens_trained"]
    for row in rows.values():
        row["replica_share"] = row["replica_tokens"] / row["tokens_trained"]
        row["compute_vs_baseline"] = row["tokens_trained"] / base
        print(f"  replica share {row['replica_share']:.3f}, compute x{row['compute_vs_baseline']:.3f} of the baseline")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("tolerance", "cost", "both"), default="both")
    parser.add_argument("--records", type=int, default=400, help="tolerance: records in the shard")
    parser.add_argument("--tasks", type=int, default=200, help="cost: about this many tasks in the job")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = {}
    if args.part in ("tolerance", "both"):
        print("tolerance: two runs of one task on the CPU", flush=True)
        out["tolerance"] = tolerance(args.records)
    if args.part in ("cost", "both"):
        print("cost: one job on the scheduler with replication off, at 5 %, and at 5 % with a malicious volunteer",
              flush=True)
        out["cost"] = cost(args.tasks)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
