"""Held-out evaluation with a token budget, and paired comparisons of two models on it.

Every gate compares two models on a job's validation slice: the current version against the
current version plus one adapter, or plus the whole fold. At 1B parameters one forward pass
costs about 2 GFLOP per token, so an evaluation over a whole 256-record slice takes minutes on a
CPU. Two things make a small budget enough (docs/evaluation.md has the measurements):

* a **budget**: an :class:`EvalSet` is the first ``budget`` tokens of the slice's packed blocks,
  the same blocks every time, so the cost of a gate is fixed whatever the slice holds;
* **pairing**: parent and candidate are scored on the very same blocks and the gate reads the
  difference block by block. Most of a block's loss is the block (its text is easy or hard), and
  that part cancels in the difference, so the standard error of the paired difference is a small
  fraction of the error of either loss alone.

A candidate is never built as weights: :func:`plus` adds its low-rank update as a side path on
each adapted linear layer (``y = W x + B (A x)``) for the duration of an evaluation, so the
fp32 master is neither copied nor changed (bit for bit) by a gate.

Both sides evaluate with this module: the coordinator on its own device, and a trusted worker
that an evaluation is delegated to (``worker.evaluate``), so a loss means the same thing
wherever it was measured. What crosses between them is plain data: an :class:`EvalTask` (the
version, the blocks as token ids, the patches as adapter safetensors bytes) in, an
:class:`EvalReply` (per-block sums and counts as float lists) out; :func:`answer` computes the
one from the other on a loaded model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nomoat import adapter as adapter_format
from nomoat import packing
from nomoat.adapter import Adapter

BATCH_BLOCKS = 16  # blocks per forward pass


@dataclass(frozen=True)
class EvalSet:
    """The blocks every evaluation of one job reads: the first ``budget`` tokens of its slice."""

    blocks: torch.Tensor  # [n_blocks, seq_len], packing.PAD after the last real token

    @property
    def tokens(self) -> int:
        return packing.n_tokens(self.blocks)

    def targets(self) -> torch.Tensor:
        """float64 [n_blocks]: the next-token targets of each block, what every model's
        :attr:`Losses.counts` on these blocks must be."""
        return (self.blocks[:, 1:] != packing.PAD).sum(dim=1).double()


def eval_set(tokenizer, texts: Sequence[str], seq_len: int, budget: int) -> EvalSet:
    """The validation slice packed into ``seq_len`` blocks, cut to about ``budget`` tokens.

    Whole blocks only (at least one), in the slice's order, so the same texts always give the
    same blocks; ``budget`` <= 0 keeps every block.
    """
    blocks = packing.pack(tokenizer, texts, seq_len)
    if budget > 0:
        real = (blocks != packing.PAD).sum(dim=1).cumsum(0)
        keep = max(1, int((real <= budget).sum()))
        blocks = blocks[:keep]
    return EvalSet(blocks)


def sample_blocks(blocks: torch.Tensor, budget: int, rng: random.Random) -> EvalSet:
    """About ``budget`` tokens of ``blocks`` (whole blocks, at least one), drawn at random by
    ``rng`` and kept in their order: a shard sample for the shard proof, its blocks the ones the
    trainer packed (the same :func:`nomoat.packing.pack`), whichever of them the volunteer fits."""
    order = list(range(len(blocks)))
    rng.shuffle(order)
    real = (blocks != packing.PAD).sum(dim=1).tolist()
    chosen, tokens = [], 0
    for i in order:
        if chosen and tokens + real[i] > budget:
            continue
        chosen.append(i)
        tokens += real[i]
    return EvalSet(blocks[sorted(chosen)])



def recent_sample(blocks: torch.Tensor, seed: int, epochs: int, budget: int, window: int,
                  rng: random.Random) -> EvalSet:
    """The shard proof's sample: about ``budget`` tokens drawn by ``rng`` (:func:`sample_blocks`)
    from the blocks a task's trainer saw last, about ``window`` tokens of them (all of them when
    ``window`` <= 0), replaying its seeded order (:func:`nomoat.packing.most_recent_first`).

    A fresh LoRA at a constant lr fits the blocks of its last steps best; the ones it saw early it
    fits little better than unseen text of the same kind (bench/shardproof.py measured both)."""
    if window <= 0:
        return sample_blocks(blocks, budget, rng)
    real = (blocks != packing.PAD).sum(dim=1).tolist()
    chosen, tokens = [], 0
    for i in packing.most_recent_first(len(blocks), seed, epochs):
        if chosen and tokens + real[i] > max(window, budget):
            break
        chosen.append(i)
        tokens += real[i]
    return sample_blocks(blocks[sorted(chosen)], budget, rng)

@dataclass(frozen=True)
class Losses:
    """Summed next-token loss (nats) and target count of each block of an :class:`EvalSet`."""

    sums: torch.Tensor  # float64 [n_blocks]
    counts: torch.Tensor  # float64 [n_blocks]

    @property
    def mean(self) -> float:
        return float(self.sums.sum() / self.counts.sum())

    @property
    def se(self) -> float:
        """Standard error of :attr:`mean` with blocks as the independent units (ratio estimator)."""
        return _ratio_se(self.sums, self.counts)


EVAL_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def block_losses(model: torch.nn.Module, evals: EvalSet, batch_size: int = BATCH_BLOCKS,
                 dtype: str = "fp32") -> Losses:
    """Per-block summed cross-entropy of ``model`` on ``evals`` (eval mode, no gradients).

    ``dtype`` "bf16" runs the matmuls under bf16 autocast (each weight cast as it is used: no
    second copy), several times faster on CPUs with AMX and on GPUs; parent and candidate then
    share the same rounding of the weights, which the paired difference cancels."""
    if dtype not in EVAL_DTYPES:
        raise ValueError(f"evaluation dtype {dtype!r} is not one of {', '.join(EVAL_DTYPES)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums, counts = [], []
    # cache_enabled=False: autocast otherwise keeps every cast weight for the whole region, a
    # full bf16 copy of the model (measured: +0.5 GB VmHWM at 1.1B before this).
    autocast = torch.autocast(device.type, dtype=EVAL_DTYPES[dtype], enabled=EVAL_DTYPES[dtype] is not None,
                              cache_enabled=False)
    try:
        with torch.no_grad(), autocast:
            for batch in evals.blocks.split(batch_size):
                batch = batch.to(device)
                logits = model(input_ids=packing.inputs(batch)).logits[:, :-1].float()
                targets = batch[:, 1:]
                per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=packing.PAD,
                                            reduction="none")
                sums.append(per_token.sum(dim=1).double().cpu())
                counts.append((targets != packing.PAD).sum(dim=1).double().cpu())
                del logits, per_token
    finally:
        model.train(was_training)
    result = Losses(torch.cat(sums), torch.cat(counts))
    if float(result.counts.sum()) == 0:
        raise ValueError("the evaluation blocks hold no next-token targets (each block needs 2+ real tokens)")
    return result


@dataclass(frozen=True)
class Comparison:
    """Candidate against parent on the same blocks."""

    parent: float  # mean loss, nats per token
    candidate: float
    se: float  # standard error of candidate - parent, from the per-block paired differences
    tokens: int

    @property
    def difference(self) -> float:
        return self.candidate - self.parent


def losses_with(model: torch.nn.Module, evals: EvalSet, patch: Adapter | None = None,
                dtype: str = "fp32") -> Losses:
    """Per-block losses of ``model``, or of ``model`` plus ``patch`` as a side path (:func:`plus`):
    what every gate measures, on the coordinator and on a worker alike."""
    if patch is None:
        return block_losses(model, evals, dtype=dtype)
    with plus(model, patch):
        return block_losses(model, evals, dtype=dtype)


def paired(parent: Losses, candidate: Losses) -> Comparison:
    """Compare two models' losses on the same blocks: the mean difference and its standard error."""
    if parent.counts.shape != candidate.counts.shape or not torch.equal(parent.counts, candidate.counts):
        raise ValueError("a paired comparison needs both models' losses on the same blocks")
    se = _ratio_se(candidate.sums - parent.sums, parent.counts)
    return Comparison(parent.mean, candidate.mean, se, int(parent.counts.sum()))


def unpaired_se(parent: Losses, candidate: Losses) -> float:
    """The standard error the same difference would have if the two losses came from different
    blocks (independent samples of the same size): the noise pairing removes. For the docs."""
    return math.hypot(parent.se, candidate.se)


def _ratio_se(sums: torch.Tensor, counts: torch.Tensor) -> float:
    k = int(counts.numel())
    if k < 2:
        return math.nan
    mean = sums.sum() / counts.sum()
    resid = sums - mean * counts
    var = float((resid * resid).sum()) * k / (k - 1)
    return math.sqrt(var) / float(counts.sum())


# -- a candidate as a side path --------------------------------------------------------------------


@contextmanager
def plus(model: torch.nn.Module, patch: Adapter) -> Iterator[None]:
    """Inside the block, every linear layer ``patch`` names computes ``W x + scale·B (A x)``.

    The weights are untouched: what a candidate is (current + its ΔW) costs two thin matmuls per
    adapted layer, not a copy of the model. Equal to merging ΔW into W up to float rounding.
    """
    modules = dict(model.named_modules())
    missing = sorted(m for m in patch.factors if m not in modules)
    if missing:
        raise ValueError(f"the update names modules the model lacks (e.g. {', '.join(missing[:3])})")
    handles = []
    try:
        for name, (a, b) in patch.factors.items():
            layer = modules[name]
            weight = layer.weight
            a = a.to(weight.device, torch.float32)
            b = (b.to(weight.device, torch.float32) * patch.scale)
            handles.append(layer.register_forward_hook(_side_path(a, b)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _side_path(a: torch.Tensor, b: torch.Tensor):
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return output + ((x.to(a.dtype) @ a.T) @ b.T).to(output.dtype)

    return hook


# -- an evaluation as plain data, for a trusted worker ---------------------------------------------


@dataclass(frozen=True)
class EvalItem:
    """One model to score: the task's version (``patch`` empty) or the version plus ``patch`` (an
    adapter's safetensors bytes, :func:`nomoat.adapter.to_bytes`), on ``block_set``'s blocks."""

    block_set: int
    patch: bytes = b""


@dataclass(frozen=True)
class EvalTask:
    """Per-block losses of (``lineage``, ``version``) and of it plus each patch: every item of one
    batch (a fold's parents and solo gates, or its fold check), scored in one go on one card."""

    lineage: str
    version: int
    coordinator: str  # HOST:PORT the worker reaches the coordinator at (to bring its cache to version)
    token: str  # the coordinator's worker token; a volunteer's own replaces it on its node
    dtype: str  # "fp32" or "bf16" (block_losses)
    block_sets: tuple[tuple[tuple[int, ...], ...], ...]  # each set: its blocks as token ids (packing.PAD pads)
    items: tuple[EvalItem, ...]

    @classmethod
    def of(cls, lineage: str, version: int, coordinator: str, token: str, dtype: str,
           sets: Sequence[EvalSet], items: Sequence[tuple[int, Adapter | None]]) -> EvalTask:
        return cls(lineage, version, coordinator, token, dtype,
                   tuple(tuple(tuple(int(t) for t in row) for row in s.blocks.tolist()) for s in sets),
                   tuple(EvalItem(i, adapter_format.to_bytes(p) if p is not None else b"") for i, p in items))

    def eval_sets(self) -> list[EvalSet]:
        return [EvalSet(torch.tensor(blocks, dtype=torch.long)) for blocks in self.block_sets]


@dataclass(frozen=True)
class EvalReply:
    """What the worker measured: per item, the per-block summed losses and target counts."""

    sums: tuple[tuple[float, ...], ...]
    counts: tuple[tuple[float, ...], ...]
    device: str = ""
    seconds: float = 0.0

    def losses(self, sets: Sequence[EvalSet], items: Sequence[EvalItem]) -> list[Losses]:
        """The items' :class:`Losses`, checked: one per item, every count what its blocks hold,
        every sum finite; a ValueError (a sentence) otherwise."""
        if len(self.sums) != len(items) or len(self.counts) != len(items):
            raise ValueError(f"the worker answered {len(self.sums)} evaluations for {len(items)} asked")
        out = []
        for item, sums, counts in zip(items, self.sums, self.counts):
            got = Losses(torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64))
            if not torch.equal(got.counts, sets[item.block_set].targets()):
                raise ValueError("the worker's losses are not on the blocks it was given")
            if not bool(torch.isfinite(got.sums).all()):
                raise ValueError("the worker's losses are not all finite")
            out.append(got)
        return out


def answer(model: torch.nn.Module, task: EvalTask, device: str = "") -> EvalReply:
    """Score every item of ``task`` on ``model`` (already at the task's version)."""
    sets = task.eval_sets()
    sums: list[tuple[float, ...]] = []
    counts: list[tuple[float, ...]] = []
    for item in task.items:
        patch = adapter_format.from_bytes(item.patch) if item.patch else None
        got = losses_with(model, sets[item.block_set], patch, task.dtype)
        sums.append(tuple(got.sums.tolist()))
        counts.append(tuple(got.counts.tolist()))
    return EvalReply(tuple(sums), tuple(counts), device)

