"""Where held-out evaluations run: on the coordinator's own device, or on a trusted worker's card.

The math (budgeted blocks, per-block losses, paired comparisons, a candidate as a side path) is
shared with the worker and lives in :mod:`nomoat.evaluation`. This module is the seam the folder
evaluates through:

* the folder asks an :class:`Evaluator` for one :class:`Batch`: the per-block losses of version v
  on each job's blocks (the *parents*) and of v plus each of several patches (the *candidates*);
  a fold asks twice, once for its parents and every adapter's solo gate, once for its fold check;
* :class:`OnCoordinator` scores a batch on the running model, on ``--device``;
* :class:`OnWorkers` sends the batch as one evaluation task to one trusted worker's card
  (``coordinator.schedule.ray_dispatch``; the worker's entry point is ``worker.evaluate``) and, when no card
  can take it, the task fails or it takes longer than ``--eval-timeout``, scores it on the
  coordinator instead, saying so in one log line: nothing is lost and the fold goes on.

Pairing needs parent and candidate scored by the same arithmetic, so losses are never paired
across places: an :class:`Evaluated` says where it was measured (``"coordinator"`` or the worker
id), and parents a batch already knows are reused only by an evaluation in the same place.
:func:`evaluator_for` picks the evaluator from ``--eval-on`` (docs/evaluation.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from nomoat.adapter import Adapter
from nomoat.evaluation import (
    EvalReply,
    EvalSet,
    EvalTask,
    Losses,
)
from nomoat.logs import fields

if TYPE_CHECKING:
    from coordinator.model.running import RunningModel
    from coordinator.schedule.transport import Node
    from coordinator.settings import Settings

log = logging.getLogger("nomoat.evaluation")

COORDINATOR = "coordinator"  # Evaluated.where of an evaluation on the coordinator's own device
EVAL_ON = ("auto", "coordinator", "workers")


@dataclass(frozen=True)
class Batch:
    """What one evaluation scores: version ``version`` on each of ``parents``' blocks, and version
    plus each candidate's patch on its job's blocks (``sets``: job id -> its budgeted blocks)."""

    version: int
    sets: Mapping[str, EvalSet]
    parents: tuple[str, ...] = ()
    candidates: tuple[tuple[str, Adapter], ...] = ()
    # Parents of this version already measured at ``known_where``: reused only by an evaluation
    # there (losses from two places are never paired).
    known: Mapping[str, Losses] = field(default_factory=dict)
    known_where: str = ""

    def reusable(self, where: str) -> dict[str, Losses]:
        return {j: self.known[j] for j in self.parents if j in self.known} if where == self.known_where else {}


@dataclass(frozen=True)
class Evaluated:
    parents: dict[str, Losses]  # job id -> the version's losses on its blocks
    candidates: list[Losses]  # one per Batch.candidates, in order
    where: str  # COORDINATOR, or the id of the worker whose card scored it


class Evaluator(Protocol):
    def evaluate(self, batch: Batch) -> Evaluated: ...


class OnCoordinator:
    """Every evaluation on the running model (which the folder keeps at the batch's version)."""

    def __init__(self, model: RunningModel, dtype: str = "fp32") -> None:
        self.model = model
        self.dtype = dtype

    def evaluate(self, batch: Batch) -> Evaluated:
        known = batch.reusable(COORDINATOR)
        parents = {j: known[j] if j in known else self.model.losses(batch.sets[j], None, self.dtype)
                   for j in batch.parents}
        candidates = [self.model.losses(batch.sets[j], patch, self.dtype) for j, patch in batch.candidates]
        return Evaluated(parents, candidates, COORDINATOR)


class Cards(Protocol):
    """The trusted workers' cards an evaluation can be sent to (``coordinator.schedule.ray_dispatch``)."""

    def eval_card(self, need_gb: float) -> Node | None:
        """The card to evaluate on (None: no trusted card with ``need_gb`` is up)."""
        ...

    def evaluate(self, task: EvalTask, node: Node, need_gb: float, timeout_s: float) -> EvalReply:
        """Run ``task`` on ``node``; raises when it fails or takes longer than ``timeout_s``."""
        ...


class OnWorkers:
    """Each batch as one evaluation task on one trusted worker's card, else on the coordinator.

    ``quiet``: with ``--eval-on auto`` no trusted card being up is the rule's own case (the
    coordinator evaluates), not a fallback worth a warning."""

    def __init__(self, cards: Cards, fallback: OnCoordinator, *, lineage: str, coordinator: str, token: str,
                 dtype: str, timeout_s: float, need_gb: float, quiet: bool = False) -> None:
        self.cards, self.fallback = cards, fallback
        self.lineage, self.coordinator, self.token = lineage, coordinator, token
        self.dtype, self.timeout_s, self.need_gb, self.quiet = dtype, timeout_s, need_gb, quiet

    def evaluate(self, batch: Batch) -> Evaluated:
        node = self.cards.eval_card(self.need_gb)
        if node is None:
            (log.debug if self.quiet else log.warning)(
                "no trusted worker's card is up to evaluate version %d; evaluating it on the coordinator",
                batch.version, extra=fields("eval.fallback", version=batch.version, reason="no trusted card"))
            return self.fallback.evaluate(batch)
        where = node.worker_id or node.node_id
        known = batch.reusable(where)
        jobs = sorted(batch.sets)
        wanted = [j for j in batch.parents if j not in known]
        task = EvalTask.of(self.lineage, batch.version, self.coordinator, self.token, self.dtype,
                           [batch.sets[j] for j in jobs],
                           [(jobs.index(j), None) for j in wanted] + [(jobs.index(j), p) for j, p in batch.candidates])
        started = time.monotonic()
        try:
            reply = self.cards.evaluate(task, node, self.need_gb, self.timeout_s)
            losses = reply.losses(task.eval_sets(), task.items)
        except Exception as exc:  # noqa: BLE001  (any failure: the coordinator evaluates instead)
            log.warning("the evaluation of version %d on worker %s did not come back (%s); evaluating it on the "
                        "coordinator instead", batch.version, where, _reason(exc),
                        extra=fields("eval.fallback", version=batch.version, worker=where, reason=_reason(exc)))
            return self.fallback.evaluate(batch)
        log.debug("version %d: %d evaluations on worker %s (%s) in %.1f s", batch.version, len(task.items), where,
                  reply.device, time.monotonic() - started)
        return Evaluated({**known, **dict(zip(wanted, losses))}, losses[len(wanted):], where)


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc  # Ray wraps the task's own exception
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


def eval_vram_gb(n_params: int) -> float:
    """VRAM an evaluation task asks its card for: the fp32 weights (a worker scores with the
    coordinator's arithmetic) and a quarter more for activations of a batch of blocks."""
    return round(n_params * 4 * 1.25 / 2**30 + 0.25, 2)


def evaluator_for(settings: Settings, device: str, local: OnCoordinator, cards: Cards | None, *, lineage: str,
                  token: str, n_params: int) -> Evaluator:
    """``--eval-on``: coordinator; workers (falling back to the coordinator); auto, the default:
    on the coordinator when its ``device`` is CUDA, else on a trusted worker when one is up."""
    if settings.eval_on not in EVAL_ON:
        raise ValueError(f"--eval-on {settings.eval_on}: choose one of {', '.join(EVAL_ON)}")
    if cards is None or settings.eval_on == "coordinator" or (settings.eval_on == "auto" and device.startswith("cuda")):
        return local
    return OnWorkers(cards, local, lineage=lineage, coordinator=settings.join_address, token=token,
                     dtype=settings.eval_dtype, timeout_s=settings.eval_timeout_s, need_gb=eval_vram_gb(n_params),
                     quiet=settings.eval_on == "auto")
