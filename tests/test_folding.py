"""Folding math against real PEFT on a tiny random Llama, plus the gates' refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from coordinator.fold.folding import (
    AdapterRejected,
    apply_patch,
    build_patch,
    check_norm,
    check_structure,
    delta_norm,
    fold,
    fold_weights,
    patch_delta,
    staleness_factor,
)
from nomoat.adapter import KIND_PATCH, Adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: k/v projections are not square
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: tuple(m.weight.shape)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    }


def master_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    mods = dict(model.named_modules())
    return {name: mods[name].weight.detach().clone().float() for name in linear_shapes(model)}


def random_adapter(
    shapes: dict[str, tuple[int, int]], rank: int, alpha: float, seed: int, std: float = 0.1
) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    factors = {
        m: (torch.randn(rank, d_in, generator=g) * std, torch.randn(d_out, rank, generator=g) * std)
        for m, (d_out, d_in) in shapes.items()
    }
    return Adapter(factors, rank=rank, alpha=alpha)


def peft_merge(model: LlamaForCausalLM, adapter: Adapter, weight: float) -> LlamaForCausalLM:
    """Merge one adapter the way PEFT does, with effective scale ``weight · alpha / r``."""
    config = LoraConfig(
        r=adapter.rank,
        lora_alpha=weight * adapter.alpha,  # PEFT's scaling is lora_alpha / r
        target_modules=TARGETS,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    mods = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, (a, b) in adapter.factors.items():
            mods[name].lora_A["default"].weight.copy_(a)
            mods[name].lora_B["default"].weight.copy_(b)
    return peft_model.merge_and_unload()


# (rank, alpha) per adapter, tokens, staleness: mixed ranks and scales in one fold.
FOLD_CASES = {
    "mixed-4": ([(2, 4.0), (4, 8.0), (8, 16.0), (3, 1.5)], [100, 250, 40, 610], [0, 1, 3, 0]),
    "single": ([(4, 8.0)], [1000], [0]),
    "same-rank-6": ([(4, 4.0)] * 6, [10, 20, 30, 40, 50, 60], [0, 0, 1, 1, 2, 5]),
}


@pytest.mark.parametrize("case", FOLD_CASES.values(), ids=FOLD_CASES.keys())
def test_fold_equals_sequential_peft_merges(base: LlamaForCausalLM, case) -> None:
    specs, tokens, taus = case
    shapes = linear_shapes(base)
    adapters = [random_adapter(shapes, r, alpha, seed=i) for i, (r, alpha) in enumerate(specs)]
    weights = fold_weights(tokens, taus, max_staleness=8)

    master = master_of(base)
    before = {m: w.clone() for m, w in master.items()}
    patch = fold(master, adapters, weights)

    merged = copy.deepcopy(base)
    for adapter, w in zip(adapters, weights):
        merged = peft_merge(merged, adapter, w)
    mods = dict(merged.named_modules())
    assert set(linear_shapes(merged)) == set(master)
    for name, w in master.items():
        torch.testing.assert_close(w, mods[name].weight.detach(), rtol=1e-5, atol=1e-5)
        assert not torch.equal(w, before[name]), f"{name} did not change"

    assert patch.kind == KIND_PATCH and patch.scale == 1.0
    total_rank = sum(r for r, _ in specs)
    assert all(a.shape[0] == total_rank for a, _ in patch.factors.values())

    # The folded weights make the same model PEFT made.
    folded = copy.deepcopy(base)
    fmods = dict(folded.named_modules())
    with torch.no_grad():
        for name, w in master.items():
            fmods[name].weight.copy_(w)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)


def test_patch_is_the_weight_difference(base: LlamaForCausalLM) -> None:
    shapes = linear_shapes(base)
    adapters = [random_adapter(shapes, r, 2.0 * r, seed=10 + r) for r in (1, 5)]
    master = master_of(base)
    before = {m: w.clone() for m, w in master.items()}
    patch = fold(master, adapters, [0.3, 0.5])
    for name in master:
        delta = master[name] - before[name]
        torch.testing.assert_close(delta, patch_delta(patch, name), rtol=1e-4, atol=1e-6)


def test_negative_sign_undoes_a_fold(base: LlamaForCausalLM) -> None:
    shapes = linear_shapes(base)
    adapters = [random_adapter(shapes, r, 16.0, seed=20 + r) for r in (2, 4, 8)]
    master = master_of(base)
    before = {m: w.clone() for m, w in master.items()}
    patch = fold(master, adapters, fold_weights([5, 6, 7], [0, 2, 4], max_staleness=4))
    apply_patch(master, patch, sign=-1.0)
    for name, w in master.items():
        torch.testing.assert_close(w, before[name], rtol=0, atol=1e-6)


def test_adapters_with_different_module_sets(base: LlamaForCausalLM) -> None:
    shapes = linear_shapes(base)
    attn = {m: s for m, s in shapes.items() if "self_attn" in m}
    mlp = {m: s for m, s in shapes.items() if "mlp" in m}
    adapters = [random_adapter(attn, 2, 4.0, seed=1), random_adapter(mlp, 3, 3.0, seed=2)]
    master = master_of(base)
    before = {m: w.clone() for m, w in master.items()}
    patch = fold(master, adapters, [0.5, 0.25])
    assert set(patch.factors) == set(shapes)
    for name in master:
        adapter, w = (adapters[0], 0.5) if name in attn else (adapters[1], 0.25)
        expected = w * patch_delta(adapter, name)
        torch.testing.assert_close(master[name] - before[name], expected, rtol=1e-4, atol=1e-6)


def test_fold_leaves_adapters_untouched(base: LlamaForCausalLM) -> None:
    shapes = linear_shapes(base)
    adapter = random_adapter(shapes, 4, 8.0, seed=3)
    copies = {m: (a.clone(), b.clone()) for m, (a, b) in adapter.factors.items()}
    fold(master_of(base), [adapter], [0.5])
    fold(master_of(base), [adapter, adapter], [0.5, 0.5])
    for m, (a, b) in adapter.factors.items():
        assert torch.equal(a, copies[m][0]) and torch.equal(b, copies[m][1])


def test_factor_averaging_is_not_folding(base: LlamaForCausalLM) -> None:
    """Averaging A and B separately is off by exactly Σ p_i (B_i − B̄)(A_i − Ā)."""
    shapes = linear_shapes(base)
    adapters = [random_adapter(shapes, 4, 4.0, seed=30 + i) for i in range(3)]  # scale 1
    p = [0.2, 0.3, 0.5]
    patch = build_patch(adapters, p)
    for name in shapes:
        a_bar = sum(pi * ad.factors[name][0] for pi, ad in zip(p, adapters))
        b_bar = sum(pi * ad.factors[name][1] for pi, ad in zip(p, adapters))
        product = patch_delta(patch, name)
        averaged = b_bar @ a_bar
        error = sum(
            pi * (ad.factors[name][1] - b_bar) @ (ad.factors[name][0] - a_bar)
            for pi, ad in zip(p, adapters)
        )
        torch.testing.assert_close(product - averaged, error, rtol=1e-4, atol=1e-6)
        # Not a rounding matter: independent adapters make the error as large as the update.
        assert (product - averaged).norm() > 0.5 * product.norm()


# ---------------------------------------------------------------------------------------------
# Norms


def test_delta_norm_equals_dense_frobenius(base: LlamaForCausalLM) -> None:
    shapes = linear_shapes(base)
    for rank, alpha in [(1, 1.0), (4, 32.0), (8, 2.0)]:
        adapter = random_adapter(shapes, rank, alpha, seed=rank)
        dense = math.sqrt(sum(float(patch_delta(adapter, m).double().pow(2).sum()) for m in shapes))
        assert delta_norm(adapter) == pytest.approx(dense, rel=1e-5)
    pair = [random_adapter(shapes, 2, 4.0, seed=7), random_adapter(shapes, 3, 1.0, seed=8)]
    patch = build_patch(pair, [0.4, 0.6])
    dense = math.sqrt(sum(float(patch_delta(patch, m).double().pow(2).sum()) for m in shapes))
    assert delta_norm(patch) == pytest.approx(dense, rel=1e-5)


def test_delta_norm_of_a_zero_b_is_zero(base: LlamaForCausalLM) -> None:
    adapter = random_adapter(linear_shapes(base), 4, 8.0, seed=0)
    for a, b in adapter.factors.values():
        b.zero_()  # PEFT's initialisation: an untrained adapter changes nothing
    assert delta_norm(adapter) == 0.0


NORM_CASES = [
    # norm, recent, factor, refused
    (5.0, [], 3.0, False),
    (1e9, [], 3.0, False),
    (2.9, [1.0, 1.0, 100.0], 3.0, False),  # median, not mean: one outlier does not widen the gate
    (3.1, [1.0, 1.0, 100.0], 3.0, True),
    (float("nan"), [1.0], 3.0, True),
    (float("nan"), [], 3.0, True),
    (float("inf"), [], 3.0, True),
]


@pytest.mark.parametrize("norm,recent,factor,refused", NORM_CASES)
def test_check_norm(norm: float, recent: list[float], factor: float, refused: bool) -> None:
    if refused:
        with pytest.raises(AdapterRejected, match="norm"):
            check_norm(norm, recent, factor)
    else:
        check_norm(norm, recent, factor)


# ---------------------------------------------------------------------------------------------
# Weights


@pytest.mark.parametrize("tau,expected", [(0, 1.0), (1, 2**-0.5), (3, 0.5), (8, 1 / 3), (99, 0.1)])
def test_staleness_factor(tau: int, expected: float) -> None:
    assert staleness_factor(tau) == pytest.approx(expected)


def test_fold_weights_values() -> None:
    # The earlier rule, behind the flag: divided by Σ n_j, so staleness shrinks the whole fold.
    w = fold_weights([100, 300], [0, 3], max_staleness=3, normalise=False)
    assert w == pytest.approx([0.25, 0.75 * 0.5])
    assert sum(w) < 1
    for normalise in (True, False):
        assert fold_weights([7, 7, 7, 7], [0, 0, 0, 0], max_staleness=0, normalise=normalise) \
            == pytest.approx([0.25] * 4)


def test_fold_weights_normalised_sum_to_one_with_stale_adapters() -> None:
    # The default: divided by Σ n_j s(τ_j). Stale adapters get a smaller share, the fold its full size.
    tokens, taus = [100, 300, 200], [0, 3, 8]
    w = fold_weights(tokens, taus, max_staleness=8)
    assert sum(w) == pytest.approx(1.0)
    shares = [100 * 1.0, 300 * 0.5, 200 / 3]
    assert w == pytest.approx([x / sum(shares) for x in shares])
    # The ratio between two adapters is the same under both rules; only the total differs.
    old = fold_weights(tokens, taus, max_staleness=8, normalise=False)
    assert [a / old[0] for a in old] == pytest.approx([a / w[0] for a in w])
    assert sum(old) == pytest.approx(sum(shares) / 600)


WEIGHT_REFUSALS = [
    ([100, 100], [0, 4], 3, "more than the bound of 3"),
    ([100, 100], [-1, 0], 3, "newer than the current"),
    ([100, 0], [0, 0], 3, "must be positive"),
    ([100, -5], [0, 0], 3, "must be positive"),
]


@pytest.mark.parametrize("tokens,taus,bound,message", WEIGHT_REFUSALS)
def test_fold_weights_refusals(
    tokens: list[int], taus: list[int], bound: int, message: str
) -> None:
    with pytest.raises(AdapterRejected, match=message):
        fold_weights(tokens, taus, max_staleness=bound)


def test_fold_weights_bad_calls() -> None:
    with pytest.raises(ValueError, match="2 token counts but 1"):
        fold_weights([1, 2], [0], max_staleness=1)
    with pytest.raises(ValueError, match="no adapters"):
        fold_weights([], [], max_staleness=1)


# ---------------------------------------------------------------------------------------------
# Structure


def _drop_first(ad: Adapter) -> None:
    del ad.factors[sorted(ad.factors)[0]]


def _add_extra(ad: Adapter) -> None:
    ad.factors["lm_head"] = (torch.zeros(4, 32), torch.zeros(64, 4))


def _set(index: int, fill: float | None = None, shape: tuple[int, int] | None = None):
    def edit(ad: Adapter) -> None:
        module = sorted(ad.factors)[-1]
        pair = list(ad.factors[module])
        if shape is not None:
            pair[index] = torch.zeros(shape)
        if fill is not None:
            pair[index][0, 0] = fill
        ad.factors[module] = tuple(pair)

    return edit


def _declare(**kw):
    def edit(ad: Adapter) -> None:
        for k, v in kw.items():
            setattr(ad, k, v)

    return edit


STRUCTURE_REFUSALS = {
    "missing-module": (
        _drop_first,
        r"lacks 1 target module\(s\): model\.layers\.0\.mlp\.down_proj",
    ),
    "extra-module": (_add_extra, r"1 module\(s\) the job does not target: lm_head"),
    "A-wrong-d_in": (_set(0, shape=(4, 31)), r"lora_A is \(4, 31\), expected \(4, 32\)"),
    "A-wrong-rank": (_set(0, shape=(5, 32)), r"lora_A is \(5, 32\), expected \(4, 32\)"),
    "B-wrong-d_out": (_set(1, shape=(17, 4)), r"v_proj: lora_B is \(17, 4\), expected \(16, 4\)"),
    "declared-rank": (_declare(rank=8), "declares rank 8, but the job trains rank 4"),
    "declared-alpha": (_declare(alpha=16.0), "declares alpha 16.0, but the job uses alpha 8.0"),
    "patch-kind": (_declare(kind=KIND_PATCH), "'patch', not an adapter"),
    "nan-in-A": (_set(0, fill=float("nan")), "lora_A holds NaN or Inf"),
    "inf-in-B": (_set(1, fill=float("inf")), "lora_B holds NaN or Inf"),
    "neg-inf-in-A": (_set(0, fill=float("-inf")), "lora_A holds NaN or Inf"),
}


def test_check_structure_accepts_a_good_adapter(base: LlamaForCausalLM) -> None:
    shapes = linear_shapes(base)
    check_structure(random_adapter(shapes, 4, 8.0, seed=0), shapes, rank=4, alpha=8.0)


@pytest.mark.parametrize("edit,message", STRUCTURE_REFUSALS.values(), ids=STRUCTURE_REFUSALS.keys())
def test_check_structure_refusals(base: LlamaForCausalLM, edit, message: str) -> None:
    shapes = linear_shapes(base)
    adapter = random_adapter(shapes, 4, 8.0, seed=0)
    edit(adapter)
    with pytest.raises(AdapterRejected, match=message):
        check_structure(adapter, shapes, rank=4, alpha=8.0)


# ---------------------------------------------------------------------------------------------
# Misuse


def test_apply_patch_refuses_bf16_and_unknown_modules(base: LlamaForCausalLM) -> None:
    shapes = linear_shapes(base)
    patch = build_patch([random_adapter(shapes, 2, 2.0, seed=0)], [1.0])
    half = {m: w.to(torch.bfloat16) for m, w in master_of(base).items()}
    with pytest.raises(ValueError, match="needs float32"):
        apply_patch(half, patch)
    partial = master_of(base)
    del partial[sorted(partial)[0]]
    with pytest.raises(ValueError, match="no weight for 1 patched module"):
        apply_patch(partial, patch)


def test_build_patch_refuses_mismatched_inputs(base: LlamaForCausalLM) -> None:
    shapes = linear_shapes(base)
    adapter = random_adapter(shapes, 2, 2.0, seed=0)
    with pytest.raises(ValueError, match="1 adapters but 2 weights"):
        build_patch([adapter], [0.5, 0.5])
    with pytest.raises(ValueError, match="no adapters"):
        build_patch([], [])
    wider = {m: (d_out, d_in + 1) for m, (d_out, d_in) in shapes.items()}
    other = random_adapter(wider, 2, 2.0, seed=1)
    with pytest.raises(ValueError, match="do not fit"):
        build_patch([adapter, other], [0.5, 0.5])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA card")
def test_fold_on_cuda_matches_cpu(base: LlamaForCausalLM) -> None:
    shapes = linear_shapes(base)
    adapters = [random_adapter(shapes, r, 2.0 * r, seed=r) for r in (2, 4)]
    cpu = master_of(base)
    gpu = {m: w.cuda() for m, w in cpu.items()}
    fold(cpu, adapters, [0.5, 0.25])
    fold(gpu, adapters, [0.5, 0.25])
    for name in cpu:
        assert gpu[name].is_cuda
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], rtol=1e-4, atol=1e-5)


def test_each_adapter_is_read_back_out_of_its_patch_exactly() -> None:
    """A patch says where each input's rows are (inputs of different ranks and module sets), so
    the patch that takes one adapter out again is built from the patch alone, bit for bit the one
    built from the adapter's own factors (what an unmerge needs once the adapter's file is gone)."""
    from nomoat import lora
    from nomoat.adapter import Adapter, from_bytes, to_bytes

    g = torch.Generator().manual_seed(3)

    def adapter(modules: list[str], rank: int) -> Adapter:
        return Adapter({m: (torch.randn(rank, 6, generator=g), torch.randn(5, rank, generator=g)) for m in modules},
                       rank=rank, alpha=2.0 * rank)

    adapters = [adapter(["q", "v"], 2), adapter(["v"], 3), adapter(["q", "v"], 4)]
    weights = [0.3, 0.5, 0.2]
    patch = from_bytes(to_bytes(lora.build_patch(adapters, weights)))  # as the store keeps it
    for i, own in enumerate(adapters):
        piece = lora.member(patch, i)
        assert piece is not None and set(piece.factors) == set(own.factors)
        expected, got = lora.build_patch([own], [-weights[i]]), lora.build_patch([piece], [-1.0])
        assert all(torch.equal(expected.factors[m][k], got.factors[m][k]) for m in own.factors for k in (0, 1))
    assert lora.member(patch, 3) is None
    assert lora.member(Adapter(patch.factors, rank=patch.rank, alpha=patch.alpha, kind=patch.kind), 0) is None
