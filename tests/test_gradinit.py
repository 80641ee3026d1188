"""The gradient-aligned start (LoRA-GA, worker/gradinit.py) through the real trainer on the tiny
model: the model is unchanged at step 0, the upload is the exact difference PEFT's own merge
gives, the sketch finds the gradient's singular vectors, and ``init="random"`` is the old run."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nomoat.adapter import Adapter
from nomoat.packing import mean_loss, pack
from nomoat.tiny import read_demo, tiny_model_path
from worker.gradinit import _Sketch
from worker.trainer import LoraSpec, TrainSpec, gradient_start, train_adapter

TEXTS = read_demo()[:300]
LORA = LoraSpec(rank=8, alpha=16.0)
GA = TrainSpec(max_steps=4, batch_size=4, micro_batch=2, init="gradient", init_blocks=4)


def identical(x: Adapter, y: Adapter) -> bool:
    return x.factors.keys() == y.factors.keys() and all(
        torch.equal(fx, fy) for m in x.factors for fx, fy in zip(x.factors[m], y.factors[m]))


def halves(contrib: Adapter, rank: int) -> tuple[dict, dict]:
    """(A₁, B₁) and (A₀, B₀) of a warm-start contribution ``[A₁; A₀]``, ``[B₁ | −B₀]``."""
    end = {m: (a[:rank], b[:, :rank]) for m, (a, b) in contrib.factors.items()}
    start = {m: (a[rank:], -b[:, rank:]) for m, (a, b) in contrib.factors.items()}
    return end, start


def test_a_gradient_started_model_starts_at_the_base_version():
    texts = TEXTS[:12]
    blocks = pack(AutoTokenizer.from_pretrained(tiny_model_path()), texts, 128)
    assert len(blocks) <= 8  # one batch: the first step's loss is the untouched model's
    seen: list[float] = []
    contrib, result = train_adapter(tiny_model_path(), texts, LORA, replace(GA, batch_size=8, micro_batch=8, max_steps=1),
                                    progress=lambda step, total, loss: seen.append(loss))
    base_loss = mean_loss(AutoModelForCausalLM.from_pretrained(tiny_model_path()), blocks)
    assert seen[0] == pytest.approx(base_loss, abs=1e-5)
    assert contrib.rank == 2 * LORA.rank and contrib.meta["warm_start"] == "1"
    assert 0 < result.init_seconds < result.seconds
    _, start = halves(contrib, LORA.rank)
    assert all(b0.abs().max() > 0 for _, b0 in start.values())  # a real, non-zero start


def test_the_contribution_is_peft_merge_of_the_trained_factors_minus_the_start():
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    contrib, _ = train_adapter(tiny_model_path(), TEXTS, LORA, GA)
    end, start = halves(contrib, LORA.rank)
    s = LORA.alpha / LORA.rank
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    base = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (a0, b0) in start.items():
            modules[name].weight -= s * (b0 @ a0)
    peft_model = get_peft_model(model, LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha,
                                                  target_modules=list(LORA.target_modules)))
    set_peft_model_state_dict(peft_model, {f"base_model.model.{m}.lora_{x}.weight": t for m, (a, b) in
                                           end.items() for x, t in (("A", a), ("B", b))})
    trained = {n: m.weight for n, m in peft_model.merge_and_unload().named_modules()
               if isinstance(m, torch.nn.Linear)}
    for name, (a, b) in contrib.factors.items():
        folded = base[name] + contrib.scale * (b @ a)
        assert torch.allclose(folded, trained[name], atol=1e-5, rtol=0), name


def test_random_init_is_the_run_it_always_was():
    plain, _ = train_adapter(tiny_model_path(), TEXTS, LORA, TrainSpec(max_steps=3))
    named, result = train_adapter(tiny_model_path(), TEXTS, LORA, TrainSpec(max_steps=3, init="random", init_blocks=5))
    assert TrainSpec().init == "random" and identical(plain, named) and result.init_seconds == 0.0
    assert plain.rank == LORA.rank and "warm_start" not in plain.meta


def test_a_shared_start_is_deterministic_and_spans_the_gradients_top_directions():
    spec = replace(GA, seed=3)
    one = gradient_start(tiny_model_path(), TEXTS[:40], LORA, spec)
    two = gradient_start(tiny_model_path(), TEXTS[:40], LORA, spec)
    assert identical(one, two) and one.rank == LORA.rank
    for a0, b0 in one.factors.values():
        # Rows of A₀ orthonormal up to ζ, columns of B₀ too, and A₀'s rows ⟂ nothing in particular:
        # the stable scale makes both Gram matrices ζ² I.
        zeta2 = float((a0 @ a0.T).diagonal().mean())
        assert torch.allclose(a0 @ a0.T, zeta2 * torch.eye(LORA.rank), atol=1e-4)
        assert torch.allclose(b0.T @ b0, zeta2 * torch.eye(LORA.rank), atol=1e-4)


def test_the_sketch_recovers_a_low_rank_gradient_exactly():
    # G = Σ gᵀx over 12 tokens has rank 12 < k = 16: the single-pass sketch is exact there.
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(12, 300, generator=gen), torch.randn(12, 200, generator=gen)
    sketch = _Sketch(200, 300, rank=4, seed=1, device=torch.device("cpu"))
    assert not sketch.dense
    sketch.add(x[:5], g[:5])
    sketch.add(x[5:], g[5:])
    u, v = sketch.svd(8)
    ud, _, vhd = torch.linalg.svd((g.T @ x).double(), full_matrices=False)
    # The same top-8 subspaces: every principal angle's cosine is 1 (the sketch accumulates in fp32).
    assert torch.allclose(torch.linalg.svdvals(u.T @ ud[:, :8]), torch.ones(8, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(torch.linalg.svdvals(v.T @ vhd[:8].T), torch.ones(8, dtype=torch.float64), atol=1e-4)


def test_a_gradient_start_with_given_factors_or_a_4bit_base_is_refused():
    start = gradient_start(tiny_model_path(), TEXTS[:40], LORA, GA)
    with pytest.raises(ValueError, match="not both"):
        train_adapter(tiny_model_path(), TEXTS, LORA, GA, start=start)
    with pytest.raises(ValueError, match="4-bit"):
        train_adapter(tiny_model_path(), TEXTS, LORA, replace(GA, quantization="4bit"))
    with pytest.raises(ValueError, match="init must be"):
        train_adapter(tiny_model_path(), TEXTS, LORA, replace(GA, init="pissa"))


def test_a_principal_start_is_the_weights_top_svd_and_leaves_the_model_unchanged():
    from worker.warmstart import principal_start

    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    start = principal_start({"m": w}, rank=4, alpha=8.0)
    a0, b0 = start.factors["m"]
    u, sv, vh = torch.linalg.svd(w.double())
    best4 = (u[:, :4] * sv[:4]) @ vh[:4]
    assert torch.allclose((start.scale * (b0 @ a0)).double(), best4, atol=1e-5)
    texts = TEXTS[:12]
    blocks = pack(AutoTokenizer.from_pretrained(tiny_model_path()), texts, 128)
    seen: list[float] = []
    contrib, _ = train_adapter(tiny_model_path(), texts, LORA, TrainSpec(max_steps=1, init="principal"),
                               progress=lambda step, total, loss: seen.append(loss))
    base_loss = mean_loss(AutoModelForCausalLM.from_pretrained(tiny_model_path()), blocks)
    assert seen[0] == pytest.approx(base_loss, abs=1e-5) and contrib.rank == 2 * LORA.rank
