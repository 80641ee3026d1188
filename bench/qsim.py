"""The coordinator behind ``bench/quality.py``: one job's tasks trained by simulated asynchronous
workers and folded by the product's own :class:`coordinator.fold.folder.Folder`, and the
centralized and data-parallel baselines, all with the real trainer.

There is one fold loop, the product's. A distributed row stands up the coordinator's parts in a
temp dir: a real Redis ledger (the embedded ``redis-server``), a blob store, version 0 published,
the job submitted through ``coordinator.schedule.submit`` (its validation slice, its tasks), and a
``Folder`` with its ``History`` and the on-coordinator evaluator. Simulated cards of different
speeds lease the job's tasks from the ledger, train them for real (``worker.trainer.train_adapter``
on the version they leased), and upload through ``ledger.adapters.accept``; the folder folds when
its policy says a fold is due (same gates, pairing, weights, outer step, drop-the-worst, publish).
Only time is simulated: the fold timeout is read against the cards' simulated clock.

:class:`Loop` is one row: the :class:`coordinator.fold.policy.FoldPolicy` the folder folds with
(the scheduler's task sizing comes from it too) and the few levers the product has no setting for
(a task lr other than the policy's, a learning-rate schedule across the job's tasks, one card
that waits for each fold). :class:`Bench` runs one corpus: ``centralized(...)`` (one LoRA, any
batch / lr / epochs / micro-batch: centralized and data-parallel are both this) and
``distributed(loop, ...)``. Corpora: ``demo`` (the packaged fortunes) and ``python-docs`` (the
Python Language Reference topics that CPython ships as ``pydoc_data.topics``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.fold import folding  # noqa: E402
from coordinator.fold.evaluators import OnCoordinator  # noqa: E402
from coordinator.fold.folder import Folder  # noqa: E402
from coordinator.fold.policy import FoldPolicy, TaskTraining  # noqa: E402
from coordinator.ledger import AdapterState, Ledger, VersionRecord  # noqa: E402
from coordinator.ledger.redis_server import EmbeddedRedis  # noqa: E402
from coordinator.model.history import History  # noqa: E402
from coordinator.model.running import RunningModel  # noqa: E402
from coordinator.model.store import BlobStore  # noqa: E402
from coordinator.schedule.submit import read_records, submit  # noqa: E402
from coordinator.settings import JobDefaults, Settings  # noqa: E402
from nomoat import adapter as adapter_format  # noqa: E402
from nomoat.tiny import read_demo, tiny_model_path  # noqa: E402
from worker.trainer import LoraSpec, TrainSpec, train_adapter  # noqa: E402

WORKER_SPEEDS = (400.0, 320.0, 260.0, 200.0)  # simulated tokens/s; more workers cycle these
PROBE_MODULE = "model.layers.1.mlp.down_proj"  # the matrix whose update's rank is printed
AVERAGES = (2, 3)  # LAWA readouts: the mean of the newest n versions' weights
EMA_DECAY = 0.5  # the EMA readout over versions


@dataclass(frozen=True)
class Loop:
    """One row: the fold policy the folder folds with, and the levers beside it."""

    policy: FoldPolicy
    tokens_per_task: int
    # Levers the product has no setting for. task_batch / lr_mult 0: what the policy sizes a task
    # at (the scheduler's rule: FoldPolicy.task_training).
    task_batch: int = 0
    lr_mult: float = 0.0
    # One learning-rate schedule across the job's tasks (WSD, arXiv 2405.18392): a task's lr is
    # scaled by where it stands in the job: the first ``warmup`` share of tasks ramps up, the
    # last ``cooldown`` share decays linearly (to 1/10 at the end); each task trains at its
    # scaled lr, constant (the trainer's lr is constant within a task).
    warmup: float = 0.0
    cooldown: float = 0.0
    # Control (a): ``workers`` cards (0: --workers); ``sequential``: one card that starts its next
    # task only once its last adapter is folded.
    workers: int = 0
    sequential: bool = False

    @classmethod
    def defaults(cls, settings: Settings, job: JobDefaults) -> Loop:
        """What the coordinator does at ``settings`` for a job with ``job``'s settings."""
        return cls(FoldPolicy.of(settings), job.tokens_per_task)

    def with_policy(self, **changes) -> Loop:
        return replace(self, policy=replace(self.policy, **changes))

    def training(self, batch_size: int, learning_rate: float, cards: int, tasks: int | None = None) -> TaskTraining:
        """The batch and lr each task trains at, on ``cards`` workers, for a job of ``tasks``."""
        sized = self.policy.task_training(batch_size, learning_rate, cards, None, tasks)
        return TaskTraining(self.task_batch or sized.batch_size,
                            learning_rate * self.lr_mult if self.lr_mult else sized.learning_rate,
                            sized.fold_width)

    def schedule(self, position: int, total: int) -> float:
        """The lr factor of the ``position``-th of ``total`` tasks (WSD; 1 without one)."""
        p = (position + 0.5) / max(1, total)
        factor = 1.0
        if self.warmup and p < self.warmup:
            factor = p / self.warmup
        if self.cooldown and p > 1 - self.cooldown:
            factor = max(0.1, (1 - p) / self.cooldown)
        return factor


@dataclass
class Outcome:
    test_loss: float
    versions: int
    adapters: int
    refused: int
    taus: list[int] = field(default_factory=list)
    round_losses: list[float] = field(default_factory=list)  # test loss once each job is folded
    averaged: dict[str, float] = field(default_factory=dict)  # LAWA / EMA readouts' test loss
    patch_rank: int = 0  # Σ of the published patches' ranks for PROBE_MODULE
    delta: torch.Tensor | None = None  # W_final − W_base of PROBE_MODULE
    seconds: float = 0.0
    batches: list[int] = field(default_factory=list)  # each task's batch, in the order trained


def prose(text: str) -> list[str]:
    """One record per prose paragraph of ``text`` (code, tables and short lines left out)."""
    paragraphs = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text))
    return [p for p in paragraphs
            if len(p.split()) >= 12 and sum(c.isalpha() or c == " " for c in p) / len(p) > 0.85]


def read_corpus(name: str) -> list[str]:
    """The records of a corpus: ``demo``, ``python-docs`` (the prose paragraphs of the Language
    Reference topics shipped in ``pydoc_data.topics``) or ``text:PATH`` (the distinct prose
    paragraphs of a text file, or of every file in a folder: a held-out text the benchmark does
    not ship, e.g. ``text:/usr/share/common-licenses``)."""
    if name == "demo":
        return read_demo()
    if name == "python-docs":
        from pydoc_data.topics import topics

        return prose("\n\n".join(topics[k] for k in sorted(topics)))
    if name.startswith("text:"):
        path = Path(name[len("text:"):])
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        if not path.exists() or not files:
            raise SystemExit(f"corpus {name!r}: {path} holds no text; name a text file or a folder of them")
        # dict.fromkeys: the same paragraph in two files (one license under two names) counts once
        return list(dict.fromkeys(prose("\n\n".join(p.read_text(errors="replace") for p in files))))
    raise SystemExit(f"unknown corpus {name!r}: use demo, python-docs or text:PATH")


def coordinator_settings(args: argparse.Namespace, data_dir: Path) -> tuple[Settings, JobDefaults]:
    """The coordinator's default settings, and its job defaults with ``--lr`` / ``--batch-size``."""
    # The shard proof is off here: a row's seed s trains task i with seed i + 1000·s, while the
    # folder replays the trainer's order from the task's index (the product's seed), so for s > 0
    # its sample would be random blocks. Its false refusals and cost are bench/shardproof.py's.
    settings = Settings(data_dir=data_dir, shard_sigmas=0.0)
    job = settings.job
    if args.lr:
        job = replace(job, learning_rate=args.lr)
    if args.batch_size:
        job = replace(job, batch_size=args.batch_size)
    return replace(settings, job=job), job


class Coordinator:
    """The product's parts for one distributed row, in ``root``: ledger, store, version 0, folder."""

    def __init__(self, root: Path, settings: Settings, client: redis.Redis, base_dir: Path, device: str,
                 policy: FoldPolicy) -> None:
        client.flushdb()
        self.root = root
        self.settings = replace(settings, data_dir=root)
        self.ledger = Ledger(client)
        self.store = BlobStore(root / "blobs")
        model = RunningModel(base_dir, device)
        self.ledger.versions.publish(VersionRecord(version=0, parent=-1, files=model.publish(self.store)))
        self.folder = Folder(self.settings, self.ledger, self.store, model, History(self.ledger, self.store, root),
                             OnCoordinator(model, self.settings.eval_dtype))
        self.folder.policy = policy  # the row's policy: FoldPolicy.of(settings) with the row's changes
        self.targets = list(model.shapes(list(settings.job.target_modules)))

    @property
    def model(self) -> RunningModel:
        return self.folder.model

    def submit(self, data: bytes, tokens_per_task: int) -> tuple[str, list[str]]:
        """Submit the dataset as a job (the coordinator's own split and tasks): (job id, its records)."""
        result = submit(self.settings, self.ledger, self.store, self.model.tokenizer, self.targets, data,
                        "bench.jsonl", "bench", {"tokens_per_task": tokens_per_task})
        job = self.ledger.jobs.get(result.job_id)
        return result.job_id, read_records(self.store.get(job.records))


def jsonl(records: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in records).encode()


class Bench:
    def __init__(self, args: argparse.Namespace, corpus: str = "demo") -> None:
        self.args = args
        self.device = args.device
        self.tmp = Path(tempfile.mkdtemp(prefix="nomoat-quality-"))
        self.redis = EmbeddedRedis(self.tmp / "redis")
        self.redis.start()
        self.client = redis.Redis.from_url(self.redis.url)
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
        self.test = records[:n_test]
        # The rest is the job's dataset: the coordinator holds its own validation slice (the fold
        # gates read it) and trains on the other records; the baselines train on those same ones.
        self.data = jsonl(records[n_test:])
        scratch = Coordinator(self.tmp / "split", self.settings, self.client, self.base_dir, self.device,
                              FoldPolicy.of(self.settings))
        job_id, job_records = scratch.submit(self.data, self.job.tokens_per_task)
        n_val = scratch.ledger.jobs.get(job_id).n_validation
        self.val, self.train = job_records[:n_val], job_records[n_val:]
        ids = scratch.model.tokenizer(self.train, add_special_tokens=False, split_special_tokens=True,
                                      verbose=False)["input_ids"]
        self.total_tokens = sum(len(i) + 1 for i in ids)
        self.base_test = scratch.model.eval_loss(self.test, self.job.seq_len)
        self.base_probe = scratch.model.master([PROBE_MODULE])[PROBE_MODULE].detach().clone().cpu()
        shutil.rmtree(self.tmp / "split", ignore_errors=True)

    def close(self) -> None:
        self.client.close()
        self.redis.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the baselines ------------------------------------------------------------------------

    def centralized(self, epochs: int = 1, batch: int = 0, lr_mult: float = 1.0, seed: int = 0,
                    micro: int = 0) -> Outcome:
        """One LoRA on all train records: the job's batch (centralized) or K times it
        (data-parallel), ``lr_mult`` times the job's learning rate. ``micro``: the batch fed
        through at once; K cards each taking ``batch / K`` sequences of every step and averaging
        their gradients (synchronous data-parallel at the same global batch) is exactly this."""
        t0 = time.time()
        b = batch or self.train_spec.batch_size
        spec = replace(self.train_spec, epochs=epochs, seed=seed, batch_size=b, micro_batch=micro or b,
                       learning_rate=self.train_spec.learning_rate * lr_mult)
        adapter, _ = train_adapter(self.base_dir, self.train, self.lora, spec, device=self.device)
        running = RunningModel(self.base_dir, self.device)
        folding.fold(running.master(adapter.modules()), [adapter], [1.0])
        loss = running.eval_loss(self.test, self.job.seq_len)
        return Outcome(loss, 1, 1, 0, patch_rank=self.lora.rank, delta=self._probe_delta(running),
                       seconds=time.time() - t0)

    # -- the coordinator ----------------------------------------------------------------------

    def distributed(self, loop: Loop, rounds: int = 1, seed: int = 0) -> Outcome:
        """The coordinator's asynchronous loop, in order of (simulated) time, folded by its Folder.

        ``rounds`` jobs of the same records are submitted in turn (a pass each). Task i of the
        product trains with seed i; seed s adds 1000·s."""
        t0 = time.time()
        root = self.tmp / "run"
        shutil.rmtree(root, ignore_errors=True)
        co = Coordinator(root, self.settings, self.client, self.base_dir, self.device, loop.policy)
        policy = loop.policy
        jobs, records = [], {}
        for _ in range(rounds):
            job_id, job_records = co.submit(self.data, loop.tokens_per_task)
            jobs.append(job_id)
            records[job_id] = job_records
        order = [t for j in jobs for t in sorted(co.ledger.tasks.of_job(j), key=lambda t: t.index)]
        position = {t.task_id: i for i, t in enumerate(order)}
        n_workers = 1 if loop.sequential else loop.workers or self.args.workers
        speeds = [WORKER_SPEEDS[w % len(WORKER_SPEEDS)] for w in range(n_workers)]
        folders = {0: self.base_dir}
        out = Outcome(math.nan, 0, 0, 0)
        pending = [t.task_id for t in order][::-1]  # pop() takes the oldest
        leased: dict[str, tuple[int, int, TaskTraining]] = {}  # task -> (fence, base version, training)
        events: list[tuple[float, int, str]] = []  # (finish time, worker, task)
        accepted_at: dict[str, float] = {}  # adapter id -> simulated time it was accepted
        versions: list[dict[str, torch.Tensor]] = []  # newest last: target weights, for the averages
        ema: dict[str, torch.Tensor] = {}
        waiting: list[int] = []  # sequential: the card, until the fold
        tasks = {t.task_id: t for t in order}
        per_job = {j: sum(1 for t in order if t.job == j) for j in jobs}

        def take(worker: int, now: float) -> None:
            if not pending:
                return
            task_id = pending.pop()
            task = tasks[task_id]
            version = co.ledger.versions.latest()
            fence = co.ledger.leases.lease(task_id, time.time() + 86400, version, max_attempts=3)
            sized = loop.training(self.train_spec.batch_size, self.train_spec.learning_rate, n_workers,
                                  per_job[task.job])
            sized = replace(sized, learning_rate=sized.learning_rate * loop.schedule(position[task_id], len(order)))
            co.ledger.tasks.set_training([(task_id, sized.batch_size, sized.learning_rate, sized.fold_width)])
            leased[task_id] = (fence, version, sized)
            heapq.heappush(events, (now + task.tokens / speeds[worker], worker, task_id))

        def outstanding(job_id: str) -> bool:
            return any(tasks[t].job == job_id for t in (*pending, *leased))

        for w in range(len(speeds)):
            take(w, 0.0)
        while events or co.ledger.adapters.buffered():
            buffered = co.ledger.adapters.buffered()
            timeout_at = (accepted_at[buffered[0].adapter_id] + policy.fold_timeout_s) if buffered else math.inf
            if events and events[0][0] <= timeout_at:
                now, worker, task_id = heapq.heappop(events)
                task = tasks[task_id]
                fence, base, sized = leased.pop(task_id)
                spec = replace(self.train_spec, seed=task.index + 1000 * seed, batch_size=sized.batch_size,
                               micro_batch=sized.batch_size, learning_rate=sized.learning_rate)
                adapter, result = train_adapter(folders[base], records[task.job][task.start:task.end], self.lora,
                                                spec, device=self.device)
                sha = co.store.put(adapter_format.to_bytes(adapter))
                answer = co.ledger.adapters.accept(task_id, fence, sha, worker_id=f"w{worker}", base_version=base,
                                                   rank=adapter.rank, alpha=adapter.alpha, tokens=result.tokens,
                                                   train_loss=result.train_loss)
                accepted_at[answer.detail] = now
                out.batches.append(sized.batch_size)
                out.adapters += 1
                if loop.sequential:
                    waiting.append(worker)
                else:
                    take(worker, now)  # the card starts its next task before the fold runs
            else:
                now = timeout_at
            buffered = co.ledger.adapters.buffered()
            idle = {b.job for b in buffered if not outstanding(b.job)}
            # The folder reads waits on the ledger's (wall-clock) acceptance times: give it the
            # simulated wait of the oldest buffered adapter.
            wall_now = buffered[0].accepted + (now - accepted_at[buffered[0].adapter_id]) if buffered else time.time()
            published = co.folder.maybe_fold(idle, now=wall_now)
            if published is not None:
                folders[published] = self._save(co.model, published)
                weights = {m: w.detach().clone() for m, w in co.model.master(co.targets).items()}
                versions = [*versions[-(max(AVERAGES) - 1):], weights]
                ema = {m: EMA_DECAY * ema[m] + (1 - EMA_DECAY) * w for m, w in weights.items()} if ema else weights
            while waiting:
                take(waiting.pop(), now)
            if published is not None and rounds > 1:  # a pass (job) with nothing left: its test loss
                while len(out.round_losses) < rounds and not outstanding(jobs[len(out.round_losses)]) and not any(
                        b.job == jobs[len(out.round_losses)] for b in co.ledger.adapters.buffered()):
                    out.round_losses.append(co.model.eval_loss(self.test, self.job.seq_len))
        out.test_loss = co.model.eval_loss(self.test, self.job.seq_len)
        out.averaged = self._averages(co.model, versions, ema)
        self._tally(co, out)
        out.delta = self._probe_delta(co.model)
        out.seconds = time.time() - t0
        shutil.rmtree(root, ignore_errors=True)
        for v, path in folders.items():
            if v:
                shutil.rmtree(path, ignore_errors=True)
        return out

    def _averages(self, model: RunningModel, versions: list[dict[str, torch.Tensor]],
                  ema: dict[str, torch.Tensor]) -> dict[str, float]:
        """The test loss of what would be published as an average of the newest versions (LAWA,
        arXiv 2306.03241) or as an EMA over versions: the same tokens, another readout."""
        readouts = {f"lawa{n}": [sum(v[m] for v in versions[-n:]) / len(versions[-n:]) for m in versions[-1]]
                    for n in AVERAGES if versions}
        if ema:
            readouts["ema"] = list(ema.values())
        out = {}
        modules = list(versions[-1]) if versions else []
        for name, tensors in readouts.items():
            with model.restorable(modules):
                model.load_master(dict(zip(modules, tensors)))
                out[name] = model.eval_loss(self.test, self.job.seq_len)
        return out

    def _tally(self, co: Coordinator, out: Outcome) -> None:
        """Versions, refusals, staleness and patch ranks, as the ledger recorded them."""
        latest = co.ledger.versions.latest()
        out.versions = latest
        for v in range(1, latest + 1):
            record = co.ledger.versions.get(v)
            out.taus.extend(a.tau for a in record.adapters)
            patch = adapter_format.from_bytes(co.store.get(record.patch))
            out.patch_rank += patch.factors[PROBE_MODULE][0].shape[0]
        states = [a.state for a in co.ledger.adapters.many(co.ledger.adapters.ids())]
        out.refused = sum(s is AdapterState.REJECTED for s in states)

    def _save(self, running: RunningModel, version: int) -> Path:
        path = self.tmp / f"v{version}"
        running.model.save_pretrained(path, safe_serialization=True)
        for f in self.base_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, path / f.name)
        return path

    def _probe_delta(self, running: RunningModel) -> torch.Tensor:
        return running.master([PROBE_MODULE])[PROBE_MODULE].detach().cpu() - self.base_probe

    def ratio(self, loss: float, reference: float) -> float:
        return (self.base_test - loss) / (self.base_test - reference)


def effective_rank(delta: torch.Tensor) -> tuple[int, float]:
    """(numerical rank at 1e-3 of the largest singular value, entropy effective rank)."""
    s = torch.linalg.svdvals(delta.double())
    numerical = int((s > s[0] * 1e-3).sum())
    p = s / s.sum()
    entropy = float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))
    return numerical, entropy
