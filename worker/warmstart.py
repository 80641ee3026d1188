"""Warm-started adapters: the exact contribution of a task that did not start from B = 0.

Pure tensor math, no I/O (DESIGN, "Folding math"). A task may start from non-zero factors
``(A₀, B₀)`` (its worker's previous adapter for the job: the job's ``warm_start`` setting)
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
