"""Dispatch leased tasks to Ray: each run becomes a Ray task pinned to the card the scheduler chose.

A run asks for one ``nomoat_worker`` slot (one run per card at a time) and the ``vram_gb`` its
memory plan needs on that card (the 4-bit plan's on a node labelled ``nomoat/loads-4bit``), and is
pinned to one node (hard node affinity): the scheduler picks the card, sizing the run for it, and
Ray enforces that the card can hold it. A run is one or more
consecutive units (ledger tasks) of a job, trained one after another on that card, each under its
own lease and fence. Ray does not retry a run itself: every failure, a dead node included, comes
back through :meth:`poll` so the scheduler releases the lease and re-issues the task with a new
fence (a rerun under the old fence would let a late upload from the dead run through).

What crosses Ray is plain data: a list of :class:`~nomoat.spec.TaskSpec` in, a list of
:class:`~nomoat.spec.UnitResult` out, of :func:`worker.task.run_units`, the worker's training
entry point. Every Ray call of the coordinator lives here; the scheduler sees :class:`Node` and
:class:`~coordinator.schedule.transport.Finished`.

Evaluation tasks (:meth:`RayDispatcher.evaluate`, for ``coordinator.fold.evaluators.OnWorkers``) run
:func:`worker.evaluate.run_evaluation`, the worker's other entry point: an
:class:`~nomoat.evaluation.EvalTask` in, an :class:`~nomoat.evaluation.EvalReply` out. One asks
for the card's whole ``nomoat_worker`` slot, as a run does, so it never shares a card with a
training run (a second model on the card could push the run out of memory, and would slow it):
it takes an idle card (the one with the most VRAM), or, when every card trains, waits on the card
whose run has the fewest tokens left. While it waits or runs, :meth:`nodes` reports its card
busy, so the scheduler gives it no new run and Ray starts the evaluation as soon as the card is
free. An evaluation on a GPU takes seconds; the card goes back to training right after.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from coordinator.schedule.transport import Finished, Need, Node, placement_of
from coordinator.schedule.submit import JobConfig
from nomoat.evaluation import EvalReply, EvalTask
from nomoat.memory import min_vram_gb, shape_for
from nomoat.raynode import LOADS_4BIT_LABEL, VRAM_RESOURCE, WORKER_ID_LABEL, WORKER_RESOURCE
from nomoat.spec import TaskSpec, UnitResult, error_line
from worker.evaluate import run_evaluation
from worker.task import run_units

log = logging.getLogger("nomoat.dispatch")


def task_need(model_config: Any, config: JobConfig) -> Need:
    """The VRAM a card needs for a task of this job: its smallest plan with the base in 16 bits,
    and in 4 bits (NF4, QLoRA) for a card that can load one; the scheduler asks Ray for the one
    that fits the card it picks."""
    shape = shape_for(config.plan_model, model_config)
    args = (shape, config.lora_rank, len(config.target_modules), config.seq_len, "cuda")
    return Need(min_vram_gb(*args, allow_quantization=False), min_vram_gb(*args, allow_quantization=True))


def node_of(entry: dict[str, Any], busy: set[str]) -> Node | None:
    """A card, from an entry of ``ray.nodes()``: a live node that advertises a nomoat worker slot,
    its VRAM, its worker (a label) and whether that worker loads a 4-bit base (a label); None for
    any other node (the head, someone else's). ``busy``: the nodes our runs occupy."""
    resources = entry.get("Resources") or {}
    if not entry.get("Alive") or not resources.get(WORKER_RESOURCE):
        return None
    labels = entry.get("Labels") or {}
    return Node(entry["NodeID"], float(resources.get(VRAM_RESOURCE, 0.0)), entry["NodeID"] in busy,
                worker_id=labels.get(WORKER_ID_LABEL, ""), loads_4bit=labels.get(LOADS_4BIT_LABEL) == "true")


def describe(exc: BaseException) -> str:
    """One line for the ledger: Ray wraps the task's own exception; keep its message."""
    return error_line(getattr(exc, "cause", None) or exc)


@dataclass
class _Run:
    units: list[tuple[str, int, int]]  # (task id, fence, tokens), in the order they train
    node_id: str
    worker_id: str
    cancelled: set[str] = field(default_factory=set)


class RayDispatcher:
    def __init__(self) -> None:
        self._remote = ray.remote(run_units)
        self._evaluation = ray.remote(run_evaluation)
        self._runs: dict[ray.ObjectRef, _Run] = {}
        self._evals: dict[ray.ObjectRef, str] = {}  # evaluation tasks waiting or running -> node id
        # The scheduler's thread submits and polls runs; the folder's sends evaluations and reads
        # the nodes: both go through this lock.
        self._lock = threading.Lock()

    def nodes(self) -> list[Node]:
        """The live nomoat worker nodes, and whether one of our runs or evaluations occupies each."""
        with self._lock:
            busy = {run.node_id for run in self._runs.values()} | set(self._evals.values())
        return [node for entry in ray.nodes() if (node := node_of(entry, busy)) is not None]

    def submit(self, specs: list[TaskSpec], resources: dict[str, float], node_id: str) -> None:
        ref = self._remote.options(
            name="nomoat:" + ",".join(s.task_id for s in specs)[:200],
            num_cpus=0,
            resources=resources,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            max_retries=0,  # retries are the scheduler's: each one gets a new lease and fence
            retry_exceptions=False,
        ).remote(specs)
        with self._lock:
            self._runs[ref] = _Run([(s.task_id, s.fence, s.tokens) for s in specs], node_id, specs[0].worker_id)

    def poll(self) -> list[Finished]:
        with self._lock:
            refs = list(self._runs)
        if not refs:
            return []
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        finished = []
        for ref in ready:
            with self._lock:
                run = self._runs.pop(ref)
            try:
                units: list[UnitResult] = ray.get(ref)
            except ray.exceptions.TaskCancelledError:
                continue
            except Exception as exc:  # noqa: BLE001  (any failure is reported, not raised)
                error = describe(exc)
                finished += [Finished(t, f, error, node_id=run.node_id) for t, f, _ in run.units]
                continue
            finished += [Finished.of(unit, run.worker_id, run.node_id) for unit in units]
        return finished

    def cancel(self, task_id: str, only_alone: bool = False) -> list[tuple[str, int]]:
        """Cancel the run holding ``task_id``; with ``only_alone``, only if it is its only unit.

        Returns (task id, fence) of every unit of the run cancelled. Cancelling kills the run's
        worker process (``force``: a hung trainer does not check for cancellation), so every unit
        of it that had not uploaded yet is lost, not just ``task_id``: the scheduler puts them
        back in the queue. A run that has already returned is left for :meth:`poll`, which
        reports how each unit really ended (killing it would drop those results).
        """
        stopped: list[tuple[str, int]] = []
        with self._lock:
            runs = list(self._runs.items())
        for ref, run in runs:
            ids = [t for t, _, _ in run.units]
            if task_id not in ids or (only_alone and len(ids) > 1):
                continue
            ended, _ = ray.wait([ref], timeout=0)
            if ended:
                continue
            ray.cancel(ref, force=True)
            with self._lock:
                self._runs.pop(ref, None)
            stopped += [(t, f) for t, f, _ in run.units]
        return stopped

    def in_flight(self) -> int:
        return len(self._runs)

    def placement(self) -> dict[str, tuple[str, int]]:
        with self._lock:
            runs = list(self._runs.values())
        return placement_of((run.node_id, run.units) for run in runs)

    # -- evaluation tasks (coordinator.fold.evaluators.OnWorkers) ----------------------------------

    def eval_card(self, need_gb: float) -> Node | None:
        """The card an evaluation goes to: an idle one with ``need_gb`` of VRAM (the most VRAM
        first), else the busy one whose run has the fewest tokens left; None when none has it."""
        fits = [n for n in self.nodes() if n.vram_gb >= need_gb]
        idle = [n for n in fits if not n.busy]
        if idle:
            return max(idle, key=lambda n: n.vram_gb)
        with self._lock:
            ahead: dict[str, int] = {}
            for run in self._runs.values():
                ahead[run.node_id] = ahead.get(run.node_id, 0) + sum(tokens for _, _, tokens in run.units)
            evaluating = set(self._evals.values())
        return min((n for n in fits if n.node_id not in evaluating), key=lambda n: ahead.get(n.node_id, 0),
                   default=None)

    def evaluate(self, task: EvalTask, node: Node, need_gb: float, timeout_s: float) -> EvalReply:
        """Run ``task`` on ``node``'s card and wait for it; raises the task's error, or
        TimeoutError after ``timeout_s`` (waiting for the card included; the task is cancelled)."""
        ref = self._evaluation.options(
            name=f"nomoat-eval:v{task.version}",
            num_cpus=0,
            resources={WORKER_RESOURCE: 1.0, VRAM_RESOURCE: need_gb},
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
            max_retries=0,  # a failure falls back to the coordinator at once
            retry_exceptions=False,
        ).remote(task)
        with self._lock:
            self._evals[ref] = node.node_id
        try:
            return ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            raise TimeoutError(f"no answer within {timeout_s:g} s") from None
        finally:
            with self._lock:
                self._evals.pop(ref, None)
