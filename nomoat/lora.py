"""The LoRA core: build, chain and apply exact low-rank patches. Pure tensor math, no I/O.

Both sides use these functions, so the coordinator's master weights and a worker's cached copy
change by the same operations in the same order:

* :func:`build_patch` concatenates weighted adapters into one exact patch (kind ``"patch"``,
  scale 1): per module ``A = [A_1; …; A_K]`` and ``B = [c_1 B_1 | … | c_K B_K]``;
* :func:`chain` is the same concatenation for consecutive patches (one PEFT file for a range of
  versions, or the negated chain of a rollback);
* :func:`member` reads one adapter's part back out of a patch (its header's ``members`` say
  where each adapter's rows are), so an unmerge needs the patch, not the adapter's own file;
* :func:`apply_patch` adds ``sign · B @ A`` to fp32 weights in place, one GEMM per module;
* :func:`patched` is what a worker does to weights stored in another dtype (bf16 files): upcast
  once, apply a chain of patches in fp32 in order, cast back once. Casting after every patch
  would round each small update away in bf16 and drift from the coordinator, which keeps fp32.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import torch

from nomoat.adapter import KIND_PATCH, Adapter

__all__ = ["MEMBERS", "apply_patch", "build_patch", "chain", "member", "patch_delta", "patched", "restrict"]

MEMBERS = "members"  # a patch's header entry: each input's [rank, modules] (None: all the patch's)


def build_patch(
    adapters: Sequence[Adapter], weights: Sequence[float], device: torch.device | str | None = None
) -> Adapter:
    """The exact patch of ``Σ w_i ΔW_i``, kind ``"patch"`` (scale 1).

    Per module ``A = [A_1; …; A_K]`` and ``B = [c_1 B_1 | … | c_K B_K]`` with
    ``c_i = w_i · alpha_i / r_i``, so its rank is Σ r_i over the adapters that target the module.

    Adapters may target different module sets (e.g. from different jobs); each module
    concatenates the adapters that have it. ``device`` defaults to where the factors are; folding
    passes the master's device so the concatenation is built where the GEMM runs.
    """
    if not adapters:
        raise ValueError("there are no adapters to fold")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(adapters)} adapters but {len(weights)} weights")
    coefs = [float(w) * a.scale for w, a in zip(weights, adapters)]
    if not all(math.isfinite(c) for c in coefs):
        raise ValueError(f"fold coefficients must be finite, got {coefs}")
    device = torch.device(device) if device is not None else None
    members: dict[str, list[int]] = {}
    for i, adapter in enumerate(adapters):
        for module in adapter.factors:
            members.setdefault(module, []).append(i)
    scales: dict[tuple, torch.Tensor] = {}  # one column-scale vector per membership
    factors = {}
    for module, idx in sorted(members.items()):
        pairs = [adapters[i].factors[module] for i in idx]
        _check_pairs(module, pairs)
        dev = device if device is not None else pairs[0][0].device
        key = (*idx, str(dev))
        if key not in scales:
            ranks = torch.tensor([a.shape[0] for a, _ in pairs])
            per_adapter = torch.tensor([coefs[i] for i in idx], dtype=torch.float32)
            scales[key] = per_adapter.repeat_interleave(ranks).to(dev)
        factors[module] = _concat(pairs, scales[key])
    # Per-module ranks may differ; the declared rank is informational (the shapes are the truth).
    rank = max(a.shape[0] for a, _ in factors.values())
    return Adapter(factors, rank=rank, alpha=float(rank), kind=KIND_PATCH,
                   meta={MEMBERS: _members(adapters, set(factors))})


def _members(adapters: Sequence[Adapter], modules: set[str]) -> str:
    """Where each input's rows are in the patch, as JSON: per input its rank (None if it differs
    from module to module: then it cannot be read back) and its modules (None: all of them)."""
    out = []
    for adapter in adapters:
        ranks = {a.shape[0] for a, _ in adapter.factors.values()}
        own = set(adapter.factors)
        out.append([ranks.pop() if len(ranks) == 1 else None, None if own == modules else sorted(own)])
    return json.dumps(out, separators=(",", ":"))


def member(patch: Adapter, index: int) -> Adapter | None:
    """Input ``index`` of a patch :func:`build_patch` made, as a patch of its own: per module its
    rows of A and its columns of B, which hold ``w · alpha / r · B`` (its weighted update,
    exactly as the patch applies it). None when the patch does not say where its inputs are."""
    try:
        members = json.loads(patch.meta.get(MEMBERS, "null"))
    except ValueError:
        return None
    if not isinstance(members, list) or not 0 <= index < len(members):
        return None
    everything = sorted(patch.factors)
    if any(r is None for r, _ in members[: index + 1]):
        return None
    rank, own = members[index]
    factors = {}
    for module in own if own is not None else everything:
        start = sum(r for r, mods in members[:index] if mods is None or module in mods)
        a, b = patch.factors[module]
        if start + rank > a.shape[0]:
            return None
        factors[module] = (a[start : start + rank], b[:, start : start + rank])
    return Adapter(factors, rank=rank, alpha=float(rank), kind=KIND_PATCH)


def chain(patches: Sequence[Adapter], sign: float = 1.0) -> Adapter:
    """One exact LoRA for several consecutive patches (their factors concatenated per module)."""
    return build_patch(list(patches), [sign] * len(patches))


def restrict(patch: Adapter, modules: set[str] | Mapping[str, object]) -> Adapter:
    """The part of ``patch`` that touches ``modules`` (one weights file of a sharded folder)."""
    factors = {m: f for m, f in patch.factors.items() if m in modules}
    return Adapter(factors, rank=patch.rank, alpha=patch.alpha, kind=patch.kind, meta=dict(patch.meta))


def _check_pairs(module: str, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    d_in, d_out = pairs[0][0].shape[-1], pairs[0][1].shape[0]
    for a, b in pairs:
        fits = a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1]
        if not fits or a.shape[1] != d_in or b.shape[0] != d_out:
            raise ValueError(
                f"{module}: factor shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit "
                f"a [{d_out}, {d_in}] weight"
            )


def _concat(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], column_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[A_1; …; A_K]`` and ``[B_1 | … | B_K] · diag(column_scale)`` in three tensor ops.

    A fixed number of ops per module, not 2K: on a GPU every op is a launch, and on a CPU shared
    with other processes every OpenMP parallel region can stall on a descheduled thread. The
    extra pass for the scale is over d_out·Σr numbers, small next to the GEMM's d_out·d_in·Σr.
    """
    device = column_scale.device
    with torch.no_grad():
        a_cat = torch.cat([a.to(device, torch.float32) for a, _ in pairs], dim=0)
        b_cat = torch.cat([b.to(device, torch.float32) for _, b in pairs], dim=1)
        b_cat.mul_(column_scale)
    return a_cat, b_cat


def apply_patch(master: dict[str, torch.Tensor], patch: Adapter, sign: float = 1.0) -> None:
    """``W += sign · scale · B @ A`` in place, one GEMM per module, in the master's fp32.

    ``sign=-1`` undoes an earlier ``apply_patch`` of the same patch up to fp32 rounding.
    """
    missing = sorted(set(patch.factors) - set(master))
    if missing:
        raise ValueError(
            f"the model has no weight for {len(missing)} patched module(s): {_few(missing)}"
        )
    coef = float(sign) * patch.scale
    with torch.no_grad():
        for module, (a, b) in patch.factors.items():
            w = master[module]
            if w.dtype != torch.float32:
                # bf16 would silently drop most of a small update: the design keeps fp32 masters.
                raise ValueError(f"{module}: the master weight is {w.dtype}; folding needs float32")
            if w.shape != (b.shape[0], a.shape[1]):
                raise ValueError(
                    f"{module}: the patch makes a {b.shape[0]}×{a.shape[1]} update for a "
                    f"{tuple(w.shape)} weight"
                )
            a = a.to(w.device, torch.float32)
            b = b.to(w.device, torch.float32)
            w.addmm_(b, a, alpha=coef)


def patched(weights: Mapping[str, torch.Tensor], patches: Sequence[Adapter]) -> dict[str, torch.Tensor]:
    """The weights that ``patches`` touch, after applying them in order, in their own dtype.

    ``weights`` maps module path to weight in any float dtype; modules it lacks are skipped (a
    sharded folder holds them in another file). Each touched weight is upcast to fp32 once, every
    patch is applied to it with :func:`apply_patch` (the coordinator's own GEMMs, in the same
    order), and it is cast back to its dtype once at the end, as the coordinator publishes.
    """
    touched = {m for p in patches for m in p.factors if m in weights}
    master = {m: weights[m].to(torch.float32, copy=True) for m in sorted(touched)}
    for patch in patches:
        part = restrict(patch, master)
        if part.factors:
            apply_patch(master, part)
    return {m: w.to(weights[m].dtype) for m, w in master.items()}


def patch_delta(patch: Adapter, module: str) -> torch.Tensor:
    """Dense ``ΔW`` of one module (for tests and small rollback checks; O(d_out·d_in) memory)."""
    a, b = patch.factors[module]
    return patch.scale * (b.to(torch.float32) @ a.to(torch.float32))


def _few(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
