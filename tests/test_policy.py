"""The fold policy's decisions from plain numbers (coordinator/fold/policy.py): the folder and the
quality benchmark both fold through it, so its rules are stated here once."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from coordinator.fold.folding import AdapterRejected
from coordinator.fold.policy import FoldPolicy, lr_scale
from coordinator.settings import Settings


def test_the_policy_is_the_settings() -> None:
    settings = Settings(data_dir=Path("unused"), fold_every=3, max_staleness=5, normalise_staleness=False,
                        keep_global_batch=False, outer_momentum=0.9, outer_terms=2)
    policy = FoldPolicy.of(settings)
    assert (policy.fold_every, policy.max_staleness, policy.normalise, policy.keep_global_batch,
            policy.outer_momentum, policy.wants_previous()) == (3, 5, False, False, 0.9, 2)
    assert FoldPolicy.of(Settings(data_dir=Path("unused"))) == FoldPolicy()  # the same defaults


@pytest.mark.parametrize("buffered,wait,job_waits,due", [
    (0, 999.0, True, False),   # nothing to fold
    (3, 0.0, False, False),    # fewer than fold_every, none waited long
    (4, 0.0, False, True),     # fold_every wait
    (1, 120.0, False, True),   # the oldest waited fold_timeout_s
    (1, 0.0, True, True),      # a job with nothing else outstanding
])
def test_a_fold_is_due(buffered: int, wait: float, job_waits: bool, due: bool) -> None:
    assert FoldPolicy(fold_every=4, fold_timeout_s=120.0).due(buffered, wait, job_waits) is due


def test_the_gates() -> None:
    policy = FoldPolicy(max_staleness=2, norm_factor=10.0, adapter_epsilon=0.1)
    policy.admit(100, 2, 5.0, [1.0, 1.0])
    with pytest.raises(AdapterRejected, match="more than the bound of 2"):
        policy.admit(100, 3, 1.0, [])
    with pytest.raises(AdapterRejected, match="exceeds 10"):
        policy.admit(100, 0, 11.0, [1.0] * 3)
    # Only the newest 64 norms count (newest first, as the ledger keeps them).
    policy.admit(100, 0, 11.0, [2.0] * 64 + [0.001] * 200)
    policy.judge(4.09, 4.0)
    for worse in (4.11, math.nan):
        with pytest.raises(AdapterRejected, match="held-out loss worse"):
            policy.judge(worse, 4.0)


def test_publish_or_drop_the_worst() -> None:
    policy = FoldPolicy(eval_epsilon=0.02)
    assert policy.publishable(4.01, 4.0) and not policy.publishable(4.03, 4.0)
    assert FoldPolicy.worst([4.1, 4.3, 4.2]) == 1


def test_weights_follow_the_normalise_setting() -> None:
    assert sum(FoldPolicy().weights([100, 100], [0, 3])) == pytest.approx(1.0)
    assert FoldPolicy(normalise=False).weights([100, 100], [0, 3]) == pytest.approx([0.5, 0.25])


def test_lr_scale_is_the_measured_rule() -> None:
    assert lr_scale(1) == 1.0 and lr_scale(4) == 2.0  # x2 at K = 4 (bench/README.md)
    with pytest.raises(ValueError):
        lr_scale(0)


@pytest.mark.parametrize("cards,keep,batch,lr,k", [
    (0, True, 8, 1e-3, 1), (1, True, 8, 1e-3, 1), (2, True, 4, 1e-3 * math.sqrt(2), 2),
    (4, True, 2, 2e-3, 4), (16, True, 2, 2e-3, 4), (4, False, 8, 1e-3, 1),
])
def test_task_training_keeps_the_global_batch(cards: int, keep: bool, batch: int, lr: float, k: int) -> None:
    # One run per card before the fold times out (60 s runs, 60 s timeout).
    sized = FoldPolicy(fold_every=4, keep_global_batch=keep, fold_timeout_s=60.0,
                       task_seconds=60.0).task_training(8, 1e-3, cards)
    assert (sized.batch_size, sized.fold_width) == (batch, k)
    assert sized.learning_rate == pytest.approx(lr)


@pytest.mark.parametrize("cards,timeout,k", [(1, 120.0, 2), (2, 120.0, 4), (1, 600.0, 4), (2, 30.0, 2)])
def test_a_cards_runs_before_the_fold_timeout_count_towards_the_fold(cards: int, timeout: float, k: int) -> None:
    # 60 s runs: a card hands in timeout // 60 adapters (at least one) of the same version.
    policy = FoldPolicy(fold_every=4, fold_timeout_s=timeout, task_seconds=60.0)
    assert policy.fold_width(cards) == k
    assert policy.task_training(8, 1e-3, cards).batch_size == 8 // k


def test_a_batch_smaller_than_the_fold_stays_one() -> None:
    assert FoldPolicy(fold_every=8).task_training(2, 1e-3, 8).batch_size == 1


def test_a_job_with_fewer_tasks_than_the_fold_sizes_for_its_own_count() -> None:
    # 3 tasks on 4 cards: the fold never averages 4, so each trains at 8 // 3, not 8 // 4.
    policy = FoldPolicy(fold_every=4, fold_timeout_s=60.0, task_seconds=60.0)
    assert policy.fold_width(4, tasks=3) == 3 and policy.fold_width(4) == 4
    sized = policy.task_training(8, 1e-3, 4, tasks=3)
    assert (sized.batch_size, sized.fold_width) == (2, 3)


def test_a_fold_of_fewer_adapters_than_they_were_sized_for_takes_that_share_of_a_step() -> None:
    # One adapter of a width-3 fold, folded alone (the fold timed out): a third of a step, as it
    # would weigh among its two peers; three of them (in one fold or three) add up to one step.
    policy = FoldPolicy()
    assert policy.weights([100], [0], fold_width=3) == pytest.approx([1 / 3])
    assert sum(policy.weights([100, 300], [0, 0], fold_width=4)) == pytest.approx(0.5)
    assert sum(policy.weights([100] * 5, [0] * 5, fold_width=4)) == pytest.approx(1.0)  # more: still one step
    assert FoldPolicy(partial_folds=False).weights([100], [0], fold_width=3) == [1.0]


@pytest.mark.parametrize("noise,batch,lr", [
    (None, 2, 2e-3),          # no estimate yet: the job's batch over K, lr x sqrt(K)
    (100.0, 2, 2e-3),         # above the job's batch: the job's batch stays the global batch
    (4.4, 1, 1e-3 * math.sqrt(8)),  # a global batch of 4 over K = 4: batch 1, lr x sqrt(8)
    (0.3, 1, 1e-3 * math.sqrt(8)),  # never below one sequence per task
])
def test_the_noise_scale_sizes_the_global_batch(noise: float | None, batch: int, lr: float) -> None:
    policy = FoldPolicy(fold_every=4, size_from_noise=True)
    sized = policy.task_training(8, 1e-3, 4, noise_scale=noise)
    assert (sized.batch_size, sized.fold_width) == (batch, 4)
    assert sized.learning_rate == pytest.approx(lr)
    assert FoldPolicy(fold_every=4).task_training(8, 1e-3, 4, noise_scale=4.4).batch_size == 2  # off: unused
