"""The simulated coordinator behind ``bench/quality.py``: one job's tasks trained by simulated
asynchronous workers and folded as ``coordinator.fold.folder.Folder`` folds, and the centralized and
data-parallel baselines, all with the real trainer.

:class:`Loop` holds the coordinator's own :class:`coordinator.fold.policy.FoldPolicy` (when a fold is
due, the gates, the weights, the outer step, drop-the-worst, and each task's batch and lr: the
folder and the scheduler call the same object) plus the levers of issue 10 the product does not
have as settings (a task batch or lr other than the policy's, LoRA+, warm starts); :class:`Bench` runs
one corpus: ``centralized(...)`` (one LoRA, any batch / lr / epochs: centralized and data-parallel
are both this) and ``distributed(loop, ...)``. Corpora: ``demo`` (the packaged fortunes) and
``python-docs`` (the Python Language Reference topics that CPython ships as ``pydoc_data.topics``:
real English prose nobody here wrote, present wherever Python is).
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.fold import folding  # noqa: E402
from coordinator.model.running import RunningModel  # noqa: E402
from coordinator.schedule.noise import NoiseScale, Sample  # noqa: E402
from coordinator.fold.policy import FoldPolicy, TaskTraining  # noqa: E402
from coordinator.settings import JobDefaults, Settings  # noqa: E402
from coordinator.schedule.submit import split_tasks  # noqa: E402
from nomoat.adapter import Adapter  # noqa: E402
from nomoat.tiny import read_demo, tiny_model_path  # noqa: E402
from worker.trainer import Carry, LoraSpec, TrainSpec, gradient_start, train_adapter  # noqa: E402
from worker.warmstart import start_from_patch  # noqa: E402

WORKER_SPEEDS = (400.0, 320.0, 260.0, 200.0)  # simulated tokens/s; more workers cycle these
PROBE_MODULE = "model.layers.1.mlp.down_proj"  # the matrix whose update's rank is printed


@dataclass(frozen=True)
class Loop:
    """One row: the fold policy the simulated coordinator folds with, and the levers beside it."""

    policy: FoldPolicy
    tokens_per_task: int
    # Levers the product has no setting for (issue 10). task_batch / lr_mult 0: what the policy
    # sizes a task at (the scheduler's rule: FoldPolicy.task_training). warm: "none" (a fresh LoRA
    # per task), "worker" (the worker's previous adapter and its AdamW moments; "worker-fresh-adam"
    # without the moments), "job" (rank-r SVD of the patch that made the task's base version).
    task_batch: int = 0
    lr_mult: float = 0.0
    lr_b_ratio: float = 1.0
    warm: str = "none"
    # LoRA-GA (worker.gradinit): "gradient", each task starts from the SVD of the gradient on its
    # own blocks (TrainSpec.init); "gradient-shared", every task of a version starts from one such
    # start, estimated once on the version from a version-seeded sample of the job's records (the
    # adapters of one fold share their subspaces). "principal": PiSSA, each task starts from the
    # base version's own top-r SVD (shared by a version's tasks by construction). "random": PEFT's
    # fresh LoRA.
    init: str = "random"

    @classmethod
    def defaults(cls, settings: Settings, job: JobDefaults) -> Loop:
        """What the coordinator does at ``settings`` for a job with ``job``'s settings."""
        return cls(FoldPolicy.of(settings), job.tokens_per_task)

    def with_policy(self, **changes) -> Loop:
        return replace(self, policy=replace(self.policy, **changes))

    def training(self, batch_size: int, learning_rate: float, cards: int,
                 noise_scale: float | None = None, tasks: int | None = None) -> TaskTraining:
        """The batch and lr each task trains at, on ``cards`` workers, with the job's gradient
        noise scale estimated so far (the policy uses it with ``size_from_noise``) and the
        job's ``tasks``."""
        sized = self.policy.task_training(batch_size, learning_rate, cards, noise_scale, tasks)
        return TaskTraining(self.task_batch or sized.batch_size,
                            learning_rate * self.lr_mult if self.lr_mult else sized.learning_rate,
                            sized.fold_width)


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
    batches: list[int] = field(default_factory=list)  # each task's batch, in the order trained
    noise_scale: float = math.nan  # the job's B_simple estimate at the end (coordinator.schedule.noise)
    train_seconds: float = 0.0  # Σ over tasks of the trainer's wall time (init included)
    init_seconds: float = 0.0  # of which: estimating gradient-aligned starts (shared ones too)


def read_corpus(name: str) -> list[str]:
    """The records of a corpus: ``demo`` or ``python-docs`` (one record per prose paragraph of the
    Language Reference topics shipped in ``pydoc_data.topics``; code and tables left out)."""
    if name == "demo":
        return read_demo()
    if name == "python-docs":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
        paragraphs = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text))
        return [p for p in paragraphs
                if len(p.split()) >= 12 and sum(c.isalpha() or c == " " for c in p) / len(p) > 0.85]
    raise SystemExit(f"unknown corpus {name!r}: use demo or python-docs")


def coordinator_settings(args: argparse.Namespace, data_dir: Path) -> tuple[Settings, JobDefaults]:
    """The coordinator's default settings, and its job defaults with ``--lr`` / ``--batch-size``."""
    settings = Settings(data_dir=data_dir)
    job = settings.job
    if args.lr:
        job = replace(job, learning_rate=args.lr)
    if args.batch_size:
        job = replace(job, batch_size=args.batch_size)
    return settings, job


class Bench:
    def __init__(self, args: argparse.Namespace, corpus: str = "demo") -> None:
        self.args = args
        self.device = args.device
        self.tmp = Path(tempfile.mkdtemp(prefix="nomoat-quality-"))
        self.base_dir = tiny_model_path()
        self.settings, self.job = coordinator_settings(args, self.tmp)
        self.lora = LoraSpec(rank=self.job.lora_rank, alpha=self.job.lora_alpha,
                             target_modules=tuple(self.job.target_modules))
        self.train_spec = TrainSpec(seq_len=self.job.seq_len, batch_size=self.job.batch_size,
                                    micro_batch=self.job.batch_size, learning_rate=self.job.learning_rate,
                                    epochs=self.job.epochs)

        records = read_corpus(corpus)
        random.Random(0).shuffle(records)
        if args.records:  # after the shuffle: the files are ordered by category / topic
            records = records[: args.records]
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

    def base_loss(self, seq_len: int) -> float:
        """The base model's test loss at ``seq_len`` (a part that changes the job's blocks)."""
        return RunningModel(self.base_dir, self.device).eval_loss(self.test, seq_len)

    # -- the two sides ------------------------------------------------------------------------

    def centralized(self, epochs: int = 1, batch: int = 0, lr_mult: float = 1.0) -> Outcome:
        """One LoRA on all train records: the job's batch (centralized) or K times it
        (data-parallel), ``lr_mult`` times the job's learning rate."""
        t0 = time.time()
        lora = self.lora
        b = batch or self.train_spec.batch_size
        spec = replace(self.train_spec, epochs=epochs, seed=0, batch_size=b, micro_batch=b,
                       learning_rate=self.train_spec.learning_rate * lr_mult)
        adapter, _ = train_adapter(self.base_dir, self.train, lora, spec, device=self.device)
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
        policy = loop.policy
        n_workers = 1 if sequential else workers or self.args.workers
        spec = replace(self.train_spec, epochs=epochs or self.train_spec.epochs, lr_b_ratio=loop.lr_b_ratio,
                       init=loop.init if loop.init in ("gradient", "principal") else "random")
        shared: dict[int, Adapter] = {}  # version -> its shared gradient-aligned start
        noise = NoiseScale()  # the job's, as the coordinator keeps it from each accepted adapter
        sizing: dict[int, TaskTraining] = {}  # task -> what it was leased to train at
        carries: dict[int, Carry] = {}  # worker -> its last trained factors and moments
        patches: dict[int, Adapter] = {}  # version -> the patch that made it
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
        speeds = [WORKER_SPEEDS[w % len(WORKER_SPEEDS)] for w in range(n_workers)]
        waiting: list[int] = []  # sequential: the card, until the fold

        def take(worker: int, now: float) -> None:
            if pending:
                task = pending.pop()
                in_flight[task] = version
                sizing[task] = loop.training(self.train_spec.batch_size, self.train_spec.learning_rate, n_workers,
                                             noise.b_simple(), len(ranges))
                heapq.heappush(events, (now + tasks[task][3] / speeds[worker], worker, task))

        for w in range(len(speeds)):
            take(w, 0.0)
        while events or buffer:
            # The next thing that happens: an upload lands, or the oldest buffered adapter times out.
            timeout_at = buffer[0]["accepted"] + policy.fold_timeout_s if buffer else math.inf
            if events and events[0][0] <= timeout_at:
                now, worker, task = heapq.heappop(events)
                job, index, texts, _ = tasks[task]
                base = in_flight.pop(task)
                start, moments = None, None
                if loop.warm.startswith("worker") and worker in carries:
                    start, moments = carries[worker].factors, carries[worker].optimizer_state
                    if loop.warm == "worker-fresh-adam":
                        moments = None
                elif loop.warm == "job" and base in patches:
                    start = start_from_patch(patches[base], self.lora.rank, self.lora.alpha)
                sized = sizing.pop(task)
                task_spec = replace(spec, seed=index, batch_size=sized.batch_size, micro_batch=sized.batch_size,
                                    learning_rate=sized.learning_rate)
                if loop.init == "gradient-shared":
                    if base not in shared:
                        t_init = time.time()
                        shared[base] = gradient_start(folders[base], self._version_sample(base, spec), self.lora,
                                                      replace(task_spec, seed=base), device=self.device)
                        out.init_seconds += time.time() - t_init  # work as much as training is
                        out.train_seconds += time.time() - t_init
                    start = shared[base]
                adapter, result = train_adapter(folders[base], texts, self.lora, task_spec,
                                                device=self.device, start=start, optimizer_state=moments)
                carries[worker] = result.carry
                out.train_seconds += result.seconds
                out.init_seconds += result.init_seconds
                n = result.norms
                noise = noise.add(Sample(n.micro_sq, n.batch_sq, n.micro_batch, n.batch_size))
                out.batches.append(sized.batch_size)
                buffer.append({"adapter": adapter, "tokens": result.tokens, "base": base, "job": job,
                               "accepted": now, "width": sized.fold_width})
                out.adapters += 1
                if sequential:
                    waiting.append(worker)
                else:
                    take(worker, now)  # the card starts its next task before the fold runs
            else:
                now = timeout_at
            idle_jobs = {j for j in {b["job"] for b in buffer}
                         if not any(tasks[t][0] == j for t in (*pending, *in_flight))}
            due = policy.due(len(buffer), now - buffer[0]["accepted"] if buffer else 0.0,
                             any(b["job"] in idle_jobs for b in buffer))
            if due:
                entries, buffer = buffer[: policy.take()], buffer[policy.take():]
                published = self._fold(running, loop, entries, version, recent_norms, previous_deltas, out)
                if published is not None:
                    version += 1
                    patches[version] = published
                    folders[version] = self._save(running, version)
                    out.versions += 1
            while waiting:
                take(waiting.pop(), now)
            if due and rounds > 1:  # a job (round) with nothing outstanding: its test loss
                busy = {tasks[t][0] for t in (*pending, *in_flight)} | {b["job"] for b in buffer}
                while len(out.round_losses) < rounds and len(out.round_losses) not in busy:
                    out.round_losses.append(running.eval_loss(self.test, self.job.seq_len))
        out.test_loss = running.eval_loss(self.test, self.job.seq_len)
        out.noise_scale = noise.b_simple() or math.nan
        out.delta = self._probe_delta(running)
        out.seconds = time.time() - t0
        for v, path in folders.items():
            if v:
                shutil.rmtree(path, ignore_errors=True)
        return out

    # -- one fold, as coordinator.fold.folder.Folder.fold does it ----------------------------------

    def _fold(self, running: RunningModel, loop: Loop, entries: list[dict], current: int,
              recent_norms: list[float], previous_deltas: list[Adapter], out: Outcome) -> Adapter | None:
        """Gate, weigh and fold ``entries`` (``recent_norms`` newest first, as the ledger keeps
        them); the published patch, or None when nothing was. Every decision is the policy's."""
        policy = loop.policy
        seq_len = self.job.seq_len
        parent_loss = running.eval_loss(self.val, seq_len)
        candidates = []
        for e in entries:
            tau = current - e["base"]
            try:
                norm = folding.delta_norm(e["adapter"])
                policy.admit(e["tokens"], tau, norm, recent_norms)
                solo = running.loss_with(e["adapter"], folding.staleness_factor(tau), self.val, seq_len)
                policy.judge(solo, parent_loss)
            except folding.AdapterRejected as exc:
                out.rejected += 1
                if self.args.verbose:
                    print(f"    rejected (tau {tau}): {exc}", flush=True)
                continue
            candidates.append({**e, "tau": tau, "norm": norm, "solo": solo})
        while candidates:
            weights = policy.weights([c["tokens"] for c in candidates], [c["tau"] for c in candidates],
                                     max(c["width"] for c in candidates))
            delta = folding.build_patch([c["adapter"] for c in candidates], weights)
            patch = policy.outer_step(delta, previous_deltas)
            modules = patch.modules()
            with running.restorable(modules) as checkpoint:
                folding.apply_patch(running.master(modules), patch)
                loss = running.eval_loss(self.val, seq_len)
                if policy.publishable(loss, parent_loss):
                    checkpoint.keep()
                    recent_norms[:0] = [c["norm"] for c in reversed(candidates)]
                    previous_deltas.insert(0, delta)
                    out.taus.extend(c["tau"] for c in candidates)
                    out.patch_rank += patch.factors[PROBE_MODULE][0].shape[0]
                    if self.args.verbose:
                        print(f"    v{current + 1}: {len(candidates)} adapters, taus "
                              f"{[c['tau'] for c in candidates]}, val {parent_loss:.4f} -> {loss:.4f}", flush=True)
                    return patch
            worst = candidates[policy.worst([c["solo"] for c in candidates])]
            candidates = [c for c in candidates if c is not worst]
            out.dropped += 1
        return None

    def _version_sample(self, version: int, spec: TrainSpec) -> list[str]:
        """Records for a version's shared start: a version-seeded sample of the job's train
        records, about 1.25 x ``spec.init_blocks`` blocks of them."""
        order = list(range(len(self.train)))
        random.Random(version).shuffle(order)
        picked, tokens = [], 0
        for i in order:
            if tokens >= 1.25 * spec.init_blocks * spec.seq_len:
                break
            picked.append(self.train[i])
            tokens += self.counts[i]
        return picked

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


