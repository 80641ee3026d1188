"""Folding: validate, weigh and merge LoRA adapters into the running model's fp32 master weights.

Pure tensor math, no I/O: the fold policy (weights, gates, the outer step). The patch math it
rests on (``build_patch``, ``apply_patch``) lives in :mod:`nomoat.lora`, which the worker's cache
uses too. The rules are decided in DESIGN.md ("Folding math"):

* adapter i stands for ``ΔW_i = (alpha_i / r_i) · B_i A_i``; factors are never averaged, products
  are (``mean(B) @ mean(A)`` is off by ``Σ p_i (B_i − B̄)(A_i − Ā)``);
* its weight is ``w_i = n_i · s(τ_i) / Σ_j n_j s(τ_j)`` with ``s(τ) = (1 + τ)^(-1/2)`` (the
  weights sum to 1; ``normalise=False`` divides by ``Σ_j n_j`` instead, the earlier rule);
* K adapters fold at once, per target matrix one GEMM
  ``W += [w_1 s_1 B_1 | … | w_K s_K B_K] · [A_1; …; A_K]`` in fp32,
  and that concatenation *is* the version's patch (an exact LoRA of rank Σ r_i, scale 1).

Typical use by the coordinator::

    for a in candidates:
        check_structure(a, shapes, rank=job.rank, alpha=job.alpha)
        n = delta_norm(a)
        check_norm(n, recent_norms, factor=settings.norm_factor)
    weights = fold_weights(tokens, taus, max_staleness=settings.max_staleness)
    patch = fold(master, accepted, weights)          # master changed in place
    ...                                              # validation loss worse? then:
    apply_patch(master, patch, sign=-1.0)            # exact rollback (up to fp32 rounding)

Speed: the sequential alternative (PEFT's ``merge_and_unload`` once per adapter) materializes
a dense ``B_i @ A_i`` and reads and writes every weight K times. Here the only dense work is
one ``addmm_`` per matrix with inner dimension Σ r_i, which BLAS runs near its peak rate, and
every weight is read and written once. ``bench/fold.py`` measures both against the roofline.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch

from nomoat.adapter import KIND_ADAPTER, Adapter
# The patch math has one home, shared with the worker; folding re-exports it as its fold API.
from nomoat.lora import apply_patch, build_patch, patch_delta

__all__ = [
    "AdapterRejected",
    "apply_patch",
    "build_patch",
    "check_norm",
    "check_structure",
    "delta_norm",
    "fold",
    "fold_weights",
    "patch_delta",
    "staleness_factor",
]


class AdapterRejected(ValueError):
    """An adapter (or its bookkeeping) fails a gate; the message is a sentence saying why.

    ``check`` names the kind of gate (a ``coordinator.ledger.Check`` value: "malformed", "norm",
    "loss", "stale"), which the volunteer's trust record counts.
    """

    def __init__(self, message: str, check: str = "malformed") -> None:
        super().__init__(message)
        self.check = check


# ---------------------------------------------------------------------------------------------
# Weights


def staleness_factor(tau: int) -> float:
    """``s(τ) = (1 + τ)^(-1/2)``: an adapter trained τ versions ago counts less, never zero."""
    if tau < 0:
        raise AdapterRejected(
            f"staleness {tau} is negative: the adapter's base is newer than the model", check="stale"
        )
    return (1.0 + tau) ** -0.5


def fold_weights(tokens: Sequence[int], taus: Sequence[int], max_staleness: int,
                 normalise: bool = True) -> list[float]:
    """``w_i = n_i · s(τ_i) / Σ_j n_j s(τ_j)`` for one fold: the weights sum to 1.

    Staleness decides each adapter's share of the fold; the fold itself keeps its full size.
    ``normalise=False`` divides by ``Σ_j n_j`` instead, so the weights sum to less than 1 whenever
    an adapter is stale and staleness shrinks the whole fold. bench/quality.py measured the
    normalised form better (one pass, 4 workers: 0.781 of the best centralized run against 0.742;
    bench/README.md).
    """
    if len(tokens) != len(taus):
        raise ValueError(f"got {len(tokens)} token counts but {len(taus)} staleness values")
    if not tokens:
        raise ValueError("there are no adapters to weigh")
    if max_staleness < 0:
        raise ValueError(f"the staleness bound {max_staleness} is negative")
    for i, (n, tau) in enumerate(zip(tokens, taus)):
        if not n > 0:
            raise AdapterRejected(f"adapter {i} reports {n} trained tokens; it must be positive")
        if tau < 0:
            raise AdapterRejected(
                f"adapter {i} has staleness {tau}: its base version is newer than the current one", check="stale"
            )
        if tau > max_staleness:
            raise AdapterRejected(
                f"adapter {i} is {tau} versions stale, more than the bound of {max_staleness}; "
                "retrain it on a newer base", check="stale"
            )
    shares = [n * staleness_factor(tau) for n, tau in zip(tokens, taus)]
    total = sum(shares) if normalise else float(sum(tokens))
    return [x / total for x in shares]


# ---------------------------------------------------------------------------------------------
# Gates


def delta_norm(adapter: Adapter) -> float:
    """``‖ΔW‖_F`` over all modules, from r×r Gram matrices (never forming ``B @ A``).

    ``‖s·BA‖²_F = s² · tr(BᵀB · AAᵀ) = s² · Σ (BᵀB ⊙ AAᵀ)`` (both Grams are symmetric):
    O(r² d) instead of O(r d_in d_out) time, O(r²) instead of O(d_in d_out) memory. Float64
    for the Grams so a tiny update is not lost to cancellation.
    """
    total = 0.0
    for a, b in adapter.factors.values():
        a64 = a.detach().to(torch.float64)
        b64 = b.detach().to(torch.float64)
        total += float(((b64.T @ b64) * (a64 @ a64.T)).sum())
    # A sum of squared norms is ≥ 0: clamp rounding below zero (max() keeps a NaN visible).
    return adapter.scale * math.sqrt(max(total, 0.0))


def check_structure(
    adapter: Adapter, shapes: Mapping[str, tuple[int, int]], rank: int, alpha: float
) -> None:
    """Refuse an adapter that does not match the job's LoRA config exactly.

    ``shapes`` maps each target module to its weight's ``(d_out, d_in)``. Checks, in order: kind,
    declared rank and alpha, the module set, each factor's shape, finiteness.
    """
    if adapter.kind != KIND_ADAPTER:
        raise AdapterRejected(f"the upload is a {adapter.kind!r}, not an adapter")
    if adapter.rank != rank:
        raise AdapterRejected(
            f"the adapter declares rank {adapter.rank}, but the job trains rank {rank}"
        )
    if not math.isclose(float(adapter.alpha), float(alpha), rel_tol=1e-6):
        raise AdapterRejected(
            f"the adapter declares alpha {adapter.alpha}, but the job uses alpha {alpha}"
        )
    missing = sorted(set(shapes) - set(adapter.factors))
    extra = sorted(set(adapter.factors) - set(shapes))
    if missing:
        raise AdapterRejected(f"the adapter lacks {len(missing)} target module(s): {_few(missing)}")
    if extra:
        raise AdapterRejected(
            f"the adapter has {len(extra)} module(s) the job does not target: {_few(extra)}"
        )
    for module in sorted(shapes):
        d_out, d_in = shapes[module]
        a, b = adapter.factors[module]
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterRejected(
                f"{module}: the factors must be floating point, not {a.dtype}/{b.dtype}"
            )
        if tuple(a.shape) != (rank, d_in):
            raise AdapterRejected(f"{module}: lora_A is {tuple(a.shape)}, expected {(rank, d_in)}")
        if tuple(b.shape) != (d_out, rank):
            raise AdapterRejected(f"{module}: lora_B is {tuple(b.shape)}, expected {(d_out, rank)}")
        for name, t in (("lora_A", a), ("lora_B", b)):
            if not bool(torch.isfinite(t).all()):
                raise AdapterRejected(f"{module}: {name} holds NaN or Inf values")


def check_norm(norm: float, recent: Sequence[float], factor: float) -> None:
    """Refuse ``norm > factor × median(recent)``; with no history only finiteness is checked."""
    if not math.isfinite(norm) or norm < 0:
        raise AdapterRejected(
            f"the adapter's update norm is {norm}, not a finite non-negative number", check="norm"
        )
    if not recent:
        return
    bound = factor * statistics.median(recent)
    if norm > bound:
        raise AdapterRejected(
            f"the adapter's update norm {norm:.4g} exceeds {factor:g} × the recent median "
            f"({bound:.4g}); it would move the model too far at once", check="norm"
        )


def _few(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# ---------------------------------------------------------------------------------------------
# Folding


def fold(
    master: dict[str, torch.Tensor], adapters: Sequence[Adapter], weights: Sequence[float]
) -> Adapter:
    """Fold K adapters into ``master`` at once; return the patch that was applied."""
    device = next(iter(master.values())).device if master else None
    patch = build_patch(adapters, weights, device=device)
    apply_patch(master, patch)
    return patch


def nesterov_patch(delta: Adapter, previous: Sequence[Adapter], momentum: float, lr: float) -> Adapter:
    """DiLoCo's outer step (Nesterov momentum on the folded delta) as one exact low-rank patch.

    With the outer "gradient" g_t = Δ_t, Nesterov momentum steps by Δ_t + μ·m_t where
    m_t = Σ_k μ^(t−k) Δ_k, i.e. (1+μ)·Δ_t + Σ_{j≥1} μ^(j+1)·Δ_(t−j). Every Δ is itself a
    concatenated LoRA, so the step is too: the deltas' factors side by side, each scaled.
    ``previous`` are the plain deltas of the preceding folds, newest first; the caller truncates
    the (geometrically vanishing) tail.
    """
    coefficients = [lr * (1.0 + momentum)] + [lr * momentum ** (j + 2) for j in range(len(previous))]
    return build_patch([delta, *previous], coefficients)


def outer_step(delta: Adapter, previous: Sequence[Adapter], momentum: float, lr: float) -> Adapter:
    """The patch a fold applies: the folded delta itself, scaled by ``lr`` (an outer SGD step),
    or with ``momentum`` DiLoCo's Nesterov step (:func:`nesterov_patch`)."""
    if momentum:
        return nesterov_patch(delta, previous, momentum, lr)
    return delta if lr == 1.0 else build_patch([delta], [lr])
