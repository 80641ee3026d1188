"""Benchmark: does folding adapters from many workers learn as well as one centralized LoRA?

The corpus is the demo corpus (``nomoat.tiny.read_demo``: ~1,950 fortunes about computers and
science), the base model the packaged tiny Llama (pretrained on other fortune categories). The
records are shuffled once (seed 0) and split three ways:

* **test** (10 %): the benchmark's measurement set; nothing trains on it, no gate looks at it;
* **validation** (the coordinator's ``validation_fraction``, at most ``max_validation_records``):
  what the coordinator's fold gates evaluate on, as after ``nomoat submit``;
* **train** (the rest, T tokens): cut into tasks by the coordinator's own ``split_tasks``.

**Distributed** (one process, the coordinator's loop simulated faithfully): ``--workers`` cards
with fixed, different speeds (tokens per simulated second, 2x apart) each take the next pending
task when free and train it (``worker.trainer.train_adapter``, the job's default LoRA and training
settings, seed = task index as the scheduler sends) on the version current when they took it, so
staleness arises from the ordering. A card takes its next task the moment its upload lands, before
the fold that upload may trigger. Adapters wait in a buffer; a fold happens when ``fold_every``
wait, when the oldest waited ``fold_timeout_s`` (simulated seconds) or when the job has nothing
else outstanding, exactly as ``coordinator.folder.Folder`` decides, and goes through the same
gates (staleness bound, norm against recent adapters, held-out loss of current + s(τ)·ΔW_i, then
the folded version against its parent with drop-the-worst retries) with ``fold_weights`` /
``build_patch`` / ``apply_patch`` on a ``coordinator.model.RunningModel``. Every published version
is saved as a model folder that later tasks train from.

**Centralized**: one LoRA with the same hyperparameters trained on all train records at once
(``train_adapter`` again, one run), added whole to the base.

    quality ratio = (L_test(base) − L_test(distributed)) / (L_test(base) − L_test(centralized))

The table varies ``tokens_per_task`` and ``fold_every`` (hence folds per T tokens) and the outer
step; the row marked ``*`` is the coordinator's defaults (``Settings``/``JobDefaults``), whose ratio
is ``quality_ratio``. Rows with one worker are the sequential reference: the same tasks one after
another, each a fresh LoRA on the version the one before produced (what fresh per-task adapters
reach with no parallelism at all). A second table repeats the comparison with ``--regime-epochs``
epochs per task on both sides, where the centralized run has (nearly) stopped improving.

**Stacked versus single**: the train set submitted ``--rounds`` times in a row (jobs one after
another, default settings): many folded versions whose patches together have rank far above one
adapter's, against a single LoRA of the same rank trained ``--rounds`` epochs on the same records
(same total tokens). ``stacked_vs_single_ratio`` > 1 means the stacked low-rank sum learned more.
The effective rank of W_final − W_base of one matrix is printed for both.

    python bench/quality.py [--device cpu|cuda] [--quick]

The last line is one JSON object (``quality_ratio``, ``stacked_vs_single_ratio``, the table, ...).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator import folding  # noqa: E402
from coordinator.model import RunningModel  # noqa: E402
from coordinator.settings import JobDefaults, Settings  # noqa: E402
from coordinator.submit import split_tasks  # noqa: E402
from nomoat.adapter import Adapter  # noqa: E402
from nomoat.tiny import read_demo, tiny_model_path  # noqa: E402
from worker.trainer import LoraSpec, TrainSpec, train_adapter  # noqa: E402

WORKER_SPEEDS = (400.0, 320.0, 260.0, 200.0)  # simulated tokens/s; more workers cycle these
PROBE_MODULE = "model.layers.1.mlp.down_proj"  # the matrix whose update's rank is printed


@dataclass(frozen=True)
class Loop:
    """What the simulated coordinator folds with (the fields of ``Settings`` that matter here)."""

    tokens_per_task: int
    fold_every: int
    fold_timeout_s: float
    max_staleness: int
    eval_epsilon: float
    adapter_epsilon: float
    norm_factor: float
    outer_momentum: float = 0.0
    outer_lr: float = 1.0
    outer_terms: int = 8

    @classmethod
    def defaults(cls, settings: Settings, job: JobDefaults) -> Loop:
        return cls(job.tokens_per_task, settings.fold_every, settings.fold_timeout_s,
                   settings.max_staleness, settings.eval_epsilon, settings.adapter_epsilon,
                   settings.norm_factor, settings.outer_momentum, settings.outer_lr, settings.outer_terms)


@dataclass
class Outcome:
    test_loss: float
    versions: int
    adapters: int
    rejected: int
    dropped: int
    taus: list[int] = field(default_factory=list)
    round_losses: list[float] = field(default_factory=list)  # test loss once each job is folded
    patch_rank: int = 0  # Σ of the published patches' ranks for PROBE_MODULE
    delta: torch.Tensor | None = None  # W_final − W_base of PROBE_MODULE
    seconds: float = 0.0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = args.device
        self.tmp = Path(tempfile.mkdtemp(prefix="nomoat-quality-"))
        self.base_dir = tiny_model_path()
        self.settings = Settings(data_dir=self.tmp)
        self.job = self.settings.job
        if args.lr:
            self.job = replace(self.job, learning_rate=args.lr)
        if args.batch_size:
            self.job = replace(self.job, batch_size=args.batch_size)
        self.lora = LoraSpec(rank=self.job.lora_rank, alpha=self.job.lora_alpha,
                             target_modules=tuple(self.job.target_modules))
        self.train_spec = TrainSpec(seq_len=self.job.seq_len, batch_size=self.job.batch_size,
                                    micro_batch=self.job.batch_size, learning_rate=self.job.learning_rate,
                                    epochs=self.job.epochs)

        records = read_demo()
        if args.records:
            records = records[: args.records]
        random.Random(0).shuffle(records)
        n_test = max(1, round(len(records) * args.test_fraction))
        rest = records[n_test:]
        n_val = round(len(rest) * self.settings.validation_fraction)
        n_val = max(1, min(n_val, self.settings.max_validation_records, len(rest) - 1))
        self.test, self.val, self.train = records[:n_test], rest[:n_val], rest[n_val:]
        # Count exactly as the coordinator does at submit (and as the trainer packs).
        running = RunningModel(self.base_dir, self.device)
        ids = running.tokenizer(self.train, add_special_tokens=False, split_special_tokens=True,
                                verbose=False)["input_ids"]
        self.counts = [len(i) + 1 for i in ids]
        self.total_tokens = sum(self.counts)
        self.base_test = running.eval_loss(self.test, self.job.seq_len)
        self.base_probe = running.master([PROBE_MODULE])[PROBE_MODULE].detach().clone().cpu()

    # -- the two sides ------------------------------------------------------------------------

    def centralized(self, epochs: int = 1, rank: int | None = None) -> Outcome:
        t0 = time.time()
        lora = self.lora if rank is None else replace(self.lora, rank=rank, alpha=self.lora.alpha * rank / self.lora.rank)
        adapter, _ = train_adapter(self.base_dir, self.train, lora, replace(self.train_spec, epochs=epochs, seed=0),
                                   device=self.device)
        running = RunningModel(self.base_dir, self.device)
        folding.fold(running.master(adapter.modules()), [adapter], [1.0])
        loss = running.eval_loss(self.test, self.job.seq_len)
        return Outcome(loss, 1, 1, 0, 0, patch_rank=lora.rank, delta=self._probe_delta(running),
                       seconds=time.time() - t0)

    def distributed(self, loop: Loop, rounds: int = 1, workers: int = 0, epochs: int = 0,
                    sequential: bool = False) -> Outcome:
        """The coordinator's asynchronous loop, simulated in order of (simulated) time.

        ``workers`` (default ``--workers``) cards; ``epochs`` (default the job's) per task, as a
        job submitted with ``--epochs`` trains each task's shard. ``sequential``: one card that
        starts its next task only once its last adapter is folded (the no-parallelism reference)."""
        t0 = time.time()
        spec = replace(self.train_spec, epochs=epochs or self.train_spec.epochs)
        ranges = split_tasks(self.counts, loop.tokens_per_task)
        tasks = []  # (job, index, texts, tokens): ``rounds`` jobs of the same records, in turn
        for job in range(rounds):
            for s, e in ranges:
                tasks.append((job, len(tasks), self.train[s:e], sum(self.counts[s:e])))
        running = RunningModel(self.base_dir, self.device)
        folders = {0: self.base_dir}
        version = 0
        pending = list(range(len(tasks)))[::-1]  # pop() takes the oldest
        in_flight: dict[int, int] = {}  # task -> base version
        events: list[tuple[float, int, int]] = []  # (finish time, worker, task)
        buffer: list[dict] = []  # oldest first
        recent_norms: list[float] = []
        previous_deltas: list[Adapter] = []  # newest first, for the outer optimizer
        out = Outcome(math.nan, 0, 0, 0, 0)
        speeds = [WORKER_SPEEDS[w % len(WORKER_SPEEDS)] for w in range(1 if sequential else workers or self.args.workers)]
        waiting: list[int] = []  # sequential: the card, until the fold

        def take(worker: int, now: float) -> None:
            if pending:
                task = pending.pop()
                in_flight[task] = version
                heapq.heappush(events, (now + tasks[task][3] / speeds[worker], worker, task))

        for w in range(len(speeds)):
            take(w, 0.0)
        while events or buffer:
            # The next thing that happens: an upload lands, or the oldest buffered adapter times out.
            timeout_at = buffer[0]["accepted"] + loop.fold_timeout_s if buffer else math.inf
            if events and events[0][0] <= timeout_at:
                now, worker, task = heapq.heappop(events)
                job, index, texts, _ = tasks[task]
                base = in_flight.pop(task)
                adapter, result = train_adapter(folders[base], texts, self.lora, replace(spec, seed=index),
                                                device=self.device)
                buffer.append({"adapter": adapter, "tokens": result.tokens, "base": base, "job": job,
                               "accepted": now})
                out.adapters += 1
                if sequential:
                    waiting.append(worker)
                else:
                    take(worker, now)  # the card starts its next task before the fold runs
            else:
                now = timeout_at
            idle_jobs = {j for j in {b["job"] for b in buffer}
                         if not any(tasks[t][0] == j for t in (*pending, *in_flight))}
            due = (len(buffer) >= loop.fold_every
                   or (buffer and now - buffer[0]["accepted"] >= loop.fold_timeout_s)
                   or any(b["job"] in idle_jobs for b in buffer))
            if due:
                entries, buffer = buffer[: max(loop.fold_every, 1) * 4], buffer[max(loop.fold_every, 1) * 4:]
                published = self._fold(running, loop, entries, version, recent_norms, previous_deltas, out)
                if published:
                    version += 1
                    folders[version] = self._save(running, version)
                    out.versions += 1
            while waiting:
                take(waiting.pop(), now)
            if due and rounds > 1:  # a job (round) with nothing outstanding: its test loss
                busy = {tasks[t][0] for t in (*pending, *in_flight)} | {b["job"] for b in buffer}
                while len(out.round_losses) < rounds and len(out.round_losses) not in busy:
                    out.round_losses.append(running.eval_loss(self.test, self.job.seq_len))
        out.test_loss = running.eval_loss(self.test, self.job.seq_len)
        out.delta = self._probe_delta(running)
        out.seconds = time.time() - t0
        for v, path in folders.items():
            if v:
                shutil.rmtree(path, ignore_errors=True)
        return out

    # -- one fold, as coordinator.folder.Folder.fold does it ----------------------------------

    def _fold(self, running: RunningModel, loop: Loop, entries: list[dict], current: int,
              recent_norms: list[float], previous_deltas: list[Adapter], out: Outcome) -> bool:
        seq_len = self.job.seq_len
        parent_loss = running.eval_loss(self.val, seq_len)
        candidates = []
        for e in entries:
            tau = current - e["base"]
            try:
                folding.fold_weights([e["tokens"]], [tau], loop.max_staleness)
                norm = folding.delta_norm(e["adapter"])
                folding.check_norm(norm, recent_norms[-64:], loop.norm_factor)
                solo = running.loss_with(e["adapter"], folding.staleness_factor(tau), self.val, seq_len)
                if solo > parent_loss + loop.adapter_epsilon:
                    raise folding.AdapterRejected(f"solo loss {solo:.4f} against {parent_loss:.4f}")
            except folding.AdapterRejected as exc:
                out.rejected += 1
                if self.args.verbose:
                    print(f"    rejected (tau {tau}): {exc}", flush=True)
                continue
            candidates.append({**e, "tau": tau, "norm": norm, "solo": solo})
        while candidates:
            weights = folding.fold_weights([c["tokens"] for c in candidates], [c["tau"] for c in candidates],
                                           loop.max_staleness)
            delta = folding.build_patch([c["adapter"] for c in candidates], weights)
            patch = folding.outer_step(delta, previous_deltas[: loop.outer_terms] if loop.outer_momentum else [],
                                       loop.outer_momentum, loop.outer_lr)
            modules = patch.modules()
            with running.restorable(modules) as checkpoint:
                folding.apply_patch(running.master(modules), patch)
                loss = running.eval_loss(self.val, seq_len)
                if loss <= parent_loss + loop.eval_epsilon:
                    checkpoint.keep()
                    recent_norms.extend(c["norm"] for c in candidates)
                    previous_deltas.insert(0, delta)
                    out.taus.extend(c["tau"] for c in candidates)
                    out.patch_rank += patch.factors[PROBE_MODULE][0].shape[0]
                    if self.args.verbose:
                        print(f"    v{current + 1}: {len(candidates)} adapters, taus "
                              f"{[c['tau'] for c in candidates]}, val {parent_loss:.4f} -> {loss:.4f}", flush=True)
                    return True
            worst = max(candidates, key=lambda c: c["solo"])
            candidates = [c for c in candidates if c is not worst]
            out.dropped += 1
        return False

    def _save(self, running: RunningModel, version: int) -> Path:
        path = self.tmp / f"v{version}"
        running.model.save_pretrained(path, safe_serialization=True)
        for f in self.base_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, path / f.name)
        return path

    def _probe_delta(self, running: RunningModel) -> torch.Tensor:
        return running.master([PROBE_MODULE])[PROBE_MODULE].detach().cpu() - self.base_probe

    def ratio(self, outcome: Outcome, reference: Outcome) -> float:
        return (self.base_test - outcome.test_loss) / (self.base_test - reference.test_loss)


def effective_rank(delta: torch.Tensor) -> tuple[int, float]:
    """(numerical rank at 1e-3 of the largest singular value, entropy effective rank)."""
    s = torch.linalg.svdvals(delta.double())
    numerical = int((s > s[0] * 1e-3).sum())
    p = s / s.sum()
    entropy = float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))
    return numerical, entropy


def run_table(bench: Bench, rows: list[tuple[Loop, int]], central: Outcome, defaults: Loop, epochs: int = 0) -> list[dict]:
    print(f"\n{'':2}{'tokens/task':>11} {'fold_every':>10} {'momentum':>8} {'outer_lr':>8} {'workers':>7} {'tasks':>5} "
          f"{'folds':>5} {'mean tau':>8} {'refused':>7} {'test loss':>9} {'ratio':>6} {'time':>5}", flush=True)
    table = []
    for loop, workers in rows:
        o = bench.distributed(loop, workers=workers, epochs=epochs, sequential=workers == 1)
        r = bench.ratio(o, central)
        is_default = loop == defaults and workers == bench.args.workers
        tau = sum(o.taus) / max(1, len(o.taus))
        print(f"{'*' if is_default else '':2}{loop.tokens_per_task:>11} {loop.fold_every:>10} {loop.outer_momentum:>8g} "
              f"{loop.outer_lr:>8g} {workers:>7} {o.adapters:>5} {o.versions:>5} {tau:>8.2f} {o.rejected + o.dropped:>7} "
              f"{o.test_loss:>9.4f} {r:>6.3f} {o.seconds:>4.0f}s", flush=True)
        table.append({"tokens_per_task": loop.tokens_per_task, "fold_every": loop.fold_every,
                      "outer_momentum": loop.outer_momentum, "outer_lr": loop.outer_lr, "workers": workers,
                      "tasks": o.adapters, "folds": o.versions, "mean_tau": round(tau, 2),
                      "refused": o.rejected + o.dropped, "test_loss": round(o.test_loss, 4), "ratio": round(r, 4),
                      "defaults": is_default})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="a few hundred records, defaults row only (~1 min)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="jobs stacked for stacked-vs-single")
    parser.add_argument("--records", type=int, default=0, help="use only the first N records (0: all)")
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--rows", default="",
                        help="extra table rows TOKENS_PER_TASK:FOLD_EVERY[:MOMENTUM[:OUTER_LR[:WORKERS]]],...")
    parser.add_argument("--regime-epochs", type=int, default=3,
                        help="second table: every task and the centralized run train this many epochs (1: skip)")
    parser.add_argument("--no-default-rows", action="store_true", help="table: the defaults row and --rows only")
    parser.add_argument("--no-stacked", action="store_true", help="skip stacked-vs-single")
    parser.add_argument("--lr", type=float, default=0.0, help="override the job's learning rate (both sides)")
    parser.add_argument("--batch-size", type=int, default=0, help="override the job's batch size (both sides)")
    parser.add_argument("--verbose", action="store_true", help="print every fold and refusal")
    args = parser.parse_args()
    if args.quick:
        args.records = args.records or 500
        args.rounds = min(args.rounds, 2)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" / "Writing model shards"
    t_start = time.time()

    bench = Bench(args)
    defaults = Loop.defaults(bench.settings, bench.job)
    if args.quick:  # a smoke run on a few hundred records: still at least one task per worker
        defaults = replace(defaults, tokens_per_task=min(defaults.tokens_per_task,
                                                         max(64, bench.total_tokens // args.workers)))
    print(f"corpus: {len(bench.train)} train records ({bench.total_tokens} tokens = T), "
          f"{len(bench.val)} validation (fold gates), {len(bench.test)} test; base test loss {bench.base_test:.4f}",
          flush=True)
    print(f"defaults: rank {bench.job.lora_rank}, alpha {bench.job.lora_alpha:g}, lr {bench.job.learning_rate:g}, "
          f"batch {bench.job.batch_size}x{bench.job.seq_len}, tokens_per_task {defaults.tokens_per_task}, "
          f"fold_every {defaults.fold_every}, max_staleness {defaults.max_staleness}; "
          f"{args.workers} workers at {[WORKER_SPEEDS[w % 4] for w in range(args.workers)]} tok/s", flush=True)

    central = bench.centralized()
    print(f"centralized LoRA on T tokens: test loss {central.test_loss:.4f} "
          f"(reduction {bench.base_test - central.test_loss:.4f}) [{central.seconds:.0f}s]", flush=True)

    # Rows: (loop, workers). One worker is the sequential reference: the same tasks trained one
    # after another, each a fresh LoRA on the version before (no parallelism, no staleness): the
    # most any folding of fresh per-task adapters can reach.
    rows = [(defaults, args.workers)]
    if not (args.quick or args.no_default_rows):
        rows = [(defaults, args.workers),
                (replace(defaults, tokens_per_task=16384), args.workers),
                (replace(defaults, tokens_per_task=8192), args.workers),
                (replace(defaults, tokens_per_task=8192, fold_every=1), args.workers),
                (replace(defaults, tokens_per_task=8192, outer_lr=2.0), args.workers),  # FedAvg server lr
                (replace(defaults, tokens_per_task=8192, outer_momentum=0.9, outer_lr=0.7), args.workers),  # DiLoCo
                (replace(defaults, fold_every=1), 1),
                (replace(defaults, tokens_per_task=8192, fold_every=1), 1)]
    for spec in filter(None, args.rows.split(",")):
        parts = spec.split(":")
        rows.append((replace(defaults, tokens_per_task=int(parts[0]), fold_every=int(parts[1]),
                             outer_momentum=float(parts[2]) if len(parts) > 2 else 0.0,
                             outer_lr=float(parts[3]) if len(parts) > 3 else 1.0),
                     int(parts[4]) if len(parts) > 4 else args.workers))
    table = run_table(bench, rows, central, defaults)
    quality = next(t["ratio"] for t in table if t["defaults"])
    print("(* = the coordinator's defaults; folds = published versions per T tokens; ratio = loss reduction / "
          "the centralized LoRA's; workers 1 = the tasks one after another, the sequential reference)", flush=True)

    # The same comparison where the centralized run has (nearly) stopped improving: every task, and
    # the centralized run, trains ``--regime-epochs`` epochs of its records.
    regime: dict = {}
    if args.regime_epochs > 1 and not args.quick:
        e = args.regime_epochs
        curve = {1: central, **{k: bench.centralized(epochs=k) for k in range(2, e + 1)}}
        print(f"\n{e} epochs per task (T = {e} x {bench.total_tokens} tokens): centralized test loss by epoch "
              + ", ".join(f"{k}: {o.test_loss:.4f}" for k, o in curve.items()), flush=True)
        regime_rows = [(defaults, args.workers), (replace(defaults, tokens_per_task=8192), args.workers),
                       (replace(defaults, fold_every=1), 1)]
        regime = {"epochs": e, "centralized_by_epoch": {k: round(o.test_loss, 4) for k, o in curve.items()},
                  "table": run_table(bench, regime_rows, curve[e], defaults, epochs=e)}

    stacked_ratio, stacked_info = math.nan, {}
    if not args.no_stacked:
        stacked = bench.distributed(defaults, rounds=args.rounds)
        single = bench.centralized(epochs=args.rounds)
        stacked_ratio = (bench.base_test - stacked.test_loss) / (bench.base_test - single.test_loss)
        s_rank, s_eff = effective_rank(stacked.delta)
        c_rank, c_eff = effective_rank(single.delta)
        shape = tuple(stacked.delta.shape)
        print(f"\nstacked: {args.rounds} rounds of the train set ({args.rounds}T tokens), defaults: {stacked.versions} "
              f"versions, test loss {stacked.test_loss:.4f} [{stacked.seconds:.0f}s]", flush=True)
        print(f"single rank-{bench.job.lora_rank} LoRA, {args.rounds} epochs ({args.rounds}T tokens): test loss "
              f"{single.test_loss:.4f} [{single.seconds:.0f}s]", flush=True)
        print("stacked test loss after each round: " + ", ".join(
            f"{k + 1}T {loss:.4f}" for k, loss in enumerate(stacked.round_losses)
        ) + f" (centralized on T: {central.test_loss:.4f})", flush=True)
        print(f"stacked_vs_single_ratio {stacked_ratio:.3f}", flush=True)
        print(f"{PROBE_MODULE} {shape}: W_final - W_base has rank {s_rank} (entropy effective rank {s_eff:.1f}; "
              f"patch ranks sum to {stacked.patch_rank}) stacked, rank {c_rank} (effective {c_eff:.1f}) single", flush=True)
        stacked_info = {"rounds": args.rounds, "versions": stacked.versions,
                        "round_test_losses": [round(x, 4) for x in stacked.round_losses],
                        "test_loss": round(stacked.test_loss, 4), "single_test_loss": round(single.test_loss, 4),
                        "probe_module": PROBE_MODULE, "rank": s_rank, "effective_rank": round(s_eff, 1),
                        "single_rank": c_rank, "single_effective_rank": round(c_eff, 1),
                        "patch_rank_sum": stacked.patch_rank}

    seconds = time.time() - t_start
    print(f"\nquality_ratio {quality:.3f} (target >= 0.95); total {seconds:.0f}s on {args.device}", flush=True)
    shutil.rmtree(bench.tmp, ignore_errors=True)
    print(json.dumps({
        "quality_ratio": round(quality, 4),
        "stacked_vs_single_ratio": None if math.isnan(stacked_ratio) else round(stacked_ratio, 4),
        "table": table,
        "base_test_loss": round(bench.base_test, 4),
        "centralized_test_loss": round(central.test_loss, 4),
        "train_tokens": bench.total_tokens,
        "workers": args.workers,
        "stacked": stacked_info,
        "regime": regime,
        "device": args.device,
        "seconds": round(seconds, 1),
    }))


if __name__ == "__main__":
    main()
