"""Transports: how a leased run reaches a card, as the scheduler sees it.

A :class:`Dispatcher` is one transport (Ray nodes in ``coordinator.schedule.ray_dispatch``, outbound-only
workers in ``coordinator.schedule.inbox_dispatch``); :class:`Dispatchers` puts several behind one scheduler. What
crosses between them and the scheduler is plain data: the cards (:class:`Node`), what a job's task
needs of one (:class:`Need`), the resources a run asks for, and how each unit ended
(:class:`Finished`). :func:`placement_of` is the one rule every transport answers
``placement()`` with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from nomoat.raynode import VRAM_RESOURCE, WORKER_RESOURCE
from coordinator.ledger.leaders import NotLeader
from nomoat.spec import TaskSpec, UnitResult


@dataclass(frozen=True)
class Finished:
    task_id: str
    fence: int
    error: str  # "" on success
    tokens: int = 0
    seconds: float = 0.0
    worker_id: str = ""
    node_id: str = ""
    # > 0: out of memory on every plan of its card; the VRAM a card needs to be given the task
    needs_vram_gb: float = 0.0
    handed_back: bool = False  # not started: its worker paused (worker.controls); not a failure

    @classmethod
    def of(cls, unit: UnitResult, worker_id: str, node_id: str) -> Finished:
        """A unit's result as the worker's task reported it, from the run on ``node_id``."""
        return cls(unit.task_id, unit.fence, unit.error, tokens=unit.tokens, seconds=unit.seconds,
                   worker_id=worker_id, node_id=node_id, needs_vram_gb=unit.needs_vram_gb,
                   handed_back=unit.handed_back)


@dataclass(frozen=True)
class Node:
    """A worker's card, as placement sees it."""

    node_id: str
    vram_gb: float
    busy: bool  # one of our runs occupies it
    worker_id: str = ""  # whose card it is (its ledger worker record); "" when the node does not say
    loads_4bit: bool = False  # its worker can load a 4-bit base (nomoat.card.Card.loads_4bit)


@dataclass(frozen=True)
class Need:
    """The VRAM a card needs for a job's task, as the job's smallest plans ask (nomoat.memory,
    headroom included): with the base in 16 bits, and in 4 bits (QLoRA) on a card that can load
    one. The worker's planner (worker.planner.plan) takes the 16-bit plan where it fits and the
    4-bit one only where it does not, so :meth:`on` asks Ray for the plan the card will run."""

    vram_gb: float
    vram_4bit_gb: float = 0.0  # 0: the job has no 4-bit plan

    @property
    def smallest(self) -> float:
        """What a card that loads a 4-bit base needs at least."""
        return min(self.vram_gb, self.vram_4bit_gb) if self.vram_4bit_gb > 0 else self.vram_gb

    def on(self, vram_gb: float, loads_4bit: bool) -> float:
        """What a card of ``vram_gb`` needs for the plan it would run: the 16-bit one, or where that
        does not fit and the card loads a 4-bit base (``loads_4bit``), the 4-bit one."""
        return self.smallest if loads_4bit and self.vram_gb > vram_gb else self.vram_gb


def run_resources(vram_gb: float) -> dict[str, float]:
    """What a run asks its card for: the card to itself (one nomoat_worker slot), and the VRAM
    its plan on that card needs (the 4-bit figure on a card that trains it in 4 bits)."""
    return {WORKER_RESOURCE: 1.0, VRAM_RESOURCE: vram_gb}


def roomiest(nodes: Iterable[Node]) -> tuple[float, float]:
    """The most VRAM among ``nodes``, and among those that load a 4-bit base (0.0: none)."""
    nodes = list(nodes)
    return (max((n.vram_gb for n in nodes), default=0.0),
            max((n.vram_gb for n in nodes if n.loads_4bit), default=0.0))


class Dispatcher(Protocol):
    """How a leased run reaches a card: Ray (coordinator.schedule.ray_dispatch) or outbound-only gRPC
    (coordinator.schedule.inbox_dispatch); :class:`Dispatchers` puts several behind one scheduler."""

    def nodes(self) -> list[Node]: ...
    def submit(self, specs: list[TaskSpec], resources: dict[str, float], node_id: str) -> None: ...
    def poll(self) -> list[Finished]: ...
    def cancel(self, task_id: str, only_alone: bool = False) -> list[tuple[str, int]]:
        """Stop the run holding ``task_id`` (with ``only_alone``, only if it is the run's one unit);
        returns (task id, fence) of every unit of the runs stopped. A run that already ended is
        left to :meth:`poll`, which reports each of its units."""
        ...
    def in_flight(self) -> int: ...
    def placement(self) -> dict[str, tuple[str, int]]: ...


Run = tuple[list[TaskSpec], dict[str, float], str]  # a run to submit: its units' specs, resources, node id


def submit_all(dispatcher: Dispatcher, runs: list[Run]) -> list[Exception | None]:
    """Submit a round's runs; what went wrong with each (None: it was dispatched). At once where
    the dispatcher can (``submit_many``: an outbound dispatcher puts every run in its inbox in
    one round trip, and a failure there is every one of those runs'), else one by one, so one
    card's broken transport is that card's run's failure alone. A leader that lost its fence
    stops the round (NotLeader is raised)."""
    per_run = getattr(dispatcher, "submit_runs", None)
    if per_run is not None:
        return per_run(runs)
    many = getattr(dispatcher, "submit_many", None)
    if many is not None:
        try:
            many(runs)
            return [None] * len(runs)
        except NotLeader:
            raise
        except Exception as exc:  # noqa: BLE001  (the batch's failure is each of its runs')
            return [exc] * len(runs)
    failures: list[Exception | None] = []
    for specs, resources, node_id in runs:
        try:
            dispatcher.submit(specs, resources, node_id)
            failures.append(None)
        except NotLeader:
            raise
        except Exception as exc:  # noqa: BLE001  (this run's, not the round's)
            failures.append(exc)
    return failures


def placement_of(runs: Iterable[tuple[str, list[tuple[str, int, int]]]]) -> dict[str, tuple[str, int]]:
    """What Dispatcher.placement answers, from (node id, units as (task id, fence, tokens) in
    training order) of each run in flight: task id -> (node id, tokens its run trains up to and
    including it). One rule for every transport."""
    where = {}
    for node_id, units in runs:
        ahead = 0
        for task_id, _, tokens in units:
            ahead += tokens
            where[task_id] = (node_id, ahead)
    return where


class Dispatchers:
    """Several transports as one Dispatcher (Ray nodes and outbound workers alike): one scheduler
    places runs on all their cards by the same rules. Each node belongs to the transport that
    listed it; the rest is the sum of the parts."""

    def __init__(self, *parts: Dispatcher) -> None:
        self.parts = parts
        self._owner: dict[str, Dispatcher] = {}

    def nodes(self) -> list[Node]:
        found: list[Node] = []
        owner: dict[str, Dispatcher] = {}
        for part in self.parts:
            for node in part.nodes():
                owner[node.node_id] = part
                found.append(node)
        self._owner = owner
        return found

    def submit(self, specs: list[TaskSpec], resources: dict[str, float], node_id: str) -> None:
        (failure,) = self.submit_runs([(specs, resources, node_id)])
        if failure is not None:
            raise failure

    def submit_runs(self, runs: list[Run]) -> list[Exception | None]:
        """:func:`submit_all` over the parts: each part gets its own runs, at once where it can."""
        failures: list[Exception | None] = [None] * len(runs)
        by_part: dict[int, list[int]] = {}
        for i, run in enumerate(runs):
            part = self._owner.get(run[2])
            if part is None:
                failures[i] = KeyError(f"no transport lists node {run[2]}")
                continue
            by_part.setdefault(id(part), []).append(i)
        for part in self.parts:
            if id(part) in by_part:
                mine = by_part[id(part)]
                for i, failure in zip(mine, submit_all(part, [runs[i] for i in mine])):
                    failures[i] = failure
        return failures

    def poll(self) -> list[Finished]:
        return [done for part in self.parts for done in part.poll()]

    def cancel(self, task_id: str, only_alone: bool = False) -> list[tuple[str, int]]:
        return [unit for part in self.parts for unit in part.cancel(task_id, only_alone=only_alone)]

    def in_flight(self) -> int:
        return sum(part.in_flight() for part in self.parts)

    def placement(self) -> dict[str, tuple[str, int]]:
        where: dict[str, tuple[str, int]] = {}
        for part in self.parts:
            where.update(part.placement())
        return where
