"""The gradient noise scale of a job, from the two gradient norms its workers report.

Pure arithmetic, no I/O. McCandlish et al. 2018 ("An empirical model of large-batch training",
appendix A): the squared norm of a mean gradient over B examples has expectation

    E|G_B|² = |G|² + tr(Σ) / B,

so two batch sizes ``b < B`` give unbiased estimates of the true gradient's squared norm and of
the noise's trace,

    |G|² ≈ (B·|G_B|² − b·|G_b|²) / (B − b),      tr(Σ) ≈ (|G_b|² − |G_B|²) / (1/b − 1/B),

and ``B_simple = tr(Σ) / |G|²``: about the batch beyond which a larger batch buys little more
progress per step (the critical batch). Each is noisy and their ratio is biased, so, as the
paper does, the two are smoothed separately (an exponential moving average over the tasks of a
job, bias-corrected as Adam's moments are) and only then divided.

A worker measures them while it trains (``worker.trainer.GradientNorms``: a micro-batch and the
whole batch of each step); the coordinator folds each accepted adapter's pair into its job's
:class:`NoiseScale` and :meth:`coordinator.fold.policy.FoldPolicy.task_training` may size tasks by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Each task's estimate weighs 1 − DECAY in the average: about the last ten tasks count.
DECAY = 0.9


@dataclass(frozen=True)
class Sample:
    """One task's measurement: mean squared gradient norms at two batch sizes (in sequences)."""

    micro_sq: float
    batch_sq: float
    micro_batch: float
    batch_size: float

    def usable(self) -> bool:
        return (self.batch_size > self.micro_batch > 0 and math.isfinite(self.micro_sq)
                and math.isfinite(self.batch_sq) and self.micro_sq >= 0 and self.batch_sq >= 0)


def unbiased(sample: Sample) -> tuple[float, float]:
    """``(|G|², tr(Σ))`` estimated from one sample (either may come out negative: they are noisy)."""
    b, big = sample.micro_batch, sample.batch_size
    g2 = (big * sample.batch_sq - b * sample.micro_sq) / (big - b)
    trace = (sample.micro_sq - sample.batch_sq) / (1.0 / b - 1.0 / big)
    return g2, trace


@dataclass(frozen=True)
class NoiseScale:
    """A job's smoothed estimates. ``g2`` and ``trace`` are the raw EMA sums (before bias
    correction); ``samples`` counts the tasks folded in."""

    g2: float = 0.0
    trace: float = 0.0
    samples: int = 0

    def add(self, sample: Sample, decay: float = DECAY) -> NoiseScale:
        """This estimate with one more task's sample (an unusable one changes nothing)."""
        if not sample.usable():
            return self
        g2, trace = unbiased(sample)
        return NoiseScale(decay * self.g2 + (1 - decay) * g2, decay * self.trace + (1 - decay) * trace,
                          self.samples + 1)

    def b_simple(self, decay: float = DECAY) -> float | None:
        """``tr(Σ) / |G|²`` in sequences, or None while there is no (positive) estimate."""
        if self.samples == 0:
            return None
        correction = 1 - decay ** self.samples  # the same for both: it cancels in the ratio
        g2, trace = self.g2 / correction, self.trace / correction
        if g2 <= 0 or trace <= 0:
            return None  # the noise swamps the signal so far; no figure yet
        return trace / g2
