"""The trainer, trained for real on the tiny model and the demo corpus."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nomoat.adapter import Adapter, from_bytes, to_bytes
from nomoat.packing import mean_loss, n_tokens, pack
from nomoat.tiny import read_demo, tiny_model_path
from worker.trainer import LoraSpec, TrainResult, TrainSpec, train_adapter

DEMO = read_demo()
TRAIN_TEXTS = DEMO[:1200]
HELD_OUT = DEMO[-200:]  # disjoint from every slice trained on below
LORA = LoraSpec(rank=8, alpha=16.0)
SHORT = TrainSpec(max_steps=3)
STEPS = 60


@pytest.fixture(scope="module")
def trained() -> tuple[Adapter, TrainResult, list]:
    seen: list[tuple[int, int, float]] = []
    adapter, result = train_adapter(
        tiny_model_path(), TRAIN_TEXTS, LORA, TrainSpec(max_steps=STEPS),
        progress=lambda *args: seen.append(args),
    )
    return adapter, result, seen


def merged(adapter: Adapter) -> torch.nn.Module:
    """The base model with ΔW = (alpha / r) · B @ A added to each adapted weight."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b) in adapter.factors.items():
            modules[name].weight += adapter.scale * (b @ a)
    return model


def identical(x: Adapter, y: Adapter) -> bool:
    # Compare tensors, not to_bytes(): safetensors orders the metadata of its header by a
    # per-process random hash, so equal adapters can serialize to different bytes.
    return x.factors.keys() == y.factors.keys() and all(
        torch.equal(fx, fy) for m in x.factors for fx, fy in zip(x.factors[m], y.factors[m])
    )


def delta(adapter: Adapter, name: str) -> torch.Tensor:
    a, b = adapter.factors[name]
    return adapter.scale * (b @ a)


def test_lora_lowers_held_out_loss(trained):
    adapter, _, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    blocks = pack(tokenizer, HELD_OUT, 128)
    before = mean_loss(AutoModelForCausalLM.from_pretrained(tiny_model_path()), blocks)
    after = mean_loss(merged(adapter), blocks)
    assert after < before - 0.05, (before, after)


def test_adapter_covers_every_target_module_with_the_right_shapes(trained):
    adapter, _, _ = trained
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    expected = {
        name: m for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA.target_modules
    }
    assert len(expected) == model.config.num_hidden_layers * len(LORA.target_modules)
    assert set(adapter.factors) == set(expected)
    for name, linear in expected.items():
        a, b = adapter.factors[name]
        assert a.shape == (LORA.rank, linear.in_features)
        assert b.shape == (linear.out_features, LORA.rank)
        assert a.dtype == b.dtype == torch.float32
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (adapter.rank, adapter.alpha) == (LORA.rank, LORA.alpha)
    assert from_bytes(to_bytes(adapter)).factors.keys() == adapter.factors.keys()


def test_result_and_progress_report_the_run(trained):
    _, result, seen = trained
    assert result.steps == STEPS and [s for s, _, _ in seen] == list(range(1, STEPS + 1))
    assert all(total == STEPS for _, total, _ in seen)
    assert 0 < result.train_loss < 10 and result.seconds > 0
    assert result.tokens > 0 and result.tokens <= STEPS * 8 * 128


def test_one_epoch_trains_on_every_real_token():
    texts = TRAIN_TEXTS[:30]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    blocks = pack(tokenizer, texts, 64)
    spec = TrainSpec(seq_len=64, batch_size=8, micro_batch=4)
    _, result = train_adapter(tiny_model_path(), texts, LORA, spec)
    assert result.steps == -(-len(blocks) // 8)
    assert result.tokens == n_tokens(blocks)


def test_same_seed_same_adapter_other_seed_other_adapter():
    a1, r1 = train_adapter(tiny_model_path(), TRAIN_TEXTS, LORA, SHORT)
    a2, r2 = train_adapter(tiny_model_path(), TRAIN_TEXTS, LORA, SHORT)
    a3, _ = train_adapter(tiny_model_path(), TRAIN_TEXTS, LORA, TrainSpec(max_steps=3, seed=1))
    assert identical(a1, a2)
    assert (r1.tokens, r1.train_loss) == (r2.tokens, r2.train_loss)
    assert not identical(a1, a3)


def test_gradient_accumulation_matches_the_full_batch():
    spec = TrainSpec(batch_size=8, micro_batch=8, max_steps=3)
    full, rf = train_adapter(tiny_model_path(), TRAIN_TEXTS, LORA, spec)
    accum, ra = train_adapter(tiny_model_path(), TRAIN_TEXTS, LORA, replace(spec, micro_batch=2))
    assert ra.tokens == rf.tokens and ra.train_loss == pytest.approx(rf.train_loss, rel=1e-5)
    for name in full.factors:
        d_full, d_accum = delta(full, name), delta(accum, name)
        scale = d_full.abs().max().item()
        assert torch.allclose(d_accum, d_full, rtol=1e-3, atol=1e-3 * scale), name


@pytest.mark.parametrize(
    ("lora", "train", "match"),
    [
        (LORA, TrainSpec(batch_size=8, micro_batch=3), "micro_batch"),
        (LoraSpec(rank=0), SHORT, "rank"),
        (LoraSpec(target_modules=()), SHORT, "target_modules"),
        (LORA, TrainSpec(max_steps=0), "max_steps"),
    ],
)
def test_bad_specs_are_refused_before_any_work(lora, train, match):
    with pytest.raises(ValueError, match=match):
        train_adapter(tiny_model_path(), TRAIN_TEXTS, lora, train)


def test_no_texts_is_a_clear_error():
    with pytest.raises(ValueError, match="no texts"):
        train_adapter(tiny_model_path(), [], LORA, SHORT)


# -- warm starts (issue 10) ---------------------------------------------------


def base_weights() -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in
            AutoModelForCausalLM.from_pretrained(tiny_model_path()).named_modules()
            if isinstance(m, torch.nn.Linear)}


def test_a_fresh_start_returns_the_trained_factors_and_carries_them():
    adapter, result = train_adapter(tiny_model_path(), TRAIN_TEXTS, LORA, SHORT)
    assert result.carry is not None and identical(adapter, result.carry.factors)
    assert adapter.rank == LORA.rank and "warm_start" not in adapter.meta
    assert set(result.carry.optimizer_state) and all(
        {"exp_avg", "exp_avg_sq"} <= set(s) for s in result.carry.optimizer_state.values())


def test_a_warm_started_model_starts_at_the_base_version():
    # Texts that pack into one batch: the first step's loss is the loss of the model trained on,
    # before any update, and must be the base model's own loss on those blocks.
    texts = TRAIN_TEXTS[:12]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    blocks = pack(tokenizer, texts, 128)
    assert len(blocks) <= 8
    start, _ = train_adapter(tiny_model_path(), TRAIN_TEXTS[100:400], LORA, TrainSpec(max_steps=10))
    seen: list[float] = []
    train_adapter(tiny_model_path(), texts, LORA, TrainSpec(max_steps=1), start=start,
                  progress=lambda step, total, loss: seen.append(loss))
    base_loss = mean_loss(AutoModelForCausalLM.from_pretrained(tiny_model_path()), blocks)
    assert seen[0] == pytest.approx(base_loss, abs=1e-5)


def test_a_warm_started_contribution_added_to_the_base_is_the_trained_model():
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    first, r1 = train_adapter(tiny_model_path(), TRAIN_TEXTS[:300], LORA, TrainSpec(max_steps=8))
    start = r1.carry.factors
    contrib, r2 = train_adapter(tiny_model_path(), TRAIN_TEXTS[300:600], LORA, TrainSpec(max_steps=8, seed=1),
                                start=start, optimizer_state=r1.carry.optimizer_state)
    assert contrib.rank == 2 * LORA.rank and contrib.scale == LORA.alpha / LORA.rank
    assert contrib.meta["warm_start"] == "1"
    # The trained PEFT model, rebuilt independently: base − s·B₀A₀, then PEFT's own merge of (A₁, B₁).
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (a0, b0) in start.factors.items():
            modules[name].weight -= start.scale * (b0 @ a0)
    peft_model = get_peft_model(model, LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha,
                                                  target_modules=list(LORA.target_modules)))
    end = r2.carry.factors
    set_peft_model_state_dict(peft_model, {f"base_model.model.{m}.lora_{x}.weight": t for m, (a, b) in
                                           end.factors.items() for x, t in (("A", a), ("B", b))})
    trained = {n: m.weight for n, m in peft_model.merge_and_unload().named_modules()
               if isinstance(m, torch.nn.Linear)}
    base = base_weights()
    for name in contrib.factors:
        folded = base[name] + delta(contrib, name)
        assert torch.allclose(folded, trained[name], atol=1e-5, rtol=0), name
    assert not identical(end, start)


def test_carried_moments_change_the_run_and_foreign_state_is_refused():
    _, r1 = train_adapter(tiny_model_path(), TRAIN_TEXTS[:300], LORA, SHORT)
    with_m, _ = train_adapter(tiny_model_path(), TRAIN_TEXTS[300:600], LORA, SHORT,
                              start=r1.carry.factors, optimizer_state=r1.carry.optimizer_state)
    without, _ = train_adapter(tiny_model_path(), TRAIN_TEXTS[300:600], LORA, SHORT, start=r1.carry.factors)
    assert not identical(with_m, without)
    with pytest.raises(ValueError, match="rank-4"):
        train_adapter(tiny_model_path(), TRAIN_TEXTS, LoraSpec(rank=4, alpha=8.0), SHORT, start=r1.carry.factors)
    with pytest.raises(ValueError, match="optimizer state"):
        train_adapter(tiny_model_path(), TRAIN_TEXTS, LORA, SHORT,
                      optimizer_state={"x": {}})
