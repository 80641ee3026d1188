"""Benchmark: the shard proof (issue 19, item 5): how often it refuses honest adapters, how often
it lets dishonest ones through, and what it costs a fold.

Everything trains for real (``worker.trainer.train_adapter``) on the packaged tiny Llama, on both
corpora (``demo``, the packaged fortunes, and ``python-docs``, bench/qsim.py). Each corpus is
shuffled, its first 5 % (at most 256 records, as ``submit`` does) is the job's held-out slice, the
rest is split into tasks of ``--task-tokens`` tokens (several sizes: the corpora hold ~130k tokens
each, 4 tasks at the default 32768). Tasks are trained as the coordinator sizes them
(``FoldPolicy.task_training``: the job's batch / K at the scaled lr, K = 4) in rounds of K from the
current version, gated there, and folded (``FoldPolicy.weights``), ``--passes`` times over the
data with new seeds, so most adapters are gated on a model that already holds earlier folds.

For each honest adapter, with its parent on the same blocks (``nomoat.evaluation.paired``):

* **honest**: its held-out comparison and its own shard sample (``evaluation.recent_sample``, the
  folder's draw: from the last ``--windows`` tokens its trainer saw, replaying its seeded order;
  window 0 draws from the whole shard, as session 6 did), judged by ``FoldPolicy.learned_from_shard``;
* **other-shard** (a copycat's adapter: another volunteer's, which learned another shard of the
  same job): the adapter judged against the next task's shard;
* **other-data**: an adapter of the other corpus judged against this task's shard;
* **random**: random factors of the adapter's rank scaled to its update norm (a free-rider that
  passes the norm gate), judged against its shard;
* **scaled**: the adapter's own update times 50.

Each is judged twice: against the **parent** (the current model: the session 6 rule, what the
folder still does for an adapter alone in its fold) and against its **peers** (the mean update of
the round's other adapters, each 1/(K-1): what the folder does when a fold has other adapters of
the job; text every adapter learned alike cancels block by block). ``z = gap / SE`` is printed
for each, so other margins can be read off. Cost: tokens and seconds of the shard proof's
evaluations (parent: the version and the candidate on each sample; peers: the reference on the
held-out set and on the sample, the candidate on the sample) against the existing gates' (the
version's held-out parent once per fold, each adapter's solo held-out, the fold check), at the
product's budget and window.

    python bench/shardproof.py [--quick] [--passes 2] [--task-tokens 8192,32768] [--windows 0,4096]

The last line is JSON: for ``parent`` and ``peers`` each, ``false_refusal_rate`` (honest, at the
product's budget and window, margin ``--sigma``), ``dishonest_pass_rate`` per kind,
``extra_eval_tokens_per_fold``, ``extra_eval_seconds_per_fold``, ``extra_cost_ratio``; and the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.qsim import read_corpus
from coordinator.fold import folding
from coordinator.fold.policy import FoldPolicy
from coordinator.model.running import RunningModel
from coordinator.schedule.submit import split_tasks
from coordinator.settings import Settings
from nomoat import evaluation, lora, packing
from nomoat.adapter import Adapter
from nomoat.tiny import tiny_model_path
from worker.trainer import LoraSpec, TrainSpec, train_adapter

KINDS = ("honest", "other-shard", "other-data", "random", "scaled")


@dataclass
class Judged:
    kind: str
    corpus: str
    task_tokens: int
    budget: int
    window: int  # the sample is drawn from the last-trained this many tokens (0: the whole shard)
    held: tuple[float, float]  # candidate - parent on the held-out slice, its paired SE
    shard: tuple[float, float]  # the same on the shard sample
    # candidate - its peers' mean update (the round's other adapters) on the same blocks: the
    # proof against peers instead of the parent (None: a round of one)
    held_peer: tuple[float, float] | None = None
    shard_peer: tuple[float, float] | None = None

    def sides(self, peers: bool) -> tuple[tuple[float, float], tuple[float, float]]:
        """Against its peers where it has any, else against the parent (as the folder judges)."""
        return (self.held_peer, self.shard_peer) if peers and self.held_peer is not None else (self.held, self.shard)

    def z(self, peers: bool = False) -> float:
        """The gap (held-out difference - shard difference) in its standard errors."""
        held, shard = self.sides(peers)
        gap = held[0] - shard[0]
        se = math.hypot(*(x for x in (held[1], shard[1]) if math.isfinite(x)))
        return gap / se if se > 0 else (math.inf if gap > 0 else -math.inf)

    def passes(self, sigmas: float, peers: bool = False) -> bool:
        held, shard = self.sides(peers)
        try:
            FoldPolicy(shard_sigmas=sigmas).learned_from_shard(evaluation.Comparison(0.0, held[0], held[1], 0),
                                                               evaluation.Comparison(0.0, shard[0], shard[1], 0))
            return True
        except folding.AdapterRejected:
            return False


def random_like(adapter: Adapter, seed: int) -> Adapter:
    """Random factors of ``adapter``'s rank and modules, scaled to its update norm."""
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g))
               for m, (a, b) in adapter.factors.items()}
    fake = Adapter(factors, rank=adapter.rank, alpha=adapter.alpha)
    ratio = math.sqrt(folding.delta_norm(adapter) / max(folding.delta_norm(fake), 1e-30))
    return Adapter({m: (a * ratio, b * ratio) for m, (a, b) in factors.items()}, rank=adapter.rank,
                   alpha=adapter.alpha)


def split(corpus: str, model: RunningModel, task_tokens: int, seed: int = 0):
    texts = read_corpus(corpus)
    random.Random(seed).shuffle(texts)
    settings = Settings(data_dir=Path("unused"))
    n_val = min(settings.max_validation_records, max(1, int(len(texts) * settings.validation_fraction)))
    counts = [len(ids) + 1 for ids in model.tokenizer(texts[n_val:], add_special_tokens=False)["input_ids"]]
    shards = [texts[n_val + s:n_val + e] for s, e in split_tasks(counts, task_tokens)]
    return texts[:n_val], shards


def run_corpus(args: argparse.Namespace, corpus: str, task_tokens: int, other: list[Adapter]) -> dict:
    """Train and judge every task of one corpus at one task size; returns the judgements, the
    honest adapters (for the other corpus's other-data row) and the measured costs."""
    torch.set_num_threads(args.threads)
    settings = Settings(data_dir=Path("unused"))
    policy = FoldPolicy.of(settings)
    job = settings.job
    model = RunningModel(tiny_model_path())
    held_texts, shards = split(corpus, model, task_tokens)
    # sized for the whole job (--max-tasks trains fewer of its tasks, as the job would train them)
    sized = policy.task_training(job.batch_size, job.learning_rate, cards=policy.fold_every, tasks=len(shards))
    shards = shards[:args.max_tasks] if args.max_tasks else shards
    held = model.eval_set(held_texts, job.seq_len, settings.eval_tokens)
    lora_spec = LoraSpec(rank=job.lora_rank, alpha=job.lora_alpha, target_modules=job.target_modules)
    rng = random.Random(f"{corpus}/{task_tokens}")
    judged: list[Judged] = []
    honest: list[Adapter] = []
    cost = {"gate_tokens": 0, "gate_seconds": 0.0, "proof_tokens": 0, "proof_seconds": 0.0, "folds": 0,
            "peers_tokens": 0, "peers_seconds": 0.0,
            "adapters": 0, "train_seconds": 0.0}
    folder_dir = Path(args.tmp) / f"{corpus}-{task_tokens}"
    version_dir = tiny_model_path()
    say = lambda text: print(f"[{corpus} {task_tokens}] {text}", flush=True)
    blocks_of = [packing.pack(model.tokenizer, s, job.seq_len) for s in shards]
    for p in range(max(args.passes, math.ceil(args.min_honest / len(shards)))):
        for r0 in range(0, len(shards), sized.fold_width):
            round_ids = list(range(r0, min(r0 + sized.fold_width, len(shards))))
            adapters = []
            for i in round_ids:
                started = time.monotonic()
                adapter, _ = train_adapter(version_dir, shards[i], lora_spec, TrainSpec(
                    seq_len=job.seq_len, batch_size=sized.batch_size, micro_batch=sized.batch_size,
                    learning_rate=sized.learning_rate, epochs=job.epochs, seed=1000 * p + i))
                cost["train_seconds"] += time.monotonic() - started
                adapters.append(adapter)
            honest.extend(adapters)
            # The existing gates: the version's held-out parent, each adapter's solo update.
            started = time.monotonic()
            parent = model.losses(held)
            solos = [model.losses(held, lora.build_patch([a], [1.0])) for a in adapters]
            cost["gate_seconds"] += time.monotonic() - started
            cost["gate_tokens"] += held.tokens * (1 + len(adapters))
            # The same held-out blocks under the proof's other models: for each task, its peers' mean
            # update (the round's other adapters, each 1/(K-1)), and the dishonest stand-ins.
            refs = [mean_of([o for k, o in enumerate(adapters) if k != j]) for j in range(len(adapters))]
            started = time.monotonic()
            ref_held = [model.losses(held, r) if r is not None else None for r in refs]
            cost["peers_seconds"] += time.monotonic() - started
            cost["peers_tokens"] += held.tokens * sum(r is not None for r in refs)
            # A copy's reference leaves out the adapter it copied (the folder leaves out peers within
            # FoldPolicy.peer_distance of it): task j's copy of adapter j + 1 is judged against the rest.
            copy_refs = [mean_of([o for k, o in enumerate(adapters) if k not in (j, (j + 1) % len(adapters))])
                         for j in range(len(adapters))]
            copy_held = [model.losses(held, r) if r is not None else None for r in copy_refs]
            for j, (i, adapter) in enumerate(zip(round_ids, adapters)):
                fakes = {"honest": (lora.build_patch([adapter], [1.0]), solos[j])}
                if len(adapters) > 1:  # another volunteer's adapter of the round (it learned another shard)
                    fakes["other-shard"] = (lora.build_patch([adapters[(j + 1) % len(adapters)]], [1.0]),
                                            solos[(j + 1) % len(adapters)])
                for kind, fake in (("other-data", other[(i + p) % len(other)] if other else None),
                                   ("random", random_like(adapter, 7 + i + 100 * p)),
                                   ("scaled", scaled(adapter, 50.0))):
                    if fake is not None:
                        fp = lora.build_patch([fake], [1.0])
                        fakes[kind] = (fp, model.losses(held, fp))
                for budget, window in ((b, w) for b in args.budget_list for w in args.window_list):
                    # the folder's draw: the blocks task i's trainer (seed 1000 p + i) saw last
                    sample = evaluation.recent_sample(blocks_of[i], 1000 * p + i, job.epochs, budget, window, rng)
                    at_default = (budget, window) == (policy.shard_tokens, policy.shard_window_tokens)
                    started = time.monotonic()
                    on_parent = model.losses(sample)
                    parent_s = time.monotonic() - started
                    started = time.monotonic()
                    on_ref = model.losses(sample, refs[j]) if refs[j] is not None else None
                    ref_s = time.monotonic() - started
                    on_copy_ref = model.losses(sample, copy_refs[j]) if copy_refs[j] is not None else None
                    for kind, (fp, on_held) in fakes.items():
                        ref, ref_on_held, ref_on_sample = ((copy_refs[j], copy_held[j], on_copy_ref)
                                                           if kind == "other-shard" else (refs[j], ref_held[j], on_ref))
                        started = time.monotonic()
                        on_sample = model.losses(sample, fp)
                        if kind == "honest" and at_default:  # the proof's cost, at the defaults
                            cand_s = time.monotonic() - started
                            cost["proof_seconds"] += parent_s + cand_s
                            cost["proof_tokens"] += 2 * sample.tokens
                            cost["peers_seconds"] += ref_s + cand_s if on_ref is not None else 0.0
                            cost["peers_tokens"] += 2 * sample.tokens if on_ref is not None else 0
                        judged.append(Judged(
                            kind, corpus, task_tokens, budget, window,
                            _pair(evaluation.paired(parent, on_held)), _pair(evaluation.paired(on_parent, on_sample)),
                            _pair(evaluation.paired(ref_on_held, on_held)) if ref is not None else None,
                            _pair(evaluation.paired(ref_on_sample, on_sample)) if ref is not None else None))
            # The fold check, then fold (every honest adapter passes here: this is the honest run).
            weights = policy.weights([len(blocks_of[i]) for i in round_ids], [0] * len(round_ids), sized.fold_width)
            patch = folding.build_patch(adapters, weights)
            started = time.monotonic()
            model.losses(held, patch)
            cost["gate_seconds"] += time.monotonic() - started
            cost["gate_tokens"] += held.tokens
            folding.apply_patch(model.master(patch.modules()), patch)
            cost["folds"] += 1
            cost["adapters"] += len(adapters)
            folder_dir.mkdir(parents=True, exist_ok=True)
            version_dir = _save(model, folder_dir, f"v{p}-{r0}")
            for window in args.window_list:
                xs = [x for x in judged if x.kind == "honest" and (x.budget, x.window) == (args.budget_list[0], window)]
                say(f"pass {p} tasks {round_ids[0]}-{round_ids[-1]}: honest z at {args.budget_list[0]} tokens "
                    f"from the last {window or 'all'}: against the parent "
                    f"{' '.join(f'{x.z():.1f}' for x in xs[-len(adapters):])}, against peers "
                    f"{' '.join(f'{x.z(True):.1f}' for x in xs[-len(adapters):])}; held-out {parent.mean:.4f}")
    return {"judged": [x.__dict__ for x in judged], "adapters": honest if args.keep else [], "cost": cost}


def mean_of(adapters: list[Adapter]) -> Adapter | None:
    """The mean update of ``adapters`` (None when there are none): a candidate's peers' reference."""
    return lora.build_patch(adapters, [1 / len(adapters)] * len(adapters)) if adapters else None


def _pair(c: evaluation.Comparison) -> tuple[float, float]:
    return (c.difference, c.se)


def scaled(adapter: Adapter, factor: float) -> Adapter:
    """The adapter's update times ``factor`` (its B factors scaled)."""
    return Adapter({m: (a, b * factor) for m, (a, b) in adapter.factors.items()}, rank=adapter.rank,
                   alpha=adapter.alpha)


def _save(model: RunningModel, root: Path, name: str) -> Path:
    """The folded version as a model folder the trainer starts from (as bench/qsim.py saves one)."""
    out = root / name
    model.model.save_pretrained(out, safe_serialization=True)
    for f in tiny_model_path().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def other_data(args: argparse.Namespace, corpus: str) -> list[Adapter]:
    """A few honest adapters of ``corpus``, trained on its base model (for the other corpus's
    other-data row)."""
    torch.set_num_threads(args.threads)
    settings = Settings(data_dir=Path("unused"))
    policy, job = FoldPolicy.of(settings), settings.job
    model = RunningModel(tiny_model_path())
    _, shards = split(corpus, model, args.other_tokens or min(args.task_sizes))
    sized = policy.task_training(job.batch_size, job.learning_rate, cards=policy.fold_every)
    return [train_adapter(tiny_model_path(), shards[i], LoraSpec(rank=job.lora_rank, alpha=job.lora_alpha,
                                                                 target_modules=job.target_modules),
                          TrainSpec(seq_len=job.seq_len, batch_size=sized.batch_size, micro_batch=sized.batch_size,
                                    learning_rate=sized.learning_rate, seed=i))[0]
            for i in range(min(args.other, len(shards)))]


def table(judged: list[Judged], sigmas: list[float], budgets: list[int], windows: list[int]) -> list[dict]:
    rows = []
    for peers, kind, budget, window, corpus in ((q, k, b, w, c) for q in (False, True) for k in KINDS
                                                 for b in budgets for w in windows
                                                 for c in sorted({x.corpus for x in judged})):
        xs = [x for x in judged if (x.kind, x.budget, x.window, x.corpus) == (kind, budget, window, corpus)]
        if not xs:
            continue
        zs = [x.z(peers) for x in xs if math.isfinite(x.z(peers))]
        rows.append({"against": "peers" if peers else "parent", "kind": kind, "corpus": corpus, "budget": budget,
                     "window": window, "n": len(xs),
                     "alone": sum(x.held_peer is None for x in xs) if peers else None,  # judged against the parent
                     "z_median": round(statistics.median(zs), 2) if zs else None,
                     "z_min": round(min(zs), 2) if zs else None,
                     "pass_rate": {f"{s:g}": round(sum(x.passes(s, peers) for x in xs) / len(xs), 4)
                                   for s in sigmas}})
    return rows


def normal_tail(zs: list[float], k: float) -> float:
    """P(z < k) for a normal fitted to ``zs``: the refusal rate beyond what a sample this size sees."""
    if len(zs) < 3:
        return math.nan
    mu, sd = statistics.mean(zs), statistics.stdev(zs)
    return 0.5 * (1 + math.erf((k - mu) / (sd * math.sqrt(2)))) if sd > 0 else float(mu < k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpora", default="demo,python-docs")
    parser.add_argument("--task-tokens", default="8192,32768", help="task sizes, comma-separated")
    parser.add_argument("--passes", type=int, default=2, help="passes over each corpus (new seeds each)")
    parser.add_argument("--min-honest", type=int, default=0,
                        help="more passes where a corpus has fewer tasks: at least this many honest adapters each")
    parser.add_argument("--sigmas", default="1,1.5,2,2.5,3", help="margins the table shows")
    parser.add_argument("--sigma", type=float, default=2.0, help="the margin the summary judges at")
    parser.add_argument("--budgets", default="1024,2048,4096")
    parser.add_argument("--windows", default="0,4096,8192",
                        help="draw the sample from the last-trained this many tokens (0: the whole shard)")
    parser.add_argument("--other", type=int, default=4, help="other-corpus adapters for the other-data row")
    parser.add_argument("--other-tokens", type=int, default=0,
                        help="the other-data adapters' task size (0: the smallest of --task-tokens)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="corpus x task size runs side by side")
    parser.add_argument("--tmp", default="/tmp/nomoat-shardproof")
    parser.add_argument("--max-tasks", type=int, default=0, help="at most this many tasks per corpus and size (0: all)")
    parser.add_argument("--raw", default="", help="write every judgement here (JSON)")
    parser.add_argument("--quick", action="store_true", help="4 tasks per corpus and size, one pass, 2048 only")
    args = parser.parse_args()
    args.task_sizes = [int(x) for x in args.task_tokens.split(",")]
    args.budget_list = [int(x) for x in args.budgets.split(",")]
    args.window_list = [int(x) for x in args.windows.split(",")]
    sigmas = [float(x) for x in args.sigmas.split(",")]
    if args.quick:
        args.passes, args.task_sizes, args.budget_list, args.other = 1, [min(args.task_sizes)], [2048], 2
        args.max_tasks = min(args.max_tasks or 4, 4)
    args.keep = False
    corpora = args.corpora.split(",")
    started = time.monotonic()
    with ProcessPoolExecutor(args.jobs) as pool:
        others = dict(zip(corpora, pool.map(other_data, [args] * len(corpora), corpora)))
        runs = [(c, t) for t in args.task_sizes for c in corpora]
        futures = [pool.submit(run_corpus, args, c, t, others[corpora[(corpora.index(c) + 1) % len(corpora)]]
                               if len(corpora) > 1 else []) for c, t in runs]
        results = [f.result() for f in futures]
    judged = [Judged(**x) for r in results for x in r["judged"]]
    if args.raw:
        Path(args.raw).write_text(json.dumps([x.__dict__ for x in judged]))
    cost = {k: sum(r["cost"][k] for r in results) for k in results[0]["cost"]}
    product = FoldPolicy.of(Settings(data_dir=Path("unused")))
    rows = table(judged, sigmas, args.budget_list, args.window_list)
    for row in rows:
        print(f"{row['against']:6} {row['kind']:11} {row['corpus']:11} budget {row['budget']:5} window "
              f"{row['window']:5} n {row['n']:3} z median {row['z_median']} min {row['z_min']}  "
              + " ".join(f"pass@{k}={v:.3f}" for k, v in row["pass_rate"].items()))
    at = [x for x in judged if (x.budget, x.window) == (product.shard_tokens, product.shard_window_tokens)]
    folds = max(1, cost["folds"])
    summary = {"shard_sigmas": args.sigma, "shard_tokens": product.shard_tokens,
               "shard_window_tokens": product.shard_window_tokens}
    for peers in (False, True):
        xs = at
        honest = [x for x in xs if x.kind == "honest"]
        refused = sum(not x.passes(args.sigma, peers) for x in honest)
        name = "peers" if peers else "parent"
        summary[name] = {
            "honest_z": {c: sorted(round(x.z(peers), 2) for x in honest if x.corpus == c) for c in corpora},
            "honest_adapters": len(honest), "honest_refused": refused,
            "false_refusal_rate": round(refused / max(1, len(honest)), 4),
            "false_refusal_rate_normal_fit": round(normal_tail([x.z(peers) for x in honest
                                                                if math.isfinite(x.z(peers))], args.sigma), 5),
            "false_refusal_by_corpus": {c: f"{sum(not x.passes(args.sigma, peers) for x in honest if x.corpus == c)}"
                                           f"/{sum(x.corpus == c for x in honest)}" for c in corpora},
            "dishonest_pass_rate": {k: round(sum(x.passes(args.sigma, peers) for x in xs if x.kind == k)
                                             / max(1, sum(x.kind == k for x in xs)), 4) for k in KINDS[1:]},
            "extra_eval_tokens_per_fold": round(cost[f"{'peers' if peers else 'proof'}_tokens"] / folds),
            "extra_eval_seconds_per_fold": round(cost[f"{'peers' if peers else 'proof'}_seconds"] / folds, 3),
            "extra_token_ratio": round(cost[f"{'peers' if peers else 'proof'}_tokens"] / max(1, cost["gate_tokens"]), 3),
            "extra_cost_ratio": round(cost[f"{'peers' if peers else 'proof'}_seconds"]
                                      / max(1e-9, cost["gate_seconds"]), 3),
        }
        print(f"against the {name}: honest refused {refused}/{len(honest)} at {args.sigma:g} SE "
              f"({summary[name]['false_refusal_by_corpus']}); dishonest passed {summary[name]['dishonest_pass_rate']}; "
              f"extra evaluation x{summary[name]['extra_token_ratio']} tokens, x{summary[name]['extra_cost_ratio']} seconds")
    summary.update({
        "gate_eval_tokens_per_fold": round(cost["gate_tokens"] / folds),
        "gate_eval_seconds_per_fold": round(cost["gate_seconds"] / folds, 3),
        "train_seconds_per_fold": round(cost["train_seconds"] / folds, 1),
        "adapters_per_fold": round(cost["adapters"] / folds, 2),
        "seconds": round(time.monotonic() - started),
        "table": rows,
    })
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
