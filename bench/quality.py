"""Benchmark: does folding adapters from many workers learn as well as one run, and which levers win?

Everything trains for real (``worker.trainer.train_adapter``) on the packaged tiny Llama; the
coordinator's loop is simulated by :mod:`bench.qsim` (asynchronous workers of different speeds,
the folder's gates, ``fold_weights`` / ``build_patch`` / ``outer_step`` / ``apply_patch``). The
corpus's records are shuffled once and split into test (10 %, the measurement), validation (the
fold gates) and train (T tokens). All figures of one invocation use the same split and T.

Baselines, each at the job's learning rate and at its best of ×0.5, ×1, ×2, ×4 of it:

* **centralized**: one LoRA, the job's batch b, T/b steps;
* **data-parallel**: one LoRA, batch K·b, T/(K·b) steps (what K cards training in lockstep reach).

    ratio = (L_test(base) − L_test(row)) / (L_test(base) − L_test(reference))

Parts (``--parts``, run side by side with ``--jobs``):

* ``baselines`` and ``levers`` (the one-pass table): the baselines; one row per lever on one pass
  over the data: the coordinator before issue 10 (batch b per task, weights over Σ n_j);
  *keep the global batch* (task batch b/K, K× the steps, same tokens per
  task, lr ×1 or ×2); LoRA+ (``lr_b_ratio`` 16, 4); warm starts (the worker's previous adapter and
  its Adam moments; the job's latest folded factors); staleness normalisation (Σ n_j s(τ_j));
  gradient-aligned starts (LoRA-GA: each task's own, or one per version shared by its tasks) and
  PiSSA starts (the version's top-r SVD), each at the task lr and lower (``TrainSpec.init``);
  and the recommended row, which is the coordinator's defaults (``Settings`` and its
  ``FoldPolicy``: what a user gets), whose ratios are ``quality_ratio`` and
  ``quality_vs_dataparallel``.
* ``many``: ``--passes`` passes over the data in small tasks (≥ 30 folded versions): the
  recommended levers with plain averaging, and the coordinator before issue 10. The centralized run is converged there (its loss by epoch is
  printed), so the recommended row against it is ``quality_converged``; against one LoRA of the
  same rank at the job's lr for as many epochs it is ``stacked_vs_single_ratio`` (the seed idea:
  stacked low-rank updates learn more than one LoRA on the same tokens).
* ``outer``: the many-rounds regime with DiLoCo's outer Nesterov step (μ 0.9, outer lr 0.1, 0.3,
  1.0), against the ``many`` part's references.
* ``corpus``: the key ratios again on a corpus this project did not write (``--corpus2``,
  default ``python-docs``: the Language Reference topics CPython ships in ``pydoc_data``).
* ``sweep``: around the recommended row on ``--corpus``, one lever at a time: the task lr
  multiplier (x1.5, x3, x4 against the defaults' x2), ``fold_every`` (2, 8 against 4), tokens per
  task (1536, 6144 against ``--task-tokens``).
* ``few``: a small job (3 tasks of ``--few-records`` records, 64-token blocks, 3 workers), folded
  one by one and together: before issue 10's partial folds every adapter of it was refused.

``--rows a,b`` runs only the rows whose label holds one of the strings. The one-pass and
second-corpus parts also have a row that sizes each task's batch from the job's
gradient noise scale (``Settings.size_from_noise``; the B_noise column is the estimate).

    python bench/quality.py [--records N] [--jobs 3] [--device cpu|cuda] [--quick]

The last line is one JSON object (``quality_ratio``, ``quality_vs_dataparallel``,
``quality_converged``, ``stacked_vs_single_ratio``, every table).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.qsim import PROBE_MODULE, Bench, Loop, Outcome, coordinator_settings, effective_rank  # noqa: E402
from coordinator.settings import JobDefaults, Settings  # noqa: E402

LR_SWEEP = (0.5, 1.0, 2.0, 4.0)
OUTER_LRS = (0.1, 0.3, 1.0)
# The 'sweep' part, around the recommended row (lr x2, fold_every 4, --task-tokens per task).
SWEEP_LR_MULTS = (1.5, 3.0, 4.0)
SWEEP_FOLD_EVERY = (2, 8)
SWEEP_TASK_TOKENS = (1536, 6144)  # DiLoCo's outer Nesterov (momentum 0.9) in the many-rounds part
# The recommended row is the coordinator's defaults (Settings, JobDefaults and the FoldPolicy built
# from them: qsim.Loop.defaults), so what this measures is what a user gets. Measured
# (bench/README.md): keep the global batch at lr x2 (sqrt(K), K = 4) with normalised staleness
# weights and fresh adapters; the job's warm start gained ~0.04 in one pass but lost 0.3 over many
# rounds, LoRA+ and Nesterov did not help.


def before_issue_10(loop: Loop) -> Loop:
    """The coordinator's defaults before issue 10: every task at the job's batch and lr, and
    staleness weights over Σ n_j."""
    return loop.with_policy(keep_global_batch=False, normalise=False)


def say(part: str, text: str) -> None:
    print(f"[{part}] {text}", flush=True)


def sweep(bench: Bench, part: str, name: str, batch: int, epochs: int = 1,
          mults: tuple[float, ...] = LR_SWEEP) -> dict[float, Outcome]:
    out = {}
    for m in mults:
        out[m] = bench.centralized(epochs=epochs, batch=batch, lr_mult=m)
        say(part, f"{name} batch {batch}, {epochs} epoch(s), lr x{m:g}: test loss {out[m].test_loss:.4f} "
                  f"[{out[m].seconds:.0f}s]")
    return out


def best(outcomes: dict[float, Outcome]) -> tuple[float, Outcome]:
    return min(outcomes.items(), key=lambda kv: kv[1].test_loss)


def run_rows(bench: Bench, part: str, rows: list[tuple[str, Loop]], refs: dict[str, Outcome],
             rounds: int = 1, workers: int = 0) -> list[dict]:
    say(part, f"{'row':34} {'tok/task':>8} {'batch':>5} {'tasks':>5} {'folds':>5} {'tau':>5} {'refused':>7} "
              f"{'loss':>7} " + " ".join(f"{k:>12}" for k in refs) + "  B_noise  time")
    table = []
    wanted = [w for w in bench.args.rows.split(",") if w]
    for label, loop in rows:
        if wanted and not any(w in label for w in wanted):
            continue
        o = bench.distributed(loop, rounds=rounds, workers=workers)
        ratios = {k: round(bench.ratio(o, ref), 4) for k, ref in refs.items()}
        tau = sum(o.taus) / max(1, len(o.taus))
        sized = loop.training(bench.train_spec.batch_size, bench.train_spec.learning_rate, workers or bench.args.workers)
        # The batch the tasks trained at (the last one's, when the noise scale sized them).
        batch = o.batches[-1] if o.batches else sized.batch_size
        say(part, f"{label:34} {loop.tokens_per_task:>8} {batch:>5} {o.adapters:>5} {o.versions:>5} {tau:>5.2f} "
                  f"{o.rejected + o.dropped:>7} {o.test_loss:>7.4f} "
                  + " ".join(f"{r:>12.3f}" for r in ratios.values()) + f"  {o.noise_scale:>7.3g}  {o.seconds:.0f}s"
                  + (f"  (init {o.init_seconds:.1f}s = {o.init_seconds / max(1e-9, o.train_seconds - o.init_seconds):.0%}"
                     f" of training)" if o.init_seconds else ""))
        table.append({"row": label, "loop": asdict(loop), "task_batch": batch,
                      "task_batches": sorted(set(o.batches)), "noise_scale": round(o.noise_scale, 3),
                      "lr_mult": round(sized.learning_rate / bench.train_spec.learning_rate, 4),
                      "tasks": o.adapters, "folds": o.versions,
                      "mean_tau": round(tau, 2), "refused": o.rejected + o.dropped,
                      "test_loss": round(o.test_loss, 4), "ratios": ratios,
                      "init_cost": round(o.init_seconds / max(1e-9, o.train_seconds - o.init_seconds), 4),
                      "round_test_losses": [round(x, 4) for x in o.round_losses],
                      "outcome": o if rounds > 1 else None})
    return table


def setup(args: argparse.Namespace, corpus: str) -> tuple[Bench, Loop, int]:
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    bench = Bench(args, corpus)
    defaults = Loop.defaults(bench.settings, bench.job)
    k = args.workers
    # Fewer records than the corpus: one task per worker at least, as on the full corpus.
    defaults = replace(defaults, tokens_per_task=min(defaults.tokens_per_task, max(64, bench.total_tokens // k)))
    return bench, defaults, k


def header(bench: Bench, part: str, corpus: str) -> None:
    say(part, f"corpus {corpus}: {len(bench.train)} train records (T = {bench.total_tokens} tokens), "
              f"{len(bench.val)} validation, {len(bench.test)} test; base test loss {bench.base_test:.4f}; "
              f"job: rank {bench.job.lora_rank}, lr {bench.job.learning_rate:g}, batch {bench.job.batch_size}"
              f"x{bench.job.seq_len}")


def recommended(defaults: Loop, tokens: int) -> Loop:
    """The coordinator's defaults, at ``tokens`` per task."""
    return replace(defaults, tokens_per_task=tokens)


def recommended_levers(settings: Settings, job: JobDefaults, workers: int) -> dict:
    """What the recommended row trains and folds with, read from the policy (for the JSON)."""
    defaults = Loop.defaults(settings, job)
    sized = defaults.training(job.batch_size, job.learning_rate, workers)
    return {"keep_global_batch": defaults.policy.keep_global_batch, "task_batch": sized.batch_size,
            "lr_mult": round(sized.learning_rate / job.learning_rate, 4),
            "normalise": defaults.policy.normalise, "outer_momentum": defaults.policy.outer_momentum,
            "warm": defaults.warm, "lr_b_ratio": defaults.lr_b_ratio}


def part_baselines(args: argparse.Namespace) -> dict:
    part = "baselines"
    bench, defaults, k = setup(args, args.corpus)
    header(bench, part, args.corpus)
    b = bench.job.batch_size
    mults = (1.0,) if args.quick else LR_SWEEP
    central = sweep(bench, part, "centralized", b, mults=mults)
    dp = sweep(bench, part, "data-parallel", k * b, mults=mults)
    return {"corpus": args.corpus, "train_tokens": bench.total_tokens, "base_test_loss": bench.base_test,
            "centralized": {m: o.test_loss for m, o in central.items()},
            "data_parallel": {m: o.test_loss for m, o in dp.items()}}


def part_levers(args: argparse.Namespace) -> dict:
    """One row per lever, one pass over the data; ratios are computed against the baselines part."""
    part = "levers"
    bench, defaults, k = setup(args, args.corpus)
    b = bench.job.batch_size
    t = args.task_tokens
    old = before_issue_10(defaults)
    kgb = replace(old, tokens_per_task=t, task_batch=max(1, b // k), lr_mult=1.0)
    rows = [("before issue 10 (batch b)", old),
            ("before issue 10, small tasks", replace(old, tokens_per_task=t)),
            ("keep global batch (b/K), lr x1", kgb),
            ("keep global batch, lr x2", replace(kgb, lr_mult=2.0)),
            # LoRA+ keeps B's rate at the row above's (x2) and lowers A's: B at x2 x 4 or x 16 refuses
            # every adapter (measured: the solo gate sees each one diverge).
            ("  LoRA+ 4 (A x0.5, B x2)", replace(kgb, lr_mult=0.5, lr_b_ratio=4.0)),
            ("  LoRA+ 16 (A x0.125, B x2)", replace(kgb, lr_mult=0.125, lr_b_ratio=16.0)),
            ("  + warm start (worker's own + moments)", replace(kgb, lr_mult=2.0, warm="worker")),
            ("  + warm start (worker's own, no moments)", replace(kgb, lr_mult=2.0, warm="worker-fresh-adam")),
            ("  + warm start (job's last fold)", replace(kgb, lr_mult=2.0, warm="job")),
            ("  + batch from the noise scale", recommended(defaults, t).with_policy(size_from_noise=True)),
            ("  + LoRA-GA init (each task's own)", replace(recommended(defaults, t), init="gradient")),
            ("  + LoRA-GA init (shared per version)", replace(recommended(defaults, t), init="gradient-shared")),
            # With B₀ ≠ 0 both factors move ΔW from the first step: a larger effective step than a
            # fresh LoRA's at the same lr, so the same rows at a lower task lr.
            ("  + LoRA-GA init (own), task lr x1", replace(recommended(defaults, t), init="gradient", lr_mult=1.0)),
            ("  + LoRA-GA init (own), task lr x0.5", replace(recommended(defaults, t), init="gradient", lr_mult=0.5)),
            ("  + LoRA-GA init (shared), task lr x0.5",
             replace(recommended(defaults, t), init="gradient-shared", lr_mult=0.5)),
            ("  + PiSSA init (the version's top-r SVD)", replace(recommended(defaults, t), init="principal")),
            ("  + PiSSA init, task lr x0.5", replace(recommended(defaults, t), init="principal", lr_mult=0.5)),
            ("recommended (coordinator defaults)", recommended(defaults, t))]
    if args.quick:
        rows = [rows[0], rows[-4], rows[-1]]
    table = run_rows(bench, part, rows, {})
    return {"table": [{k2: v for k2, v in r.items() if k2 != "outcome"} for r in table]}


def onepass(base: dict, levers: dict) -> dict:
    """The one-pass table: every lever row against the four baselines."""
    central, dp = base["centralized"], base["data_parallel"]
    cm, dm = min(central, key=central.get), min(dp, key=dp.get)
    refs = {"central x1": central[1.0], "central best": central[cm], "dp x1": dp[1.0], "dp best": dp[dm]}

    def ratio(loss: float, ref: float) -> float:
        return round((base["base_test_loss"] - loss) / (base["base_test_loss"] - ref), 4)

    print(f"\none pass, T = {base['train_tokens']} tokens ({base['corpus']}); base test loss "
          f"{base['base_test_loss']:.4f}", flush=True)
    for name, losses in (("centralized (batch b)", central), ("data-parallel (batch K*b)", dp)):
        print(f"  {name}: " + ", ".join(f"lr x{m:g} {x:.4f}" for m, x in losses.items()), flush=True)
    print(f"  best lr: centralized x{cm:g}, data-parallel x{dm:g}; data-parallel / centralized "
          f"{ratio(dp[1.0], central[1.0]):.3f} (same lr), {ratio(dp[dm], central[cm]):.3f} (best lr)", flush=True)
    print(f"  {'row':34} {'tok/task':>8} {'batch':>5} {'tasks':>5} {'folds':>5} {'tau':>5} {'loss':>7} "
          + " ".join(f"{k:>12}" for k in refs), flush=True)
    for row in levers["table"]:
        row["ratios"] = {k: ratio(row["test_loss"], ref) for k, ref in refs.items()}
        loop = row["loop"]
        print(f"  {row['row']:34} {loop['tokens_per_task']:>8} {row['task_batch']:>5} {row['tasks']:>5} "
              f"{row['folds']:>5} {row['mean_tau']:>5.2f} {row['test_loss']:>7.4f} "
              + " ".join(f"{r:>12.3f}" for r in row["ratios"].values()), flush=True)
    rec, today = levers["table"][-1]["ratios"], levers["table"][0]["ratios"]
    return {**base, "best_lr_mult": {"centralized": cm, "data_parallel": dm}, "table": levers["table"],
            "quality_ratio": rec["central best"], "quality_ratio_same_lr": rec["central x1"],
            "quality_vs_dataparallel": rec["dp best"], "quality_vs_dataparallel_same_lr": rec["dp x1"],
            "quality_ratio_today": today["central best"], "quality_vs_dataparallel_today": today["dp best"]}


def part_many(args: argparse.Namespace) -> dict:
    part = "many"
    bench, defaults, k = setup(args, args.corpus)
    header(bench, part, args.corpus)
    p = args.passes
    # Epochs 1 and p only (the baselines part has epoch 1 too; the CPU is scarce).
    curve = {e: bench.centralized(epochs=e) for e in sorted({1, p})}
    say(part, "centralized (lr x1) test loss by epochs: " + ", ".join(f"{e}: {o.test_loss:.4f}" for e, o in curve.items()))
    central2 = bench.centralized(epochs=p, lr_mult=0.5)
    say(part, f"centralized {p} epochs, lr x0.5: {central2.test_loss:.4f}")
    cbest = min((curve[p], central2), key=lambda o: o.test_loss)
    refs = {"single x1": curve[p], "central best": cbest}
    rec = recommended(defaults, args.many_task_tokens)
    rows = [("recommended", rec),
            ("before issue 10 (stacked rounds)", before_issue_10(defaults))]
    if args.quick:
        rows = [rows[0], rows[-1]]
    table = run_rows(bench, part, rows, refs, rounds=p)
    o: Outcome = table[0]["outcome"]
    s_rank, s_eff = effective_rank(o.delta)
    c_rank, c_eff = effective_rank(curve[p].delta)
    say(part, f"recommended, loss after each pass: {table[0]['round_test_losses']}")
    say(part, f"{PROBE_MODULE}: W_final - W_base rank {s_rank} (effective {s_eff:.1f}, patch ranks sum to "
              f"{o.patch_rank}) folded, rank {c_rank} (effective {c_eff:.1f}) single LoRA")
    return {"passes": p, "base_test_loss": bench.base_test,
            "refs": {k2: o2.test_loss for k2, o2 in refs.items()},
            "centralized_by_epoch": {e: round(x.test_loss, 4) for e, x in curve.items()},
            "centralized_lr_half": round(central2.test_loss, 4),
            "table": [{k2: v for k2, v in r.items() if k2 != "outcome"} for r in table],
            "quality_converged": table[0]["ratios"]["central best"],
            "stacked_vs_single_ratio": table[0]["ratios"]["single x1"],
            "rank": s_rank, "effective_rank": round(s_eff, 1), "single_effective_rank": round(c_eff, 1)}


def part_outer(args: argparse.Namespace) -> dict:
    """The many-rounds regime again with DiLoCo's outer Nesterov step (momentum 0.9, ``OUTER_LRS``);
    its ratios are taken against the 'many' part's references (:func:`outer_ratios`)."""
    part = "outer"
    bench, defaults, _ = setup(args, args.corpus)
    rec = recommended(defaults, args.many_task_tokens)
    rows = [(f"  + Nesterov 0.9, outer lr {lr:g}", rec.with_policy(outer_momentum=0.9, outer_lr=lr))
            for lr in OUTER_LRS if not (args.no_nesterov_1 and lr == 1.0)]
    table = run_rows(bench, part, rows, {}, rounds=args.passes)
    return {"table": [{k2: v for k2, v in r.items() if k2 != "outcome"} for r in table]}


def outer_ratios(many: dict, outer: dict) -> list[dict]:
    """The outer-momentum rows against the many-rounds references (same split, same T)."""
    base = many["base_test_loss"]
    for row in outer["table"]:
        row["ratios"] = {k: round((base - row["test_loss"]) / (base - ref), 4) for k, ref in many["refs"].items()}
        print(f"  {row['row']:34} folds {row['folds']:>3} refused {row['refused']:>3} losses by pass "
              f"{row['round_test_losses']} " + " ".join(f"{k} {r:.3f}" for k, r in row["ratios"].items()), flush=True)
    return outer["table"]


def part_corpus(args: argparse.Namespace) -> dict:
    part = "corpus"
    bench, defaults, k = setup(args, args.corpus2)
    header(bench, part, args.corpus2)
    b = bench.job.batch_size
    mults = (1.0,) if args.quick else (1.0, 2.0)
    central = sweep(bench, part, "centralized", b, mults=mults)
    dp = sweep(bench, part, "data-parallel", k * b, mults=mults)
    refs = {"central x1": central[1.0], "central best": best(central)[1], "dp best": best(dp)[1]}
    rec = recommended(defaults, args.task_tokens)
    rows = [("before issue 10", before_issue_10(defaults)), ("recommended", rec),
            ("  + batch from the noise scale", rec.with_policy(size_from_noise=True)),
            ("  + LoRA-GA init (each task's own)", replace(rec, init="gradient")),
            ("  + LoRA-GA init (shared per version)", replace(rec, init="gradient-shared")),
            ("  + LoRA-GA init (own), task lr x1", replace(rec, init="gradient", lr_mult=1.0)),
            ("  + LoRA-GA init (own), task lr x0.5", replace(rec, init="gradient", lr_mult=0.5)),
            ("  + LoRA-GA init (shared), task lr x0.5", replace(rec, init="gradient-shared", lr_mult=0.5)),
            ("  + PiSSA init (the version's top-r SVD)", replace(rec, init="principal")),
            ("  + PiSSA init, task lr x0.5", replace(rec, init="principal", lr_mult=0.5))]
    table = run_rows(bench, part, rows, refs)
    by_label = {r["row"]: r["ratios"] for r in table}  # --rows may have left some out

    def ratio(label: str, ref: str) -> float:
        return by_label.get(label, {}).get(ref, math.nan)

    return {"corpus": args.corpus2, "train_tokens": bench.total_tokens,
            "table": [{k2: v for k2, v in r.items() if k2 != "outcome"} for r in table],
            "quality_ratio": ratio("recommended", "central best"),
            "quality_vs_dataparallel": ratio("recommended", "dp best"),
            "quality_ratio_today": ratio("before issue 10", "central best"),
            "noise_sizing_ratio": ratio("  + batch from the noise scale", "central best")}


def part_few(args: argparse.Namespace) -> dict:
    """A small job: 3 tasks (each a third of ``--few-records`` records) on 3 workers, 64-token
    blocks, as bench/hetero's "equal" variant. Folded one by one (each adapter's fold times out
    before the next lands) its adapters were all refused before issue 10's partial folds."""
    part = "few"
    few = argparse.Namespace(**{**vars(args), "records": args.few_records, "workers": 3})
    bench, defaults, _ = setup(few, args.corpus)
    bench.job = replace(bench.job, seq_len=64)
    bench.train_spec = replace(bench.train_spec, seq_len=64)
    bench.base_test = bench.base_loss(64)
    header(bench, part, args.corpus)
    central = bench.centralized()
    say(part, f"centralized (batch {bench.job.batch_size}, lr x1): test loss {central.test_loss:.4f}")
    per = math.ceil(bench.total_tokens * 0.95 / 3)
    rec = replace(defaults, tokens_per_task=per)
    alone = rec.with_policy(fold_timeout_s=1.0)  # each adapter folds by itself
    rows = [("one by one, before (b/4, whole steps)", replace(alone, task_batch=2, lr_mult=2.0)
             .with_policy(partial_folds=False)),
            ("one by one, recommended (b/3, m/K)", alone),
            ("folded together, recommended", rec)]
    table = run_rows(bench, part, rows, {"central x1": central}, workers=3)
    return {"train_tokens": bench.total_tokens, "centralized": round(central.test_loss, 4),
            "table": [{k2: v for k2, v in r.items() if k2 != "outcome"} for r in table],
            "few_tasks_ratio": table[1]["ratios"]["central x1"]}


def part_sweep(args: argparse.Namespace) -> dict:
    """A cheap sweep around the recommended row on ``--corpus``: the task lr multiplier (keep the
    global batch), ``fold_every`` and tokens per task, one lever at a time. Ratios: against the
    baselines of the same corpus and split (bench/README.md)."""
    part = "sweep"
    bench, defaults, _ = setup(args, args.corpus)
    header(bench, part, args.corpus)
    rec = recommended(defaults, args.task_tokens)
    rows = [("recommended", rec)]
    rows += [(f"  lr x{m:g}", replace(rec, lr_mult=m)) for m in SWEEP_LR_MULTS]
    rows += [(f"  fold_every {f}", rec.with_policy(fold_every=f)) for f in SWEEP_FOLD_EVERY]
    rows += [(f"  {t} tokens per task", recommended(defaults, t)) for t in SWEEP_TASK_TOKENS]
    table = run_rows(bench, part, rows, {})
    return {"corpus": args.corpus, "train_tokens": bench.total_tokens, "base_test_loss": bench.base_test,
            "table": [{k2: v for k2, v in r.items() if k2 != "outcome"} for r in table]}


PARTS = {"baselines": part_baselines, "levers": part_levers, "many": part_many, "outer": part_outer,
         "corpus": part_corpus, "few": part_few,
         "sweep": part_sweep}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="400 records, few rows: a smoke run")
    parser.add_argument("--parts", default="baselines,levers,many,outer,corpus,few", help="which parts, comma-separated")
    parser.add_argument("--few-records", type=int, default=150, help="records of the 'few' part's small job")
    parser.add_argument("--jobs", type=int, default=1, help="parts run side by side in this many processes")
    parser.add_argument("--corpus", default="demo", help="demo or python-docs")
    parser.add_argument("--corpus2", default="python-docs", help="the corpus of the 'corpus' part")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--records", type=int, default=0, help="use N records of each corpus (0: all)")
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process on the CPU")
    parser.add_argument("--task-tokens", type=int, default=4096, help="tokens per task of the lever rows")
    parser.add_argument("--passes", type=int, default=3, help="passes over the data in the 'many' part")
    parser.add_argument("--many-task-tokens", type=int, default=1536, help="tokens per task in the 'many' part")
    parser.add_argument("--no-nesterov-1", action="store_true", help="'many' part: skip outer lr 1.0")
    parser.add_argument("--lr", type=float, default=0.0, help="override the job's learning rate")
    parser.add_argument("--batch-size", type=int, default=0, help="override the job's batch size")
    parser.add_argument("--rows", default="", help="run only the rows whose label holds one of these "
                        "comma-separated strings (default: all)")
    parser.add_argument("--verbose", action="store_true", help="print every fold and refusal")
    args = parser.parse_args()
    if args.quick:
        args.records = args.records or 400
        args.passes = min(args.passes, 2)
    t0 = time.time()
    names = [n for n in args.parts.split(",") if n]
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {n: pool.submit(PARTS[n], args) for n in names}
        results = {n: f.result() for n, f in futures.items()}
    one = onepass(results["baselines"], results["levers"]) if {"baselines", "levers"} <= set(results) else {}
    many, other, few = results.get("many", {}), results.get("corpus", {}), results.get("few", {})
    if many and "outer" in results:
        print(f"\nmany rounds with outer Nesterov (references: {many['refs']})", flush=True)
        many["outer"] = outer_ratios(many, results["outer"])
    seconds = time.time() - t0
    print(f"\nquality_ratio {one.get('quality_ratio', math.nan):.3f} (target >= 0.90), quality_vs_dataparallel "
          f"{one.get('quality_vs_dataparallel', math.nan):.3f} (>= 1.0), quality_converged "
          f"{many.get('quality_converged', math.nan):.3f} (>= 0.97), stacked_vs_single_ratio "
          f"{many.get('stacked_vs_single_ratio', math.nan):.3f} (>= 1.0); {other.get('corpus', '')} quality_ratio "
          f"{other.get('quality_ratio', math.nan):.3f}; a 3-task job folded one by one "
          f"{few.get('few_tasks_ratio', math.nan):.3f} of centralized; {seconds:.0f}s on {args.device}", flush=True)
    print(json.dumps({
        "quality_ratio": one.get("quality_ratio"),
        "quality_vs_dataparallel": one.get("quality_vs_dataparallel"),
        "quality_converged": many.get("quality_converged"),
        "stacked_vs_single_ratio": many.get("stacked_vs_single_ratio"),
        "recommended": recommended_levers(*coordinator_settings(args, Path("unused")), args.workers),
        "workers": args.workers, "records": args.records,
        "few_tasks_ratio": few.get("few_tasks_ratio"),
        "onepass": one, "many": many, "second_corpus": other, "few": few, "sweep": results.get("sweep", {}),
        "device": args.device, "seconds": round(seconds, 1),
    }, default=str))


if __name__ == "__main__":
    main()
