"""Fold: accepted adapters wait in a buffer; a batch of them becomes the next model version.

One thread runs this; it alone touches the running model. A fold happens when ``fold_every``
adapters wait, when the oldest has waited ``fold_timeout_s``, or when an adapter's job has
nothing else outstanding (so a job's tail is never stuck behind an unfilled buffer).

Each adapter is gated (its bytes not another task's adapter; norm against recent adapters;
held-out loss of current + its update; that update lowering loss on a sample of its own shard
clearly more than on the held-out slice: the shard proof),
the survivors are folded at once (DESIGN.md's product rule, one GEMM per matrix), and the new
version is published only if its held-out loss is not worse than its parent's by more than ε;
otherwise the worst contributor is dropped and the fold retried, or nothing is published.

Every held-out evaluation reads the job's budgeted blocks (``Settings.eval_tokens``) and compares
parent and candidate on the same blocks (:mod:`coordinator.fold.evaluators`); a candidate is the
current model plus its update as a side path, so a gate neither copies nor changes the master,
and the fold's patch goes into the master only when the fold is published. Evaluations go
through an :class:`~coordinator.fold.evaluators.Evaluator` (on the coordinator, or delegated to a
trusted worker's card) in two batches per fold: the parents and every adapter's solo gate in
one, the fold check in the other (and one more per retry after dropping the worst). The shard
proof rides in the first batch: each adapter's shard sample is one more set of blocks, scored for
the parent and for the adapter's solo update, where the other gates are scored. The parent's
losses are measured once per version and place: a fold's candidate losses become the next
fold's parent losses when the next evaluation runs where they were measured.

Every decision is :class:`coordinator.fold.policy.FoldPolicy`'s (the benchmark folds with the same
object); this module does the reading, evaluating and publishing around them.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from coordinator.fold import evaluators

from nomoat import evaluation

from coordinator.fold import folding, rollback, shard_proof
from coordinator.fold.failures import FoldFailures
from coordinator.model.history import History
from coordinator.ledger import (
    AdapterRecord,
    Check,
    FoldedAdapter,
    JobState,
    Ledger,
    VersionRecord,
)
from coordinator.ledger.leaders import Fence, NotLeader, Term
from coordinator.ledger.versions import VersionConflict
from coordinator.model.running import RunningModel
from coordinator.fold.policy import FoldPolicy
from coordinator.settings import Settings
from coordinator.model import modelcard
from coordinator.model.store import BlobStore
from coordinator.schedule.submit import read_records
from nomoat import adapter as adapter_format
from nomoat import lora
from nomoat.logs import fields

log = logging.getLogger("nomoat.fold")

REFUSED_PARKED = "parked"  # the refusal kind of an adapter set aside because folding it kept failing


@dataclass
class Candidate:
    adapter_id: str
    job_id: str
    worker_id: str
    adapter: adapter_format.Adapter
    tokens: int
    tau: int
    norm: float
    solo_loss: float = math.nan
    task_id: str = ""
    fold_width: int = 1  # K its task's batch was divided for (FoldPolicy.weights)
    entry: AdapterRecord | None = None
    shard_set: str = ""  # the key of its shard sample in the gate's evaluation batch ("" if none)


class Folder:
    def __init__(self, settings: Settings, ledger: Ledger, store: BlobStore, model: RunningModel,
                 history: History, evaluator: evaluators.Evaluator | None = None) -> None:
        self.settings = settings
        self.ledger = ledger
        self.store = store
        self.model = model
        self.history = history
        self.policy = FoldPolicy.of(settings)
        # Where gates and fold checks are scored (coordinator.fold.evaluators.evaluator_for picks it);
        # rollback and unmerge score on the running model itself (their weights are not a version yet).
        self.evaluator = evaluator or evaluators.OnCoordinator(model, settings.eval_dtype)
        # Folding, rollback and unmerge each turn the newest version into the next one; the
        # lock makes them take turns (admin calls arrive on gRPC threads).
        self.lock = threading.Lock()
        self._validation: dict[str, list[str]] = {}
        self._eval_sets: dict[str, evaluation.EvalSet] = {}
        # (version, where they were measured, job id -> losses): the newest version's parents
        self._parent_losses: tuple[int | None, str, dict[str, evaluation.Losses]] = (None, "", {})
        # The version the in-memory model holds. Another folder (a leader before this one) may
        # publish meanwhile: every fold first catches up to the ledger's newest (_catch_up).
        self.version: int = ledger.versions.latest() or 0
        self._resync = False  # the weights may differ from self.version's: rebuild before the next fold
        self._dirty = False  # a patch went into the master and is not published yet
        self.term = Term()  # the folder's fence for this round's writes (coordinator.ledger.leaders)
        # Unexpected fold errors: which adapters are suspects, how long to back off, whom to park.
        self.failures = FoldFailures(settings.tick_s)
        # Shard samples are drawn with the operating system's randomness: a volunteer cannot know
        # which of its shard's blocks will be read, so it cannot train on those alone.
        self._sampler = random.SystemRandom()
        self.shard_eval_tokens = 0  # tokens of shard samples scored so far (bench/shardproof.py)

    # -- evaluation sets ----------------------------------------------------------------------

    def validation(self, job_id: str) -> list[str]:
        if job_id not in self._validation:
            job = self.ledger.jobs.get(job_id)
            self._validation[job_id] = read_records(self.store.get(job.records), 0, job.n_validation)
        return self._validation[job_id]

    def _seq_len(self, job_id: str) -> int:
        return self.ledger.jobs.get(job_id).config.seq_len

    def _eval_set(self, job_id: str) -> evaluation.EvalSet:
        """The job's budgeted blocks (Settings.eval_tokens): every evaluation of it reads these."""
        if job_id not in self._eval_sets:
            self._eval_sets[job_id] = self.model.eval_set(self.validation(job_id), self._seq_len(job_id),
                                                          self.settings.eval_tokens)
        return self._eval_sets[job_id]

    def _evaluate(self, version: int, job_ids: list[str],
                  candidates: Sequence[tuple[str, adapter_format.Adapter]] = (),
                  samples: dict[str, evaluation.EvalSet] | None = None,
                  skip_parents: set[str] | frozenset[str] = frozenset()) -> evaluators.Evaluated:
        """One batch: the version's losses on each job's set (reusing those known for it, where
        they were measured) and the version plus each candidate patch on its job's set; with
        ``samples`` (key -> blocks: shard samples), the version on each of them too (but those
        in ``skip_parents``), and a candidate may name one of their keys instead of a job."""
        known_version, known_where, known = self._parent_losses
        if known_version != version:
            known_version, known_where, known = version, "", {}
        samples = samples or {}
        jobs = sorted({*job_ids, *(j for j, _ in candidates)} - set(samples))
        result = self.evaluator.evaluate(evaluators.Batch(
            version, {**{j: self._eval_set(j) for j in jobs}, **samples},
            (*job_ids, *(k for k in samples if k not in skip_parents)),
            tuple(candidates), known, known_where))
        kept = known if result.where == known_where else {}
        self._parent_losses = (version, result.where, {**kept, **result.parents})
        return result

    def _parents(self, job_ids: list[str], version: int) -> dict[str, evaluation.Losses]:
        """The current model's losses on each job's set, measured once per version and place."""
        return self._evaluate(version, job_ids).parents

    def _eval(self, job_ids: list[str]) -> float:
        """Mean held-out loss of the running model over the jobs' sets (each job weighs the same),
        on the coordinator: after a rollback or unmerge, whose weights are not a version yet."""
        losses = [self.model.losses(self._eval_set(j), None, self.settings.eval_dtype) for j in job_ids]
        return sum(v.mean for v in losses) / len(losses)

    def record_base_losses(self) -> None:
        """Give every new job the loss of the version it starts from, for comparison."""
        latest = self.ledger.versions.latest() or 0
        for job_id in self.ledger.jobs.running_ids():
            job = self.ledger.jobs.get(job_id)
            if job and job.state is JobState.RUNNING and job.base_loss is None:
                self.ledger.jobs.set_base(job_id, self._parents([job_id], latest)[job_id].mean, latest)

    # -- folding ------------------------------------------------------------------------------

    def due(self, buffered: list[AdapterRecord], idle_jobs: set[str], now: float) -> bool:
        oldest_wait = now - (buffered[0].accepted or now) if buffered else 0.0
        return self.policy.due(len(buffered), oldest_wait, any(a.job in idle_jobs for a in buffered))

    def maybe_fold(self, idle_jobs: set[str], now: float | None = None, leader: Fence | None = None) -> int | None:
        """Fold if due; returns the published version number, or None. ``leader``: the folder's
        fence, which the version published and the adapters refused carry (NotLeader when it no
        longer leads). The model first catches up to the ledger's newest version."""
        with self.lock:
            if self.failures.waiting(time.monotonic()):
                return None  # backing off after an unexpected fold error
            self.term.fence = leader
            self._catch_up()
            self.record_base_losses()
            buffered = self.ledger.adapters.buffered()
            if not self.due(buffered, idle_jobs, now or time.time()):
                return None
            batch = self.failures.batch(buffered, self.policy.take())
            started = time.monotonic()
            try:
                version = self.fold(batch)
            except Exception as exc:
                self._failed(batch, exc)
                raise
            self.failures.succeeded(batch)
            self.ledger.counters.fold(time.monotonic() - started, published=version is not None)
            return version

    def _catch_up(self) -> None:
        """Bring the in-memory model to the ledger's newest version: by its patches when another
        folder published after ours (exact: the same fp32 operations it performed), by a rebuild
        when ours may be off (a fold or operation cut short) or the way there has a rollback."""
        latest = self.ledger.versions.latest() or 0
        if not self._resync and latest == self.version:
            return
        self._parent_losses = (None, "", {})
        ahead = [self.ledger.versions.get(v) for v in range(self.version + 1, latest + 1)]
        if self._resync or latest < self.version or any(r is None or r.operation == "rollback" for r in ahead):
            self.model = self.history.rebuild(latest, into=self.model)
            log.info("the model was rebuilt at version %d from the ledger", latest,
                     extra=fields("fold.resynced", version=latest))
        else:
            for record in ahead:
                patch = self.history.patch(record.version)
                folding.apply_patch(self.model.master(patch.modules()), patch)
            log.info("caught up from version %d to %d by patch (another folder published them)", self.version,
                     latest, extra=fields("fold.caught_up", version=latest, parent=self.version))
        self.version, self._resync, self._dirty = latest, False, False

    def _resync_now(self) -> None:
        """After an operation cut short halfway: the weights back in step with the ledger now (or,
        if even that fails, before the next fold)."""
        self._resync = True
        try:
            self._catch_up()
        except Exception:  # noqa: BLE001  (the next fold tries again; the first error is the one to report)
            log.exception("resyncing the model with the ledger failed; the next fold tries again")

    def _failed(self, batch: list[AdapterRecord], exc: Exception) -> None:
        """A fold raised. The ledger is the truth: the weights are rebuilt only if a patch went in
        unpublished. An error that is no adapter's (Redis away, this process no longer leads,
        another folder published first) is only reported; any other is counted
        (coordinator.fold.failures), and an adapter that keeps failing alone is parked: refused
        with the reason, logged and counted."""
        if self._dirty:
            self._resync = True
        if isinstance(exc, (NotLeader, redis.RedisError, VersionConflict)):
            return  # the next fold catches up with the ledger
        entry = self.failures.failed(batch, time.monotonic())
        if entry is None:
            return
        reason = (f"folding it failed {self.failures.park_after} times in a row ({type(exc).__name__}: {exc}); it is "
                  "set aside so that the adapters behind it can be folded")
        log.error("adapter %s of task %s (worker %s) parked: %s", entry.adapter_id, entry.task, entry.worker or "?",
                  reason, extra=fields("adapter.parked", job=entry.job, task=entry.task, worker=entry.worker or None,
                                       adapter=entry.adapter_id, reason=reason))
        self.ledger.adapters.reject(entry.adapter_id, reason, leader=self.term.fence, kind=REFUSED_PARKED)

    def fold(self, entries: list[AdapterRecord]) -> int | None:
        current = self.version
        job_ids = sorted({e.job for e in entries})
        log.info("folding %d adapters onto version %d (jobs %s)", len(entries), current, ", ".join(job_ids),
                 extra=fields("fold.started", version=current, jobs=job_ids, adapters=len(entries)))
        candidates = self._gate(entries, current)
        if not candidates:
            log.warning("no version after %d: all %d adapters were refused", current, len(entries),
                        extra=fields("fold.empty", version=current, jobs=job_ids, adapters=len(entries)))
            return None
        # K, the fold width each one's task was sized for: a fold of fewer takes part of a step.
        widths = {t.task_id: t.fold_width for t in self.ledger.tasks.many([c.task_id for c in candidates])}
        for c in candidates:
            c.fold_width = widths.get(c.task_id, 1)
        while candidates:
            weights = self.policy.weights([c.tokens for c in candidates], [c.tau for c in candidates],
                                          max(c.fold_width for c in candidates))
            delta = folding.build_patch([c.adapter for c in candidates], weights)
            patch = self._outer_step(delta, current)
            # The folded model is evaluated as current + patch on the side (nothing copied), and
            # the patch goes into the master only once the fold is to be published.
            check = self._evaluate(current, job_ids, [(j, patch) for j in job_ids])
            losses = dict(zip(job_ids, check.candidates))
            compared = [evaluation.paired(check.parents[j], losses[j]) for j in job_ids]
            loss = sum(c.candidate for c in compared) / len(compared)
            parent_loss = sum(c.parent for c in compared) / len(compared)
            if self.policy.publishable(loss, parent_loss):
                self._dirty = True  # until published: a failure now leaves the master ahead of the ledger
                folding.apply_patch(self.model.master(patch.modules()), patch)
                self._parent_losses = (current + 1, check.where, losses)
                se = math.sqrt(sum(c.se ** 2 for c in compared)) / len(compared)
                return self._publish(current, candidates, weights, patch, loss, parent_loss, job_ids,
                                     delta if patch is not delta else None,
                                     {"paired_se": se, "eval_tokens": sum(c.tokens for c in compared),
                                      "evaluated_on": check.where})
            worst = candidates[self.policy.worst([c.solo_loss for c in candidates])]
            reason = f"folding it made held-out loss worse ({loss:.4f} against {parent_loss:.4f})"
            self.ledger.adapters.reject(worst.adapter_id, reason, check=Check.FOLD, leader=self.term.fence)
            log.warning("the fold of %d adapters raised held-out loss %.4f -> %.4f; dropping the worst, %s "
                        "(worker %s), and trying again", len(candidates), parent_loss, loss, worst.adapter_id,
                        worst.worker_id or "?",
                        extra=fields("adapter.dropped", job=worst.job_id, worker=worst.worker_id or None,
                                     version=current, adapter=worst.adapter_id, loss=loss, parent_loss=parent_loss,
                                     reason=reason))
            candidates.remove(worst)
        log.warning("no version after %d: every fold of these adapters made held-out loss worse", current,
                    extra=fields("fold.rolled_back", version=current, jobs=job_ids, adapters=len(entries)))
        return None

    def _gate(self, entries: list[AdapterRecord], current: int) -> list[Candidate]:
        """The adapters that pass the gates: first the checks that need no model (format, staleness,
        norm), then one evaluation of the jobs' parents and every survivor's solo update."""
        admitted = [c for c in (self._admit(e, current) for e in entries) if c]
        if not admitted:
            return []
        solos = [(c.job_id, lora.build_patch([c.adapter], [folding.staleness_factor(c.tau)])) for c in admitted]
        samples = self._shard_samples(admitted)
        proofs = [(c.shard_set, patch) for c, (_, patch) in zip(admitted, solos) if c.shard_set]
        peers = shard_proof.peer_references(self.policy, admitted)
        # Each reference on its candidate's held-out blocks and shard sample (then the version's
        # own losses on that sample are not needed).
        against = [(key, peers[c.adapter_id]) for c in admitted if c.adapter_id in peers
                   for key in (c.job_id, c.shard_set)]
        scored = self._evaluate(current, sorted({e.job for e in entries}), solos + proofs + against, samples,
                                skip_parents={c.shard_set for c in admitted if c.adapter_id in peers})
        on_shard = dict(zip([key for key, _ in proofs], scored.candidates[len(solos):]))
        rest = iter(scored.candidates[len(solos) + len(proofs):])
        on_peers = {c.adapter_id: (next(rest), next(rest)) for c in admitted if c.adapter_id in peers}
        passed = []
        for candidate, losses in zip(admitted, scored.candidates):
            compared = evaluation.paired(scored.parents[candidate.job_id], losses)
            candidate.solo_loss = compared.candidate
            log.debug("adapter %s: held-out %+.4f ± %.4f nats over %d tokens (on %s)", candidate.adapter_id,
                      compared.difference, compared.se, compared.tokens, scored.where)
            try:
                self.policy.judge(compared.candidate, compared.parent)
                if candidate.adapter_id in on_peers:  # against its peers' mean update, on the same blocks
                    held_ref, shard_ref = on_peers[candidate.adapter_id]
                    held, shard = (evaluation.paired(held_ref, losses),
                                   evaluation.paired(shard_ref, on_shard[candidate.shard_set]))
                    log.debug("adapter %s against its peers: held-out %+.4f ± %.4f, its shard %+.4f ± %.4f nats",
                              candidate.adapter_id, held.difference, held.se, shard.difference, shard.se)
                    self.policy.learned_from_shard(held, shard, against="against its peers' mean update")
                elif candidate.shard_set:
                    shard = evaluation.paired(scored.parents[candidate.shard_set], on_shard[candidate.shard_set])
                    log.debug("adapter %s: its shard %+.4f ± %.4f nats over %d tokens", candidate.adapter_id,
                              shard.difference, shard.se, shard.tokens)
                    self.policy.learned_from_shard(compared, shard)
            except folding.AdapterRejected as exc:
                self._refuse(candidate.entry, exc)
                continue
            passed.append(candidate)
        return passed

    def _shard_samples(self, admitted: list[Candidate]) -> dict[str, evaluation.EvalSet]:
        """Each candidate's shard sample, keyed by the name it is scored under (sets each
        candidate's ``shard_set``); none when the policy has the shard proof off."""
        if not self.policy.proves_shards:
            return {}
        samples: dict[str, evaluation.EvalSet] = {}
        for c in admitted:
            sample = shard_proof.sample(self.ledger, self.store, self.model.tokenizer, self.policy, self._sampler,
                                        c.job_id, c.task_id)
            if sample is not None:
                c.shard_set = f"{c.job_id}/shard/{c.adapter_id}"
                samples[c.shard_set] = sample
                self.shard_eval_tokens += sample.tokens
        return samples

    def _copied(self, entry: AdapterRecord) -> str:
        """The task whose adapter ``entry``'s bytes already are, "" when they are its own: a
        replica or speculative twin of a task may hand in the very same bytes, another task not."""
        task = self.ledger.tasks.get(entry.task)
        own = (task.replica_of or task.twin_of or entry.task) if task else entry.task
        first = self.ledger.adapters.first_task_with(entry.job, entry.sha256, own)
        return "" if first == own else first

    def _admit(self, entry: AdapterRecord, current: int) -> Candidate | None:
        """The adapter, if it passes the checks that need no evaluation."""
        try:
            original = self._copied(entry)
            if original:
                raise folding.AdapterRejected(f"it is a copy of the adapter of task {original}, byte for byte",
                                              check="copy")
            adapter = adapter_format.from_bytes(self.store.get(entry.sha256))
            tau = current - entry.base_version
            norm = folding.delta_norm(adapter)
            self.policy.admit(entry.tokens, tau, norm, self.ledger.adapters.recent_norms())
            return Candidate(entry.adapter_id, entry.job, entry.worker, adapter, entry.tokens, tau, norm,
                             task_id=entry.task, entry=entry)
        except (adapter_format.AdapterFormatError, folding.AdapterRejected, FileNotFoundError) as exc:
            self._refuse(entry, exc)
            return None

    def _refuse(self, entry: AdapterRecord, exc: Exception) -> None:
        adapter_id = entry.adapter_id
        log.warning("adapter %s of task %s (worker %s) refused at the fold: %s", adapter_id, entry.task,
                    entry.worker or "?", exc,
                    extra=fields("adapter.rejected", job=entry.job, task=entry.task,
                                 worker=entry.worker or None, adapter=adapter_id, reason=str(exc)))
        # The check it failed counts against its volunteer; a blob the store lost does not.
        check = None if isinstance(exc, FileNotFoundError) else Check(getattr(exc, "check", "malformed"))
        self.ledger.adapters.reject(adapter_id, str(exc), check=check, leader=self.term.fence)

    def _outer_step(self, delta: adapter_format.Adapter, current: int) -> adapter_format.Adapter:
        """Plain folding applies the delta (times --outer-lr); with --outer-momentum, DiLoCo's
        Nesterov step over the plain deltas of the versions before (a rollback or unmerge resets it)."""
        previous = []
        for v in range(current, 0, -1) if self.policy.wants_previous() else ():
            record = self.ledger.versions.get(v)
            if record.operation or len(previous) >= self.policy.wants_previous():
                break
            previous.append(adapter_format.from_bytes(self.store.get(record.delta or record.patch)))
        return self.policy.outer_step(delta, previous)

    def _new_version(self, current: int, patch: adapter_format.Adapter, adapters: Sequence[FoldedAdapter],
                     loss: float, metrics: dict[str, Any], job_id: str, *, snapshot: bool = False,
                     delta: adapter_format.Adapter | None = None) -> VersionRecord:
        """The record of the version after ``current``: every version after 0 is made here (a
        fold, a rollback, an unmerge). Its patch (and plain delta) go to the store; every
        ``snapshot_every``-th version, and any with ``snapshot``, also stores the model folder.
        (Publishing it fails if ``current`` is no longer the newest: another fold came first.)"""
        number = current + 1
        card = modelcard.make(self.ledger, self.store, base_model=self.settings.base_model,
                              lineage=self.history.lineage().id, version=number, parent=current, eval_loss=loss,
                              folded=[(a.id, a.weight) for a in adapters],
                              job_ids=list(metrics.get("jobs") or [j for j in job_id.split(",") if j]),
                              operation=metrics.get("operation", ""))
        return VersionRecord(
            version=number, parent=current, patch=self.store.put(adapter_format.to_bytes(patch)),
            files=self.model.publish(self.store) if snapshot or number % self.settings.snapshot_every == 0 else {},
            adapters=tuple(adapters), eval_loss=loss, metrics={**metrics, modelcard.CARD_KEY: card}, job_id=job_id,
            delta=self.store.put(adapter_format.to_bytes(delta)) if delta is not None else "",
        )

    def _publish(self, current, candidates, weights, patch, loss, parent_loss, job_ids, delta=None,
                 measured: dict[str, Any] | None = None) -> int:
        # ``delta``: the plain fold, which the next outer steps' momentum is made of
        record = self._new_version(
            current, patch, [FoldedAdapter(c.adapter_id, w, c.tau) for c, w in zip(candidates, weights)], loss,
            {"parent_loss": parent_loss, "jobs": job_ids, **(measured or {})}, ",".join(job_ids), delta=delta)
        self.ledger.versions.publish(
            record,
            folded=[(c.adapter_id, w) for c, w in zip(candidates, weights)],
            norms=[c.norm for c in candidates],
            leader=self.term.fence,
        )
        self.version, self._dirty = record.version, False
        where = (measured or {}).get("evaluated_on", evaluators.COORDINATOR)
        log.info("folded version %d from %d adapters (jobs %s): held-out loss %.4f -> %.4f, evaluated on %s",
                 record.version, len(candidates), ", ".join(job_ids), parent_loss, loss,
                 where if where == evaluators.COORDINATOR else f"worker {where}",
                 extra=fields("version.folded", version=record.version, parent=current, jobs=job_ids,
                              job=job_ids[0] if len(job_ids) == 1 else None, loss=loss, parent_loss=parent_loss,
                              evaluated_on=where,
                              contributions=[{"adapter": c.adapter_id, "job": c.job_id, "worker": c.worker_id,
                                              "weight": round(w, 6), "tokens": c.tokens, "staleness": c.tau}
                                             for c, w in zip(candidates, weights)]))
        return record.version

    # -- history operations (admin): coordinator.fold.rollback does them under this lock ------

    def rollback(self, target: int) -> tuple[int, float]:
        """A new version whose weights equal version ``target``'s exactly (:func:`rollback.rollback`)."""
        return rollback.rollback(self, target)

    def unmerge(self, adapter_id: str) -> tuple[int, float]:
        """A new version without one adapter's contribution (:func:`rollback.unmerge`)."""
        return rollback.unmerge(self, adapter_id)
