"""Gradient-aligned start factors (LoRA-GA, Wang et al. 2024, arXiv 2407.05000).

A fresh LoRA starts at ``B = 0`` with a random ``A``: its first steps move ΔW inside the row
space of that random ``A``, whatever the data wants. LoRA-GA instead estimates the full gradient
``G`` of each target weight on a few of the task's own micro-batches, takes its SVD
``G ≈ U S Vᵀ`` and starts from

    A₀ = ζ · V[:, :r]ᵀ,   B₀ = ζ · U[:, r:2r],   ζ = d_out^¼ / √γ   (the paper's "stable" scale)

so that the first optimizer step's ΔW spans the gradient's top 2r directions. (PEFT's port also
multiplies B₀ by the singular values S[r:2r]; the paper's stable scale does not, and neither does
this.) In nomoat this is a warm start the worker computes itself: the trainer subtracts
``s·B₀A₀`` from the base (the model is unchanged at step 0) and uploads the exact rank-2r
difference ``s(B₁A₁ − B₀A₀)`` (:mod:`worker.warmstart`; DESIGN, "Folding math").

Memory: the full gradient of a weight is never formed. Each LoRA layer's input ``x`` and output
gradient ``g`` (which a forward hook and a tensor hook on its output see anyway) update a
single-pass two-sided sketch (Tropp et al. 2017): ``Y = G Ω`` (d_out × k) and ``Z = Ψᵀ G``
(l × d_in) with seeded Gaussian Ω, Ψ, k = 4r, l = 2k; then ``G ≈ Q (ΨᵀQ)⁺ Z`` with
``Q = orth(Y)``, whose SVD is that of a k × d_in matrix. Per target weight that is
``k·d_out + l·d_in`` floats (a 4096² weight at r = 8: 1.5 MB, against 64 MB for its gradient).
When the sketch would be no smaller than the weight (tiny layers), the dense gradient is
accumulated instead and the SVD is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from nomoat.adapter import Adapter

STABLE_GAMMA = 16.0  # the paper's default γ


class _Sketch:
    """The running sketch (or dense gradient) of one weight's gradient ``Σ gᵀx``."""

    def __init__(self, d_out: int, d_in: int, rank: int, seed: int, device: torch.device) -> None:
        self.k = 4 * rank
        self.l = 2 * self.k
        self.dense = self.k * d_out + self.l * d_in >= d_out * d_in
        if self.dense:
            self.grad = torch.zeros(d_out, d_in, device=device)
            return
        gen = torch.Generator().manual_seed(seed)
        self.omega = torch.randn(d_in, self.k, generator=gen).to(device)
        self.psi = torch.randn(d_out, self.l, generator=gen).to(device)
        self.y = torch.zeros(d_out, self.k, device=device)
        self.z = torch.zeros(self.l, d_in, device=device)

    def add(self, x: torch.Tensor, g: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        g = g.reshape(-1, g.shape[-1]).float()
        if self.dense:
            self.grad.addmm_(g.T, x)
        else:
            self.y.addmm_(g.T, x @ self.omega)
            self.z.addmm_((g @ self.psi).T, x)

    def svd(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top ``count`` left and right singular vectors (d_out × count, d_in × count), fp64."""
        if self.dense:
            u, _, vh = torch.linalg.svd(self.grad.double(), full_matrices=False)
            return u[:, :count], vh[:count].T
        q, _ = torch.linalg.qr(self.y.double())
        core = torch.linalg.lstsq(self.psi.double().T @ q, self.z.double()).solution  # k × d_in
        u, _, vh = torch.linalg.svd(core, full_matrices=False)
        return (q @ u)[:, :count], vh[:count].T


def estimate_start(layers: dict[str, torch.nn.Module], run_batches: Callable[[], None], rank: int,
                   alpha: float, seed: int = 0, gamma: float = STABLE_GAMMA) -> Adapter:
    """LoRA-GA start factors for ``layers`` (module name -> PEFT LoRA layer, whose ``base_layer``
    is the target weight), from the gradient of whatever loss ``run_batches`` back-propagates
    (the caller's forward and backward passes; the LoRA factors' own gradients are left for the
    caller to clear). Rank ``rank``, alpha ``alpha``: the task's LoRA shape."""
    sketches: dict[str, _Sketch] = {}
    handles = []
    for i, (name, layer) in enumerate(sorted(layers.items())):
        w = layer.get_base_layer().weight
        sketches[name] = _Sketch(w.shape[0], w.shape[1], rank, seed * 7919 + i, w.device)

        def forward_hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor, name: str = name) -> None:
            if torch.is_grad_enabled() and output.requires_grad:
                x = inputs[0].detach()
                # dL/d(output) is dL/d(base output): the LoRA branch is added to it.
                output.register_hook(lambda g, x=x, name=name: sketches[name].add(x, g.detach()))

        handles.append(layer.register_forward_hook(forward_hook))
    try:
        run_batches()
    finally:
        for h in handles:
            h.remove()
    factors = {}
    for name, sketch in sketches.items():
        d_out = layers[name].get_base_layer().weight.shape[0]
        zeta = d_out ** 0.25 / math.sqrt(gamma)
        u, v = sketch.svd(2 * rank)
        a0 = torch.zeros(rank, v.shape[0], dtype=torch.float64)
        b0 = torch.zeros(d_out, rank, dtype=torch.float64)
        n = v.shape[1]  # 2r unless the layer is narrower
        a0[: min(rank, n)] = zeta * v[:, :rank].T
        if n > rank:
            b0[:, : n - rank] = zeta * u[:, rank:n]
        factors[name] = (a0.float().contiguous(), b0.float().contiguous())
    return Adapter(factors, rank=rank, alpha=alpha)


def estimation_batches(blocks: torch.Tensor, count: int, micro_batch: int, seed: int) -> Iterable[torch.Tensor]:
    """``count`` of the task's blocks (a seeded choice, apart from the training's own order), in
    micro-batches of ``micro_batch``."""
    gen = torch.Generator().manual_seed(seed + 104729)
    chosen = blocks[torch.randperm(len(blocks), generator=gen)[: max(1, count)]]
    return chosen.split(max(1, micro_batch))
