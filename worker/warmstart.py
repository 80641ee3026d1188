"""Warm-started adapters: the exact contribution of a task that did not start from B = 0.

Pure tensor math, no I/O (DESIGN, "Folding math"). A task may start from non-zero factors
``(A₀, B₀)`` (its worker's previous adapter for the job, or the job's latest folded factors)
instead of a fresh LoRA. The trainer then trains on ``W − s·B₀A₀ + s·BA``, which at the first step
*is* the base version ``W`` (the start is already counted once in ``W``), and what the task adds to
the model is exactly

    ΔW = s·(B₁A₁ − B₀A₀) = [s·B₁ | −s·B₀] · [A₁; A₀],

a rank-2r LoRA with the same scale ``s = alpha / r``: :func:`contribution` writes it as an
ordinary adapter of rank ``2r`` and alpha ``2·alpha``, so the folding math, the norm gate and the
adapter file format take it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from nomoat.adapter import KIND_ADAPTER, META_WARM, Adapter


def contribution(end: Adapter, start: Adapter | None) -> Adapter:
    """What a task adds to its base version: ``end`` itself for a fresh start, else the exact
    difference ``s·(B₁A₁ − B₀A₀)`` as one rank-2r adapter (``A = [A₁; A₀]``, ``B = [B₁ | −B₀]``)."""
    if start is None:
        return end
    check_start(start, end.rank, end.alpha, set(end.factors))
    factors = {}
    for module, (a1, b1) in end.factors.items():
        a0, b0 = start.factors[module]
        factors[module] = (torch.cat([a1, a0.to(a1)], dim=0).contiguous(),
                           torch.cat([b1, -b0.to(b1)], dim=1).contiguous())
    # alpha / rank stays s: the rank doubles and so does alpha.
    return Adapter(factors, rank=2 * end.rank, alpha=2.0 * end.alpha, kind=KIND_ADAPTER,
                   meta={**end.meta, META_WARM: "1"})


def check_start(start: Adapter, rank: int, alpha: float, modules: set[str]) -> None:
    """Refuse start factors that are not a plain adapter of the task's LoRA shape."""
    if start.kind != KIND_ADAPTER or start.rank != rank or not math.isclose(start.alpha, alpha, rel_tol=1e-6):
        raise ValueError(
            f"the start factors are a rank-{start.rank}, alpha-{start.alpha:g} {start.kind}, but the task "
            f"trains a rank-{rank}, alpha-{alpha:g} adapter; warm-start only from this job's own adapters"
        )
    if set(start.factors) != modules:
        odd = sorted(set(start.factors) ^ modules)[:3]
        raise ValueError(f"the start factors do not cover the task's target modules (e.g. {', '.join(odd)})")
    for module, (a, b) in start.factors.items():
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"{module}: start factors {tuple(a.shape)} / {tuple(b.shape)} are not rank {rank}")


def subtract_start(weights: Mapping[str, torch.Tensor], start: Adapter) -> None:
    """``W −= s·B₀A₀`` in place, in fp32, so that base − start + start is the base version."""
    with torch.no_grad():
        for module, (a0, b0) in start.factors.items():
            w = weights[module]
            if w.dtype != torch.float32:
                raise ValueError(f"{module}: subtract the start from fp32 weights, not {w.dtype}")
            w.addmm_(b0.to(w), a0.to(w), alpha=-start.scale)


def start_from_patch(patch: Adapter, rank: int, alpha: float) -> Adapter:
    """Rank-``rank`` start factors that best approximate a folded patch (the job's latest folded
    factors): per module the truncated SVD ``U_r S_r V_rᵀ`` of the patch's ``ΔW``, computed from the
    factors (QR of each, SVD of the small core; never the dense matrix).

    ``A₀`` gets the row norm of a fresh PEFT ``A`` (Kaiming-uniform rows have norm ≈ 1/√3), so
    Adam's per-element steps move it as they would a fresh one; ``B₀`` carries the magnitude, so
    ``s·B₀A₀`` is the truncated ΔW. Any factors would keep the contribution exact; these start
    training in the direction the job has been moving.
    """
    s = alpha / rank
    row_norm = 1.0 / math.sqrt(3.0)
    factors = {}
    for module, (a, b) in patch.factors.items():
        a64, b64 = a.to(torch.float64), b.to(torch.float64) * patch.scale
        qb, rb = torch.linalg.qr(b64)  # B = Qb Rb
        qa, ra = torch.linalg.qr(a64.T)  # Aᵀ = Qa Ra
        u, sv, vh = torch.linalg.svd(rb @ ra.T)  # ΔW = Qb (Rb Raᵀ) Qaᵀ
        k = min(rank, sv.shape[0])
        u_r, s_r, v_r = qb @ u[:, :k], sv[:k], qa @ vh[:k].T
        a0 = torch.zeros(rank, a.shape[1], dtype=torch.float64)
        b0 = torch.zeros(b.shape[0], rank, dtype=torch.float64)
        a0[:k] = row_norm * v_r.T
        b0[:, :k] = u_r * (s_r / (s * row_norm))
        factors[module] = (a0.to(torch.float32).contiguous(), b0.to(torch.float32).contiguous())
    return Adapter(factors, rank=rank, alpha=alpha)


def principal_start(weights: Mapping[str, torch.Tensor], rank: int, alpha: float) -> Adapter:
    """PiSSA's start (Meng et al. 2024): per module the top-``rank`` singular triplets of the
    weight itself, ``A₀ = √S_r V_rᵀ``, ``B₀ = U_r √S_r / s``, so ``s·B₀A₀`` is the weight's best
    rank-r part and the model trains on the residual ``W − s·B₀A₀`` plus the adapter. Like any
    start here it is subtracted from the base and the upload is the exact difference, so it fits
    the folding rule; ``weights`` are the base version's, read, never changed."""
    s = alpha / rank
    factors = {}
    for module, w in weights.items():
        u, sv, vh = torch.linalg.svd(w.detach().to("cpu", torch.float64), full_matrices=False)
        root = sv[:rank].sqrt()
        factors[module] = ((root[:, None] * vh[:rank]).float().contiguous(),
                           (u[:, :rank] * (root / s)).float().contiguous())
    return Adapter(factors, rank=rank, alpha=alpha)
