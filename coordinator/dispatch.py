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
:class:`~nomoat.spec.UnitResult` out, of :func:`worker.task.run_units`, the worker's entry point
and the only worker code the coordinator names. Every Ray call of the coordinator lives here; the
scheduler sees :class:`Node` and :class:`~coordinator.scheduler.Finished`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from coordinator.scheduler import Finished, Need, Node, placement_of
from coordinator.submit import JobConfig
from nomoat.memory import min_vram_gb, shape_for
from nomoat.raynode import LOADS_4BIT_LABEL, VRAM_RESOURCE, WORKER_ID_LABEL, WORKER_RESOURCE
from nomoat.spec import TaskSpec, UnitResult, error_line
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
        self._runs: dict[ray.ObjectRef, _Run] = {}

    def nodes(self) -> list[Node]:
        """The live nomoat worker nodes, and whether one of our runs occupies each."""
        busy = {run.node_id for run in self._runs.values()}
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
        self._runs[ref] = _Run([(s.task_id, s.fence, s.tokens) for s in specs], node_id, specs[0].worker_id)

    def poll(self) -> list[Finished]:
        if not self._runs:
            return []
        ready, _ = ray.wait(list(self._runs), num_returns=len(self._runs), timeout=0)
        finished = []
        for ref in ready:
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
        for ref, run in list(self._runs.items()):
            ids = [t for t, _, _ in run.units]
            if task_id not in ids or (only_alone and len(ids) > 1):
                continue
            ended, _ = ray.wait([ref], timeout=0)
            if ended:
                continue
            ray.cancel(ref, force=True)
            self._runs.pop(ref, None)
            stopped += [(t, f) for t, f, _ in run.units]
        return stopped

    def in_flight(self) -> int:
        return len(self._runs)

    def placement(self) -> dict[str, tuple[str, int]]:
        return placement_of((run.node_id, run.units) for run in self._runs.values())
