"""Benchmark: does folding adapters from many workers learn as well as one run, and which levers win?

Everything trains for real (``worker.trainer.train_adapter``) on the packaged tiny Llama, and
every distributed row folds through the product's own ``coordinator.fold.folder.Folder`` (a real
Redis ledger, blob store, history and on-coordinator evaluator; :mod:`bench.qsim` simulates only
the cards and their clock). The corpus's records are shuffled once; 10 % are the test set (the
measurement), the rest is submitted as the job (the coordinator holds its own validation slice,
which the fold gates read, and trains on the other records: T tokens). Each row runs with
``--seeds`` training seeds (task i trains with seed i + 1000·s; the baselines with seed s) on the
same split; every ratio is given as its mean over seeds and a 95 % t-interval.

    ratio = (L_test(base) − L_test(row)) / (L_test(base) − L_test(reference)), per seed

References, each at the job's lr times x1, x2, x4 (the best multiplier by its seed mean):

* **centralized**: one LoRA, the job's batch b, T/b steps;
* **data-parallel**: one LoRA, batch K·b, T/(K·b) steps (K cards in lockstep at K times the batch).

Parts (``--parts``; each corpus of ``--corpora`` and each seed is one unit, run side by side with
``--jobs``):

* ``onepass``: the baselines, and one pass over the data in tasks of ``--task-tokens``, 4 cards:
  the recommended row (the coordinator's defaults: ``quality_ratio``, ``quality_vs_dataparallel``),
  the two controls that take the gap apart, and the levers of issue 21:

  - control (a): one card trains a fresh LoRA on K tasks' tokens at the job's batch and lr
    (x2, x4), folded alone, then the next: the cost of restarting LoRA and Adam every fold;
  - control (b): synchronous data-parallel at exactly the centralized run's global batch, lr and
    schedule (K cards each taking b/K sequences of every step, gradients averaged: the
    trainer's gradient accumulation, ``micro_batch`` = b/K);
  - WSD: one learning-rate schedule across the job's tasks (warm up over the first 10 %, cool
    down over the last 30 %) instead of each task at one lr;
  - the outer step γ (``outer_lr``) 1.25, 1.5, 2 without momentum; Nesterov momentum 0.5;
  - the task lr beyond sqrt(K) (x3), alone and with γ; a lower one with a larger γ;
  - every row also reads out the average of its newest 2 and 3 versions (LAWA) and an EMA over
    versions (decay 0.5): what publishing an average would give, on the same tokens.

* ``many``: ``--passes`` passes over the data in tasks of ``--many-task-tokens``: the recommended
  row against the centralized run for as many epochs (x1: ``stacked_vs_single_ratio``; best of
  x1 and x0.5: ``quality_converged``).

    python bench/quality.py [--records 600] [--seeds 3] [--jobs 2] [--corpora demo,python-docs]

The last line is one JSON object: ``quality_ratio``, ``quality_vs_dataparallel`` (demo, seed
means), ``quality_ratio_ci``, ``quality_ratio_python_docs``, ``quality_vs_dataparallel_python_docs``,
``quality_converged``, ``stacked_vs_single_ratio``, and every table. ``--out DIR`` keeps each
unit's result as it finishes; ``--collect`` rebuilds the tables from such a DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.qsim import PROBE_MODULE, Bench, Loop, Outcome, effective_rank  # noqa: E402

LR_SWEEP = (1.0, 2.0, 4.0)  # sessions 3-5: the best centralized and data-parallel lr was x2 (x4 at the edge)
CONTROL_B_LR = 2.0  # control (b) is the centralized run's arithmetic: one lr shows it
# Two-sided 95 % Student t quantiles by degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def interval(values: list[float]) -> dict:
    """Mean and 95 % t-interval half-width over seeds."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": math.nan, "ci": math.nan, "n": 0}
    mean = statistics.fmean(values)
    half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return {"mean": round(mean, 4), "ci": round(half, 4), "n": len(values), "values": [round(v, 4) for v in values]}


def say(unit: str, text: str) -> None:
    print(f"[{unit}] {text}", flush=True)


def recommended(bench: Bench, tokens: int) -> Loop:
    """The coordinator's defaults (Settings and its FoldPolicy), at ``tokens`` per task."""
    return replace(Loop.defaults(bench.settings, bench.job), tokens_per_task=tokens)


def onepass_rows(bench: Bench, tokens: int, k: int) -> list[tuple[str, Loop]]:
    rec = recommended(bench, tokens)
    control_a = replace(rec, tokens_per_task=k * tokens, sequential=True).with_policy(
        keep_global_batch=False, fold_every=1)
    # In the order they matter, so that a run cut short still has the headline and the controls.
    return [("recommended", rec),
            ("control (a): one card, fresh LoRA per fold, lr x2", replace(control_a, lr_mult=2.0)),
            ("outer step 1.5", rec.with_policy(outer_lr=1.5)),
            ("WSD (warm up 10 %, cool down 30 %)", replace(rec, warmup=0.1, cooldown=0.3)),
            ("outer step 2", rec.with_policy(outer_lr=2.0)),
            ("outer step 1.25", rec.with_policy(outer_lr=1.25)),
            ("Nesterov 0.5, outer step 1", rec.with_policy(outer_momentum=0.5)),
            ("task lr x3", replace(rec, lr_mult=3.0)),
            ("task lr x1.5, outer step 1.5", replace(rec, lr_mult=1.5).with_policy(outer_lr=1.5)),
            ("control (a): one card, fresh LoRA per fold, lr x4", replace(control_a, lr_mult=4.0))]


def row_record(label: str, o: Outcome) -> dict:
    return {"row": label, "test_loss": round(o.test_loss, 5), "averaged": {k: round(v, 5) for k, v in o.averaged.items()},
            "tasks": o.adapters, "folds": o.versions, "refused": o.refused,
            "mean_tau": round(sum(o.taus) / max(1, len(o.taus)), 2), "task_batch": o.batches[-1] if o.batches else 0,
            "round_test_losses": [round(x, 5) for x in o.round_losses], "seconds": round(o.seconds, 1)}


def setup(args: argparse.Namespace, corpus: str) -> Bench:
    # A unit stopped with SIGTERM still stops its embedded redis-server (Bench.close, in finally),
    # then its process exits (run_unit): a pool worker would take SystemExit as the unit's result
    # and go on to the next unit.
    signal.signal(signal.SIGTERM, stop)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return Bench(args, corpus)


def unit_onepass(args: argparse.Namespace, corpus: str, seed: int) -> dict:
    """The baselines and every one-pass row for one corpus and seed (kept after each row)."""
    unit = f"onepass {corpus} s{seed}"
    bench = setup(args, corpus)
    try:
        k, b = args.workers, bench.job.batch_size
        say(unit, f"{len(bench.train)} train records (T = {bench.total_tokens} tokens), {len(bench.val)} "
                  f"validation, {len(bench.test)} test; base test loss {bench.base_test:.4f}")
        wanted = [w for w in args.rows.split(",") if w]
        out = {"corpus": corpus, "seed": seed, "base_test_loss": bench.base_test, "train_tokens": bench.total_tokens,
               "centralized": {}, "data_parallel": {}, "control_b": {}, "rows": []}
        if not args.skip_baselines:
            for m in (float(x) for x in args.lr_mults.split(",")):
                for name, batch, micro in (("centralized", b, 0), ("data_parallel", k * b, 0),
                                           ("control_b", b, max(1, b // k))):
                    if name == "control_b" and m != CONTROL_B_LR:
                        continue
                    o = bench.centralized(batch=batch, lr_mult=m, seed=seed, micro=micro)
                    out[name][m] = o.test_loss
                    say(unit, f"{name} batch {batch} (micro {micro or batch}), lr x{m:g}: {o.test_loss:.4f} "
                              f"[{o.seconds:.0f}s]")
            keep(args, "onepass", out)
        for label, loop in onepass_rows(bench, args.task_tokens, k):
            if wanted and not any(w in label for w in wanted):
                continue
            o = bench.distributed(loop, seed=seed)
            out["rows"].append(row_record(label, o))
            keep(args, "onepass", out)
            say(unit, f"{label:44} tasks {o.adapters:>3} folds {o.versions:>2} refused {o.refused:>2} "
                      f"loss {o.test_loss:.4f} averaged {', '.join(f'{n} {v:.4f}' for n, v in o.averaged.items())} "
                      f"[{o.seconds:.0f}s]")
        return out
    finally:
        bench.close()


def unit_many(args: argparse.Namespace, corpus: str, seed: int) -> dict:
    unit = f"many {corpus} s{seed}"
    bench = setup(args, corpus)
    try:
        p = args.passes
        if args.many_task_lr:  # rows only, at these task lr multipliers (the references: another --out)
            extra = []
            for m in (float(x) for x in args.many_task_lr.split(",") if x):
                o = bench.distributed(replace(recommended(bench, args.many_task_tokens), lr_mult=m), rounds=p, seed=seed)
                extra.append(row_record(f"task lr x{m:g}", o))
                say(unit, f"task lr x{m:g}, {p} passes: tasks {o.adapters} folds {o.versions} refused {o.refused} loss "
                          f"{o.test_loss:.4f} by pass {[round(x, 4) for x in o.round_losses]} averaged {o.averaged} "
                          f"[{o.seconds:.0f}s]")
            return {"corpus": corpus, "seed": seed, "passes": p, "base_test_loss": bench.base_test, "extra_rows": extra}
        # x1 always (stacked_vs_single_ratio); quality_converged takes the best of the sweep.
        # --many-references-only: only the listed multipliers (to widen a sweep kept in another
        # --out folder, merged by --collect).
        mults = sorted({*([] if args.many_references_only else [1.0]),
                        *(float(m) for m in args.many_lr_mults.split(",") if m)})
        runs = {m: bench.centralized(epochs=p, lr_mult=m, seed=seed) for m in mults}
        say(unit, f"centralized {p} epochs: " + ", ".join(f"lr x{m:g} {o.test_loss:.4f}" for m, o in runs.items()))
        if args.many_references_only:
            return {"corpus": corpus, "seed": seed, "passes": p, "base_test_loss": bench.base_test,
                    "single": {m: o.test_loss for m, o in runs.items()}}
        single = runs[1.0]
        o = bench.distributed(recommended(bench, args.many_task_tokens), rounds=p, seed=seed)
        rank, eff = effective_rank(o.delta)
        _, single_eff = effective_rank(single.delta)
        say(unit, f"recommended, {p} passes: tasks {o.adapters} folds {o.versions} refused {o.refused} loss "
                  f"{o.test_loss:.4f} by pass {[round(x, 4) for x in o.round_losses]} averaged {o.averaged}; "
                  f"{PROBE_MODULE} update rank {rank} (effective {eff:.1f}; single LoRA {single_eff:.1f}) [{o.seconds:.0f}s]")
        return {"corpus": corpus, "seed": seed, "passes": p, "base_test_loss": bench.base_test,
                "single_x1": single.test_loss, "single": {m: o.test_loss for m, o in runs.items()},
                "single_x05": runs[0.5].test_loss if 0.5 in runs else None, "row": row_record("recommended", o),
                "rank": rank, "effective_rank": round(eff, 1), "single_effective_rank": round(single_eff, 1)}
    finally:
        bench.close()


UNITS = {"onepass": unit_onepass, "many": unit_many}


def ratio(base: float, loss: float, ref: float) -> float:
    return (base - loss) / (base - ref)


def summarize_onepass(units: list[dict]) -> dict:
    """Per corpus: the references (best lr by seed mean) and every row's ratios with intervals."""
    units = sorted((u for u in units if CONTROL_B_LR in u["data_parallel"] and CONTROL_B_LR in u["centralized"]),
                   key=lambda u: u["seed"])  # a unit cut short before its baselines has no ratios
    if not units:
        return {}
    mean_of = lambda name, m: statistics.fmean(u[name][m] for u in units)  # noqa: E731
    # The multipliers every seed measured (a later invocation may have left x1 out).
    mults = sorted(set.intersection(*(set(u["centralized"]) & set(u["data_parallel"]) for u in units)))
    cm = min(mults, key=lambda m: mean_of("centralized", m))
    dm = min(mults, key=lambda m: mean_of("data_parallel", m))
    refs = {u["seed"]: {"central": u["centralized"][cm], "dp": u["data_parallel"][dm]} for u in units}
    summary = {"corpus": units[0]["corpus"], "seeds": [u["seed"] for u in units], "train_tokens": units[0]["train_tokens"],
               "base_test_loss": units[0]["base_test_loss"], "best_lr": {"centralized": cm, "data_parallel": dm},
               "centralized": {m: interval([u["centralized"][m] for u in units]) for m in mults},
               "data_parallel": {m: interval([u["data_parallel"][m] for u in units]) for m in mults},
               "dp_vs_central": interval([ratio(u["base_test_loss"], refs[u["seed"]]["dp"], refs[u["seed"]]["central"])
                                          for u in units]),
               # control (b) against the centralized run at the same lr (the same global batch and schedule)
               "control_b": interval([ratio(u["base_test_loss"], u["control_b"][CONTROL_B_LR],
                                            u["centralized"][CONTROL_B_LR]) for u in units if u["control_b"]]),
               "rows": []}
    labels = list(dict.fromkeys(r["row"] for u in units for r in u["rows"]))
    for label in labels:
        per = [(u, next(r for r in u["rows"] if r["row"] == label)) for u in units
               if any(r["row"] == label for r in u["rows"])]
        entry = {"row": label, "seeds": [u["seed"] for u, _ in per], "folds": [r["folds"] for _, r in per], "tasks": per[0][1]["tasks"],
                 "refused": [r["refused"] for _, r in per], "test_loss": interval([r["test_loss"] for _, r in per])}
        for ref in ("central", "dp"):
            entry[f"vs_{ref}"] = interval([ratio(u["base_test_loss"], r["test_loss"], refs[u["seed"]][ref]) for u, r in per])
        for avg in per[0][1]["averaged"]:
            entry[f"{avg}_vs_central"] = interval([ratio(u["base_test_loss"], r["averaged"][avg], refs[u["seed"]]["central"])
                                                   for u, r in per])
        summary["rows"].append(entry)
    # Each row against the recommended row, paired by seed (the seeds share the split, the
    # references and the tasks' data order, so the paired difference resolves more than two
    # intervals side by side): the rule a lever is adopted by.
    rec = next((r for r in summary["rows"] if r["row"] == "recommended"), None)
    for entry in summary["rows"]:
        if rec is None or entry is rec:
            continue
        seeds = [s for s in entry["seeds"] if s in rec["seeds"]]
        entry["minus_recommended"] = interval([entry["vs_central"]["values"][entry["seeds"].index(s)]
                                               - rec["vs_central"]["values"][rec["seeds"].index(s)] for s in seeds])
    return summary


def decomposition(summary: dict) -> dict:
    """What share of the recommended row's gap to the best centralized run each control explains,
    paired by seed (the seeds both the recommended row and control (a) ran)."""
    rows = {r["row"]: r for r in summary["rows"]}
    rec = rows.get("recommended")
    if rec is None:
        return {}
    best = summary["best_lr"]["centralized"]
    a = (rows.get(f"control (a): one card, fresh LoRA per fold, lr x{float(best):g}")
         or rows.get("control (a): one card, fresh LoRA per fold, lr x2"))
    out = {"gap": round(1 - rec["vs_central"]["mean"], 4), "control_b": summary["control_b"],
           "sync_share": 0.0 if summary["control_b"].get("mean") == 1.0 else None}
    if a:
        seeds = [s for s in a["seeds"] if s in rec["seeds"]]
        r_rec = [rec["vs_central"]["values"][rec["seeds"].index(s)] for s in seeds]
        r_a = [a["vs_central"]["values"][a["seeds"].index(s)] for s in seeds]
        out.update({"paired_seeds": seeds, "control_a_row": a["row"],
                    "gap_paired": interval([1 - x for x in r_rec]),
                    "restart_cost": interval([1 - x for x in r_a]),
                    "parallel_cost": interval([x - y for x, y in zip(r_a, r_rec)]),
                    "restart_share": round(statistics.fmean(1 - x for x in r_a)
                                           / statistics.fmean(1 - x for x in r_rec), 3)})
    return out


def print_onepass(s: dict) -> None:
    print(f"\none pass, {s['corpus']}: T = {s['train_tokens']} tokens, base {s['base_test_loss']:.4f}, seeds {s['seeds']}; "
          f"best lr centralized x{s['best_lr']['centralized']}, data-parallel x{s['best_lr']['data_parallel']}", flush=True)
    for name in ("centralized", "data_parallel"):
        print(f"  {name}: " + ", ".join(f"x{m} {v['mean']:.4f}±{v['ci']:.4f}" for m, v in s[name].items()), flush=True)
    print(f"  data-parallel (K·b) / centralized {fmt(s['dp_vs_central'])}; control (b) {fmt(s['control_b'])}", flush=True)
    print(f"  {'row':44} {'folds':>9} {'refused':>9} {'vs central':>16} {'vs DP':>16} {'- recommended':>16} "
          f"{'LAWA-2':>16} {'EMA':>16}", flush=True)
    for r in s["rows"]:
        print(f"  {r['row']:44} {r['folds']!s:>9} {r['refused']!s:>9} {fmt(r['vs_central']):>16} {fmt(r['vs_dp']):>16} "
              f"{fmt(r.get('minus_recommended')):>16} {fmt(r.get('lawa2_vs_central')):>16} "
              f"{fmt(r.get('ema_vs_central')):>16}", flush=True)
    print(f"  decomposition: {json.dumps(s.get('decomposition', {}))}", flush=True)


def fmt(v: dict | None) -> str:
    return f"{v['mean']:.3f}±{v['ci']:.3f}" if v else "-"


def summarize_many(units: list[dict]) -> dict:
    base = lambda u: u["base_test_loss"]  # noqa: E731
    # The best centralized multiplier by its seed mean (the references of the one-pass part work
    # the same way); units before session 7 kept x1 and x0.5 only.
    for u in units:
        u.setdefault("single", {1.0: u["single_x1"], 0.5: u["single_x05"]})
        u["single"] = {float(m): v for m, v in u["single"].items()}
    mults = sorted(set.intersection(*(set(u["single"]) for u in units)))
    best_m = min(mults, key=lambda m: statistics.fmean(u["single"][m] for u in units))
    best = lambda u: u["single"][best_m]  # noqa: E731
    # Rows at another task lr (--many-task-lr), over the seeds that ran them.
    extra = {}
    for label in dict.fromkeys(r["row"] for u in units for r in u.get("extra_rows", [])):
        per = [(u, r) for u in units for r in u.get("extra_rows", []) if r["row"] == label]
        extra[label] = {"seeds": [u["seed"] for u, _ in per], "refused": [r["refused"] for _, r in per],
                        "test_loss": interval([r["test_loss"] for _, r in per]),
                        "by_pass": [r["round_test_losses"] for _, r in per],
                        "converged": interval([ratio(base(u), r["test_loss"], best(u)) for u, r in per]),
                        "minus_recommended": interval([ratio(base(u), r["test_loss"], best(u))
                                                       - ratio(base(u), u["row"]["test_loss"], best(u)) for u, r in per])}
    return {"best_lr": best_m, "single": {m: interval([u["single"][m] for u in units]) for m in mults},
            "other_task_lr": extra,
            "recommended_test_loss": interval([u["row"]["test_loss"] for u in units]),
            "corpus": units[0]["corpus"], "passes": units[0]["passes"], "seeds": [u["seed"] for u in units],
            "folds": [u["row"]["folds"] for u in units], "refused": [u["row"]["refused"] for u in units],
            "quality_converged": interval([ratio(base(u), u["row"]["test_loss"], best(u)) for u in units]),
            "stacked_vs_single_ratio": interval([ratio(base(u), u["row"]["test_loss"], u["single_x1"]) for u in units]),
            "lawa2_converged": interval([ratio(base(u), u["row"]["averaged"]["lawa2"], best(u)) for u in units
                                         if "lawa2" in u["row"]["averaged"]]),
            "ema_converged": interval([ratio(base(u), u["row"]["averaged"]["ema"], best(u)) for u in units
                                       if "ema" in u["row"]["averaged"]]),
            "by_pass": [u["row"]["round_test_losses"] for u in units],
            "effective_rank": [u["effective_rank"] for u in units],
            "single_effective_rank": [u["single_effective_rank"] for u in units]}


def collect(results: list[dict], kinds: list[str]) -> dict:
    tables: dict = {"onepass": {}, "many": {}}
    for kind in ("onepass", "many"):
        for corpus in sorted({r["corpus"] for k, r in zip(kinds, results) if k == kind}):
            units = [r for k, r in zip(kinds, results) if k == kind and r["corpus"] == corpus]
            if kind == "onepass":
                s = summarize_onepass(units)
                if not s:
                    continue
                s["decomposition"] = decomposition(s)
                print_onepass(s)
            else:
                units = [u for u in units if "row" in u]  # a references-only unit has no row of its own
                if not units:
                    continue
                s = summarize_many(units)
                print(f"\n{s['passes']} passes, {corpus}: centralized " + ", ".join(
                    f"x{m:g} {v['mean']:.4f}±{v['ci']:.4f}" for m, v in s["single"].items())
                      + f" (best x{s['best_lr']:g}); recommended {s['recommended_test_loss']['mean']:.4f}", flush=True)
                print(f"  quality_converged {fmt(s['quality_converged'])}, "
                      f"stacked_vs_single {fmt(s['stacked_vs_single_ratio'])}, LAWA-2 {fmt(s['lawa2_converged'])}, "
                      f"EMA {fmt(s['ema_converged'])}; folds {s['folds']} refused {s['refused']}", flush=True)
                for label, r in s["other_task_lr"].items():
                    print(f"  {label}: seeds {r['seeds']} converged {fmt(r['converged'])} "
                          f"(− recommended {fmt(r['minus_recommended'])}), by pass {r['by_pass']}", flush=True)
            tables[kind][corpus] = s
    return tables


def headline(tables: dict) -> dict:
    def rec(corpus: str, key: str) -> dict:
        rows = tables["onepass"].get(corpus, {}).get("rows", [])
        return next((r[key] for r in rows if r["row"] == "recommended"), {"mean": None, "ci": None})

    many = tables["many"].get("demo", {})
    many_docs = tables["many"].get("python-docs", {})
    return {"quality_ratio": rec("demo", "vs_central")["mean"], "quality_ratio_ci": rec("demo", "vs_central")["ci"],
            "quality_vs_dataparallel": rec("demo", "vs_dp")["mean"],
            "quality_vs_dataparallel_ci": rec("demo", "vs_dp")["ci"],
            "quality_converged": many.get("quality_converged", {}).get("mean"),
            "quality_converged_ci": many.get("quality_converged", {}).get("ci"),
            "stacked_vs_single_ratio": many.get("stacked_vs_single_ratio", {}).get("mean"),
            "quality_converged_python_docs": many_docs.get("quality_converged", {}).get("mean"),
            "quality_converged_python_docs_ci": many_docs.get("quality_converged", {}).get("ci"),
            "quality_ratio_python_docs": rec("python-docs", "vs_central")["mean"],
            "quality_ratio_python_docs_ci": rec("python-docs", "vs_central")["ci"],
            "quality_vs_dataparallel_python_docs": rec("python-docs", "vs_dp")["mean"]}


def keep(args: argparse.Namespace, kind: str, result: dict) -> None:
    """Write a unit's result (so far) to ``--out``."""
    if args.out:
        corpus = re.sub(r"[^A-Za-z0-9_.-]+", "-", result["corpus"]).strip("-")  # text:/a/b -> text-a-b
        path = Path(args.out) / f"{kind}-{corpus}-s{result['seed']}.json"
        path.write_text(json.dumps({"kind": kind, **result}, default=str))


def merged(folders: list[Path]) -> tuple[list[str], list[dict]]:
    """The units kept in ``folders`` (``--out`` of one or more invocations), one per (part,
    corpus, seed): the baselines and rows of all, each lr multiplier and row label once."""
    units: dict[tuple, dict] = {}
    for path in (p for folder in folders for p in sorted(folder.glob("*.json"))):
        unit = json.loads(path.read_text())
        for name in ("centralized", "data_parallel", "control_b"):  # JSON keys are strings
            if name in unit:
                unit[name] = {float(m): v for m, v in unit[name].items()}
        key = (unit["kind"], unit["corpus"], unit["seed"])
        if key not in units:
            units[key] = unit
            continue
        have = units[key]
        for name in ("centralized", "data_parallel", "control_b"):
            have[name] = {**have.get(name, {}), **unit.get(name, {})}
        for name in ("base_test_loss", "train_tokens"):
            have.setdefault(name, unit.get(name))
        if unit["kind"] == "onepass":
            labels = {r["row"] for r in have["rows"]}
            have["rows"] += [r for r in unit["rows"] if r["row"] not in labels]
        else:  # many: a references-only unit widens the sweep of the unit with the row
            have["single"] = {**unit.get("single", {}), **have.get("single", {})}
            labels = {r["row"] for r in have.get("extra_rows", [])}
            have["extra_rows"] = have.get("extra_rows", []) + [r for r in unit.get("extra_rows", [])
                                                               if r["row"] not in labels]
            for name, value in unit.items():
                have.setdefault(name, value)
    return [k for k, _, _ in units], [{k: v for k, v in u.items() if k != "kind"} for u in units.values()]


def from_logs(logs: list[Path], out: Path) -> None:
    """Unit files in ``out`` from the reference losses a stopped invocation printed (its units
    write their baselines only once all are measured)."""
    units: dict[tuple, dict] = {}
    head = re.compile(r"\[onepass (\S+) s(\d+)\] \d+ train records \(T = (\d+) tokens\).*base test loss ([\d.]+)")
    line_re = re.compile(r"\[onepass (\S+) s(\d+)\] (centralized|data_parallel|control_b) batch \d+ "
                         r"\(micro \d+\), lr x([\d.]+): ([\d.]+)")
    for log in logs:
        for line in log.read_text().splitlines():
            if m := head.match(line):
                unit = units.setdefault((m[1], int(m[2])), {"kind": "onepass", "corpus": m[1], "seed": int(m[2]),
                                                            "centralized": {}, "data_parallel": {},
                                                            "control_b": {}, "rows": []})
                unit.update(base_test_loss=float(m[4]), train_tokens=int(m[3]))
            elif m := line_re.match(line):
                units[(m[1], int(m[2]))][m[3]][float(m[4])] = float(m[5])
    out.mkdir(parents=True, exist_ok=True)
    for unit in units.values():
        (out / f"onepass-{unit['corpus']}-s{unit['seed']}.json").write_text(json.dumps(unit))


STOPPED = False


def stop(*_: object) -> None:
    global STOPPED
    STOPPED = True
    sys.exit(143)


def run_unit(args: argparse.Namespace, kind: str, corpus: str, seed: int) -> dict:
    try:
        result = UNITS[kind](args, corpus, seed)
    finally:
        if STOPPED:  # the unit has cleaned up (its finally); leave the pool rather than take the next unit
            os._exit(143)
    keep(args, kind, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--parts", default="onepass,many", help="which parts, comma-separated (onepass, many)")
    parser.add_argument("--corpora", default="demo,python-docs", help="the corpora of the onepass part")
    parser.add_argument("--many-corpora", default="demo", help="the corpora of the many part")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per row")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="units run side by side in this many processes")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--records", type=int, default=600, help="use N records of each corpus (0: all)")
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process on the CPU")
    parser.add_argument("--task-tokens", type=int, default=3072, help="tokens per task of the one-pass rows")
    parser.add_argument("--passes", type=int, default=3, help="passes over the data in the 'many' part")
    parser.add_argument("--many-lr-mults", default="1,0.5", help="the many part's centralized lr multipliers "
                        "(x1 always runs: stacked_vs_single_ratio; quality_converged: the best by seed mean)")
    parser.add_argument("--many-references-only", action="store_true", help="many: only the centralized runs "
                        "at --many-lr-mults (for --collect)")
    parser.add_argument("--many-task-lr", default="", help="many: only rows at these task lr multipliers of "
                        "the job's lr (instead of the policy's sqrt(K)), for --collect")
    parser.add_argument("--many-task-tokens", type=int, default=1024, help="tokens per task in the 'many' part")
    parser.add_argument("--lr", type=float, default=0.0, help="override the job's learning rate")
    parser.add_argument("--batch-size", type=int, default=0, help="override the job's batch size")
    parser.add_argument("--lr-mults", default=",".join(f"{m:g}" for m in LR_SWEEP),
                        help="the baselines' lr multipliers (include 2: control (b) runs there)")
    parser.add_argument("--rows", default="", help="run only the rows whose label holds one of these "
                        "comma-separated strings (default: all)")
    parser.add_argument("--skip-baselines", action="store_true", help="onepass: rows only (for --collect)")
    parser.add_argument("--out", default="", help="write each unit's result here as it finishes")
    parser.add_argument("--from-logs", default="", help="write --out unit files from the printed references "
                        "of these logs (comma-separated) of stopped invocations")
    parser.add_argument("--collect", default="", help="only rebuild the tables from --out folders (comma-separated)")
    args = parser.parse_args()
    t0 = time.time()
    if args.from_logs:
        from_logs([Path(p) for p in args.from_logs.split(",")], Path(args.out or "quality-logs"))
        return
    if args.collect:
        kinds, results = merged([Path(d) for d in args.collect.split(",") if d])
    else:
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        parts = [p for p in args.parts.split(",") if p]
        unknown = sorted(set(parts) - set(UNITS))
        if unknown:
            raise SystemExit(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(UNITS)}")
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        plan = [(kind, corpus, s) for s in seeds for kind in parts
                for corpus in (args.corpora if kind == "onepass" else args.many_corpora).split(",") if corpus]
        plan.sort(key=lambda u: (u[2] > args.first_seed, u[0] == "many"))  # every first seed first
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(run_unit, args, *unit) for unit in plan]
            results = [f.result() for f in futures]
        kinds = [kind for kind, _, _ in plan]
    tables = collect(results, kinds)
    head = headline(tables)
    seconds = time.time() - t0
    print(f"\n{json.dumps(head)}; {seconds:.0f}s on {args.device}", flush=True)
    print(json.dumps({**head, "onepass": tables["onepass"], "many": tables["many"], "workers": args.workers,
                      "records": None if args.collect else args.records, "device": args.device, "seconds": round(seconds, 1)}, default=str))


if __name__ == "__main__":
    main()
