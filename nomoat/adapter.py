"""The adapter file format shared by workers (who write it) and the coordinator (who reads it).

An adapter is a safetensors file, never a pickle. For every adapted linear layer of the base
model, named by its dotted module path (``model.layers.0.self_attn.q_proj``), it holds two
tensors::

    <module>.lora_A   [r, d_in]
    <module>.lora_B   [d_out, r]

and the safetensors header metadata holds ``format``, ``kind``, ``rank`` and ``alpha``. The update
an adapter stands for is ``ΔW = (alpha / r) · B @ A`` for each module.

A *patch* (``kind = "patch"``) uses the same layout for the exact update between two model
versions: per module the concatenated, already weighted factors, so its scale is 1 and its rank
may differ from module to module (read it from the shapes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "nomoat-lora/1"
KIND_ADAPTER = "adapter"
KIND_PATCH = "patch"
# Metadata on a warm-started task's contribution: "1" when it is the exact difference
# s·(B₁A₁ − B₀A₀), an adapter of rank 2r and alpha 2α (worker.warmstart).
META_WARM = "warm_start"

_A = ".lora_A"
_B = ".lora_B"


class AdapterFormatError(ValueError):
    """The bytes are not a well-formed nomoat adapter; the message says what is wrong."""


@dataclass
class Adapter:
    """Low-rank factors per module. ``scale`` is ``alpha / rank`` (1 for a patch)."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    alpha: float
    kind: str = KIND_ADAPTER
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return 1.0 if self.kind == KIND_PATCH else self.alpha / self.rank

    def modules(self) -> list[str]:
        return sorted(self.factors)


def from_peft_state_dict(state: dict[str, torch.Tensor], rank: int, alpha: float) -> Adapter:
    """Convert PEFT's ``get_peft_model_state_dict`` output into an :class:`Adapter`.

    PEFT names tensors ``base_model.model.<module>.lora_A.weight``; we keep ``<module>``.
    """
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key.removeprefix("base_model.model.")
        for suffix, target in ((".lora_A.weight", a), (".lora_B.weight", b)):
            if name.endswith(suffix):
                target[name[: -len(suffix)]] = tensor.detach().to("cpu", torch.float32).contiguous()
    if set(a) != set(b) or not a:
        raise AdapterFormatError("the PEFT state dict does not hold matching lora_A/lora_B pairs")
    return Adapter({m: (a[m], b[m]) for m in a}, rank=rank, alpha=alpha)


def to_bytes(adapter: Adapter) -> bytes:
    """Serialize to safetensors bytes (deterministic for equal tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in adapter.factors.items():
        tensors[module + _A] = a.contiguous()
        tensors[module + _B] = b.contiguous()
    meta = dict(adapter.meta)
    meta.update(format=FORMAT, kind=adapter.kind, rank=str(adapter.rank), alpha=repr(adapter.alpha))
    return _canonical(st_save(tensors, metadata=meta))


def _canonical(data: bytes) -> bytes:
    """Rewrite the header with sorted keys: safetensors orders metadata differently from run to
    run, and equal adapters must hash equal (uploads are idempotent per sha256). Tensor offsets
    count from the end of the header, so only the header and its length change."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def save(adapter: Adapter, path: str | Path) -> None:
    Path(path).write_bytes(to_bytes(adapter))


def _header(data: bytes) -> dict:
    if len(data) < 8:
        raise AdapterFormatError("the file is too short to be safetensors")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or n > min(len(data) - 8, 100_000_000):
        raise AdapterFormatError("the file is not safetensors (bad header length)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterFormatError("the file is not safetensors (header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterFormatError("the file is not safetensors (header is not an object)")
    return header


def from_bytes(data: bytes) -> Adapter:
    """Parse adapter bytes, checking the layout but not the shapes against a model."""
    header = _header(data)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise AdapterFormatError(f"the file's format is {meta.get('format')!r}, expected {FORMAT!r}")
    kind = meta.get("kind", KIND_ADAPTER)
    if kind not in (KIND_ADAPTER, KIND_PATCH):
        raise AdapterFormatError(f"unknown adapter kind {kind!r}")
    try:
        rank = int(meta["rank"])
        alpha = float(meta["alpha"])
    except (KeyError, ValueError):
        raise AdapterFormatError("the metadata lacks a numeric rank and alpha") from None
    if rank <= 0 or not (alpha == alpha) or alpha <= 0 or alpha > 1e6:
        raise AdapterFormatError(f"rank {rank} and alpha {alpha} are out of range")
    for key, info in header.items():
        if key != "__metadata__" and isinstance(info, dict) and info.get("dtype") not in ("F32", "F16", "BF16"):
            raise AdapterFormatError(f"tensor {key} has dtype {info.get('dtype')}; only float types are allowed")
    try:
        tensors = st_load(data)
    except (SafetensorError, RuntimeError, ValueError) as exc:
        raise AdapterFormatError(f"the file is not valid safetensors ({exc})") from None
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.endswith(_A):
            a[key[: -len(_A)]] = tensor
        elif key.endswith(_B):
            b[key[: -len(_B)]] = tensor
        else:
            raise AdapterFormatError(f"unexpected tensor {key!r} (keys end in .lora_A or .lora_B)")
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))[:3]
        raise AdapterFormatError(f"modules without both factors: {', '.join(missing)}")
    if not a:
        raise AdapterFormatError("the adapter holds no tensors")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in a:
        fa, fb = a[module], b[module]
        if fa.dim() != 2 or fb.dim() != 2 or fa.shape[0] != fb.shape[1]:
            raise AdapterFormatError(
                f"{module}: lora_A {tuple(fa.shape)} and lora_B {tuple(fb.shape)} do not form a product"
            )
        if kind == KIND_ADAPTER and fa.shape[0] != rank:
            raise AdapterFormatError(f"{module}: rank {fa.shape[0]} differs from the declared rank {rank}")
        factors[module] = (fa.to(torch.float32), fb.to(torch.float32))
    extra = {k: v for k, v in meta.items() if k not in ("format", "kind", "rank", "alpha")}
    return Adapter(factors, rank=rank, alpha=alpha, kind=kind, meta=extra)


def load(path: str | Path) -> Adapter:
    return from_bytes(Path(path).read_bytes())
