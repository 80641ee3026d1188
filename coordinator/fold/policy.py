"""The fold policy: every decision of a fold, as pure code the folder and the benchmark share.

A strategy in Flower's manner, one method per step of a fold, each deciding from numbers it is
given (the caller does the I/O: reading adapters, evaluating losses, publishing):

1. :meth:`FoldPolicy.due`: is a fold due (enough adapters wait, the oldest waited long enough,
   or a job with nothing else outstanding waits on the buffer)? :meth:`FoldPolicy.take` says how
   many of the buffered adapters one fold looks at;
2. :meth:`FoldPolicy.admit` and :meth:`FoldPolicy.judge`: the per-adapter gates, before its
   held-out evaluation (staleness, update norm) and after it (its solo loss);
   :meth:`FoldPolicy.learned_from_shard`: the proof that it learned from its own shard;
3. :meth:`FoldPolicy.weights`: each survivor's weight (DESIGN.md, "Folding math");
4. :meth:`FoldPolicy.outer_step`: the patch the fold applies (plain, or DiLoCo's Nesterov step);
5. :meth:`FoldPolicy.publishable` and :meth:`FoldPolicy.worst`: publish the fold, or drop the
   worst contributor and retry.

It also sizes the tasks whose adapters a fold will average (:meth:`FoldPolicy.task_training`):
K adapters trained from one version and averaged act as one step of their summed batch, so each
task trains at the job's batch divided by K, with K times the steps (the same tokens), at
:func:`lr_scale` times the job's learning rate. ``coordinator.schedule.scheduler`` calls it when it builds
a task, ``bench/qsim.py`` when it simulates one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.fold import folding
from coordinator.settings import Settings
from nomoat.adapter import Adapter
from nomoat.evaluation import Comparison

# How many of the most recently folded adapters' norms the norm gate compares against.
RECENT_NORMS = 64


def lr_scale(k: float) -> float:
    """The learning-rate multiplier for a task trained at 1/k of the job's batch: ``sqrt(k)``.

    k tasks at batch b/k take k times the (noisier) steps that one task at batch b would take;
    the square-root rule for a smaller batch under Adam makes their steps larger again.
    bench/quality.py measured it at k = 4 (one pass, 4 workers on the demo corpus; bench/README.md):
    at the job's lr the folded model reached 0.670 of the best centralized run, at twice it (the
    rule's sqrt(4)) 0.742; 0.781 together with normalised staleness weights. k = 1 is the job's lr.
    """
    if not k >= 1:
        raise ValueError(f"a task trains at the job's batch or a fraction of it, not 1/{k}")
    return math.sqrt(k)


@dataclass(frozen=True)
class TaskTraining:
    """The batch and learning rate one task trains at, and the K they were sized for."""

    batch_size: int
    learning_rate: float
    fold_width: int  # K: the adapters the next fold is expected to average (1: not scaled)


@dataclass(frozen=True)
class FoldPolicy:
    """The fields of :class:`coordinator.settings.Settings` that decide a fold, and the decisions."""

    fold_every: int = 4
    fold_timeout_s: float = 120.0
    max_staleness: int = 16
    eval_epsilon: float = 0.02
    adapter_epsilon: float = 0.1
    norm_factor: float = 20.0
    normalise: bool = True
    outer_momentum: float = 0.0
    outer_lr: float = 1.0
    outer_terms: int = 8
    keep_global_batch: bool = True
    task_seconds: float = 60.0  # about how long a card's run of a job takes (target_task_seconds)
    size_from_noise: bool = False
    partial_folds: bool = True  # a fold of m < K adapters sized for K takes m/K of a step
    # The shard proof (learned_from_shard): its margin in paired standard errors (0: off) and the
    # tokens of the adapter's own shard it reads (Settings.shard_sigmas says more).
    shard_sigmas: float = 2.0
    shard_tokens: int = 2048
    shard_window_tokens: int = 4096  # the sample is drawn from the blocks its task trained on last
    peer_distance: float = 0.5  # peers closer than this to an adapter's update are not its reference

    @classmethod
    def of(cls, settings: Settings) -> FoldPolicy:
        return cls(
            fold_every=settings.fold_every, fold_timeout_s=settings.fold_timeout_s,
            max_staleness=settings.max_staleness, eval_epsilon=settings.eval_epsilon,
            adapter_epsilon=settings.adapter_epsilon, norm_factor=settings.norm_factor,
            normalise=settings.normalise_staleness, outer_momentum=settings.outer_momentum,
            outer_lr=settings.outer_lr, outer_terms=settings.outer_terms,
            keep_global_batch=settings.keep_global_batch, task_seconds=settings.target_task_seconds,
            size_from_noise=settings.size_from_noise, partial_folds=settings.partial_folds,
            shard_sigmas=settings.shard_sigmas, shard_tokens=settings.shard_tokens,
            shard_window_tokens=settings.shard_window_tokens,
        )

    # -- task sizing --------------------------------------------------------------------------

    def fold_width(self, cards: int, tasks: int | None = None) -> int:
        """K, the adapters the next fold of a job averages: ``fold_every`` of them, or fewer when
        the ``cards`` working the job deliver fewer before the fold timeout fires, or when the
        job has only ``tasks`` tasks in all; at least 1.

        Each card hands in about one run per ``task_seconds``, and until the fold every run trains
        from the same version, so a card's second run before the timeout is one more adapter of
        the same fold (2 cards, fold_every 4, 120 s timeout, 60 s runs: K = 4, not 2)."""
        per_card = max(1, int(self.fold_timeout_s // max(self.task_seconds, 1e-9)))
        k = min(self.fold_every, cards * per_card)
        if tasks is not None:
            k = min(k, tasks)  # a 3-task job's fold never averages 4
        return max(1, k)

    def task_training(self, batch_size: int, learning_rate: float, cards: int,
                      noise_scale: float | None = None, tasks: int | None = None) -> TaskTraining:
        """The batch and lr a task of a job with ``batch_size`` and ``learning_rate`` trains at,
        while ``cards`` cards can work the job at once (keep the global batch: DESIGN.md);
        ``tasks``: how many tasks the job has in all (None: many).

        With ``size_from_noise`` and a ``noise_scale`` (the job's B_simple in sequences:
        coordinator.schedule.noise), the global batch the fold adds up to is the noise scale, rounded,
        between K (one sequence per task) and the job's batch: Pollux's goodput idea, a batch not
        far above the critical one, where a larger batch buys little progress per step. Tokens
        per task stay the job's, so a smaller batch means more steps; the lr follows the
        square-root rule for the batch each task trains at against the job's."""
        if not self.keep_global_batch:
            return TaskTraining(batch_size, learning_rate, 1)
        k = self.fold_width(cards, tasks)
        global_batch = batch_size
        if self.size_from_noise and noise_scale is not None and noise_scale > 0:
            global_batch = min(batch_size, max(k, round(noise_scale)))
        task_batch = max(1, global_batch // k)
        return TaskTraining(task_batch, learning_rate * lr_scale(max(1.0, batch_size / task_batch)), k)

    # -- when -------------------------------------------------------------------------------

    def due(self, buffered: int, oldest_wait_s: float, a_job_waits: bool) -> bool:
        """Fold now? ``buffered`` adapters wait, the oldest for ``oldest_wait_s``; ``a_job_waits``:
        one of them belongs to a job with nothing else outstanding (its tail must not be stuck)."""
        if buffered <= 0:
            return False
        return buffered >= self.fold_every or oldest_wait_s >= self.fold_timeout_s or a_job_waits

    def take(self) -> int:
        """How many of the buffered adapters, oldest first, one fold looks at."""
        return max(self.fold_every, 1) * 4

    # -- the gates ----------------------------------------------------------------------------

    def admit(self, tokens: int, tau: int, norm: float, recent_norms: Sequence[float]) -> None:
        """The gates before an adapter's held-out evaluation: its token count and staleness can
        be weighed, its update norm is within ``norm_factor`` of the recent median. Raises
        :class:`coordinator.fold.folding.AdapterRejected` with the reason."""
        folding.fold_weights([tokens], [tau], self.max_staleness)
        folding.check_norm(norm, list(recent_norms)[:RECENT_NORMS], self.norm_factor)

    def judge(self, solo_loss: float, parent_loss: float) -> None:
        """The gate after it: the current model plus the adapter alone (at its staleness factor)
        may not be worse on its job's held-out slice by more than ``adapter_epsilon``."""
        if not solo_loss <= parent_loss + self.adapter_epsilon:
            raise folding.AdapterRejected(
                f"it makes held-out loss worse ({solo_loss:.4f} against {parent_loss:.4f})", check="loss"
            )

    @property
    def proves_shards(self) -> bool:
        """Whether the gates include :meth:`learned_from_shard` (and the folder reads shard samples)."""
        return self.shard_sigmas > 0 and self.shard_tokens > 0

    def learned_from_shard(self, held_out: Comparison, shard: Comparison, against: str = "") -> None:
        """The proof of training on the assigned shard (Templar's idea): the current model plus the
        adapter, against the current model, lowers loss on a sample of the adapter's own shard by
        ``shard_sigmas`` paired standard errors, and by that many more than on its job's held-out
        slice.

        ``against``: what the comparisons' "parent" is when it is not the current model, for the
        refusal's wording. The folder compares an adapter with its peers' mean update where it has
        peers (:meth:`peers_of`): text both learned alike cancels block by block, so the same gap
        stands out in far fewer standard errors of noise (bench/shardproof.py).

        An honest adapter saw those very blocks and fits them better than text it never saw; an
        adapter trained on other data (or another volunteer's, which saw another shard) improves
        its shard no more than any unseen text, and a random update improves neither. The two
        comparisons are on disjoint blocks, so their errors add in quadrature; a side with fewer
        than two blocks has no error estimate, and then the gap need only be positive.
        """
        gap = (held_out.candidate - held_out.parent) - (shard.candidate - shard.parent)
        se = math.hypot(*(x for x in (held_out.se, shard.se) if math.isfinite(x)))
        shard_se = shard.se if math.isfinite(shard.se) else 0.0
        # Both: its shard must improve in itself too, or an update that hurts every text (held-out
        # text a little more than its shard) would pass on the gap alone.
        if not (gap > self.shard_sigmas * se and shard.parent - shard.candidate > self.shard_sigmas * shard_se):
            raise folding.AdapterRejected(
                f"it did not learn from its own shard: {against + ', it' if against else 'it'} lowers loss "
                f"on a sample of its shard by "
                f"{shard.parent - shard.candidate:+.4f} nats and on held-out text by "
                f"{held_out.parent - held_out.candidate:+.4f}, a gap of {gap:.4f} where "
                f"{self.shard_sigmas:g} standard errors are {self.shard_sigmas * se:.4f}", check="shard")

    def peers_of(self, mine: int, jobs: Sequence[str], distances: Sequence[float]) -> list[int]:
        """Which of a gate batch's adapters (their ``jobs``) are candidate ``mine``'s peers for the
        shard proof: the others of its job, less any whose update is within ``peer_distance`` of
        its own (``distances``: replication's relative distance to each; a copy of its update,
        whose volunteer is refused for it, would otherwise cancel what it learned)."""
        return [k for k, job in enumerate(jobs)
                if k != mine and job == jobs[mine] and distances[k] > self.peer_distance]

    # -- the fold -----------------------------------------------------------------------------

    def weights(self, tokens: Sequence[int], taus: Sequence[int], fold_width: int = 1) -> list[float]:
        """Each survivor's weight: ``n_i s(τ_i)`` normalised (DESIGN.md, "Folding math"), times
        ``m / K`` when the fold holds only m of the ``fold_width`` = K adapters its tasks were
        sized for (keep the global batch; ``partial_folds``).

        An adapter trained at the job's batch / K is one K-th of a step: K of them average to one
        step of the job's batch. Folded alone (the fold timed out, a small job's tail, a job with
        fewer tasks than K) it would be a whole step taken on 1/K of the batch at a raised lr,
        noisy enough that the publish gate refused every such fold (bench/README.md, a 3-task
        job on short blocks). At m/K each adapter counts as its share of the step, whenever it
        folds: a job's K adapters add up to one step however they are split across folds."""
        weights = folding.fold_weights(tokens, taus, self.max_staleness, normalise=self.normalise)
        if self.partial_folds and fold_width > len(weights):
            share = len(weights) / fold_width
            weights = [w * share for w in weights]
        return weights

    def outer_step(self, delta: Adapter, previous: Sequence[Adapter]) -> Adapter:
        """The patch to apply for the folded ``delta``; ``previous``: the plain deltas of the
        folds before, newest first (only read with outer momentum, at most ``outer_terms``)."""
        previous = list(previous)[: self.outer_terms] if self.outer_momentum else []
        return folding.outer_step(delta, previous, self.outer_momentum, self.outer_lr)

    def wants_previous(self) -> int:
        """How many previous plain deltas :meth:`outer_step` reads (0 without outer momentum)."""
        return self.outer_terms if self.outer_momentum else 0

    def publishable(self, loss: float, parent_loss: float) -> bool:
        """Publish the folded version? Its held-out loss may be worse by ``eval_epsilon`` at most."""
        return loss <= parent_loss + self.eval_epsilon

    @staticmethod
    def worst(solo_losses: Sequence[float]) -> int:
        """The contributor to drop when a fold is not publishable: the worst solo loss."""
        return max(range(len(solo_losses)), key=lambda i: solo_losses[i])
