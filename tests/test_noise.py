"""The gradient noise scale: the estimator on gradients whose noise scale is known, and the
trainer's reported norms against a direct computation on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from coordinator.schedule.noise import NoiseScale, Sample, unbiased
from nomoat.packing import PAD, loss_sum, pack
from nomoat.tiny import read_demo, tiny_model_path
from worker.trainer import LoraSpec, TrainSpec, _lora_model, train_adapter


def regression_sample(gen: torch.Generator, w: torch.Tensor, w_star: torch.Tensor, sigma: float,
                      small: int, big: int, steps: int) -> Sample:
    """What a worker would report for least squares ``½(x·w − y)²``, ``y = x·w* + ε``: per step, one
    batch of ``big`` examples and its first ``small`` as the micro-batch."""
    d = w.numel()
    micro_sq = batch_sq = 0.0
    for _ in range(steps):
        x = torch.randn(big, d, generator=gen, dtype=torch.float64)
        y = x @ w_star + sigma * torch.randn(big, generator=gen, dtype=torch.float64)
        per_example = x * (x @ w - y)[:, None]  # ∇ of each example's loss
        micro_sq += float(per_example[:small].mean(0).pow(2).sum())
        batch_sq += float(per_example.mean(0).pow(2).sum())
    return Sample(micro_sq / steps, batch_sq / steps, small, big)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_the_estimate_recovers_a_known_noise_scale(sigma: float) -> None:
    # x ~ N(0, I_d), δ = w − w*: G = δ and Σ = δδᵀ + (|δ|² + σ²) I, so
    # B_simple = tr(Σ) / |G|² = ((1 + d)|δ|² + d σ²) / |δ|².
    d = 10
    gen = torch.Generator().manual_seed(0)
    w_star = torch.randn(d, generator=gen, dtype=torch.float64)
    delta = torch.randn(d, generator=gen, dtype=torch.float64)
    delta /= delta.norm()
    truth = ((1 + d) + d * sigma ** 2) / 1.0
    estimate = NoiseScale()
    for _ in range(60):
        estimate = estimate.add(regression_sample(gen, w_star + delta, w_star, sigma, 4, 64, steps=40))
    assert estimate.samples == 60
    assert estimate.b_simple() == pytest.approx(truth, rel=0.15)


def test_one_sample_is_unbiased_algebra() -> None:
    # E|G_B|² = |G|² + tr(Σ)/B, exactly: the two estimates invert it.
    g2, trace = 3.0, 40.0
    s = Sample(g2 + trace / 2, g2 + trace / 16, 2, 16)
    assert unbiased(s) == pytest.approx((g2, trace))
    assert NoiseScale().add(s).b_simple() == pytest.approx(trace / g2)


def test_no_estimate_from_nothing_or_from_unusable_samples() -> None:
    assert NoiseScale().b_simple() is None
    assert NoiseScale().add(Sample(0.0, 0.0, 0.0, 0.0)).samples == 0  # not measured (batch of one)
    assert NoiseScale().add(Sample(1.0, 2.0, 4, 4)).samples == 0  # one batch size: nothing to solve
    # the batch's norm above the micro-batch's: noise swamps the signal, no figure yet
    assert NoiseScale().add(Sample(1.0, 2.0, 1, 8)).b_simple() is None


def test_the_trainer_reports_the_norms_of_its_micro_batches_and_batch() -> None:
    texts = read_demo()[:60]
    lora, spec = LoraSpec(rank=4, alpha=8.0), TrainSpec(seq_len=64, batch_size=4, micro_batch=4, max_steps=1, seed=3)
    _, result = train_adapter(tiny_model_path(), texts, lora, spec)

    # The same first batch, directly: a fresh, identically seeded LoRA; each micro-batch's mean
    # gradient (two of two sequences: the trainer measures at most half the batch at a time).
    torch.manual_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    blocks = pack(tokenizer, texts, spec.seq_len)
    model = _lora_model(tiny_model_path(), lora, "cpu")
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(spec.seed))
    batch = blocks[order[: spec.batch_size]]
    params = [p for p in model.parameters() if p.requires_grad]

    def grad_of(rows: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        total, _ = loss_sum(model, rows)
        (total / int((rows[:, 1:] != PAD).sum())).backward()
        return [p.grad.detach().clone() for p in params]

    def sq(grads: list[torch.Tensor]) -> float:
        return sum(float(g.double().pow(2).sum()) for g in grads)

    micro = [sq(grad_of(batch[i:i + 2])) for i in (0, 2)]
    whole = sq(grad_of(batch))
    assert whole > 0 and not math.isclose(micro[0], whole, rel_tol=0.05)  # the check can tell them apart
    assert result.norms.micro_sq == pytest.approx(sum(micro) / 2, rel=1e-4)
    assert result.norms.batch_sq == pytest.approx(whole, rel=1e-4)
    assert (result.norms.micro_batch, result.norms.batch_size) == (2, 4)


def test_a_batch_of_one_sequence_reports_no_norms() -> None:
    _, result = train_adapter(tiny_model_path(), read_demo()[:20], LoraSpec(rank=2, alpha=4.0),
                              TrainSpec(seq_len=64, batch_size=1, micro_batch=1, max_steps=2))
    assert result.norms.batch_size == 0 and result.norms.micro_sq == 0
