"""Fakes for what a unit test cannot run: here, a Ray cluster of GPU cards.

:class:`FakeDispatcher` is an in-memory :class:`coordinator.schedule.transport.Dispatcher` for tests
only. It holds cards (VRAM and a simulated speed in tokens per second) and the runs the
scheduler submitted to them. A run ends, as a Ray task does, all at once:

* when the test says so (:meth:`FakeDispatcher.complete`, :meth:`fail`, :meth:`oom`, :meth:`crash`);
* or when its simulated time has passed (:meth:`FakeDispatcher.advance`): each unit takes
  ``tokens / tokens_per_s`` seconds, one after another.

Each unit that succeeds is handed to ``upload`` first, as the real task uploads its adapter before
it returns; a refused upload makes the unit fail with the sentence the real task raises. Its
results come back through :meth:`poll`, like ``RayDispatcher.poll``. The clock (:attr:`now`) is
what the test passes to ``Scheduler.tick``.

Everything the fake reads from a task spec goes through :func:`unit_of`; everything it builds for
the scheduler through :func:`node_of`, :func:`finished` and :func:`oom_error`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coordinator.schedule.transport import Finished, Node
from nomoat.raynode import VRAM_RESOURCE
from nomoat.spec import NeedsBiggerCard, TaskSpec, error_line

# (spec, worker id) -> "" when the coordinator accepted the unit's adapter, else why not.
Upload = Callable[[Any, str], str]


def unit_of(spec: TaskSpec) -> tuple[str, int, int]:
    """(task id, fence, tokens) of a task spec."""
    return spec.task_id, spec.fence, spec.tokens


def node_of(card: FakeCard, busy: bool) -> Node:
    """What Ray shows of a card: its node, and its worker id (the label the agent gives the node)."""
    return Node(card.node_id, card.vram_gb, busy, worker_id=card.worker_id, loads_4bit=card.loads_4bit)


def finished(task_id: str, fence: int, error: str, card: FakeCard, tokens: int = 0, seconds: float = 0.0,
             needs_vram_gb: float = 0.0) -> Finished:
    return Finished(task_id, fence, error, tokens=tokens, seconds=seconds, worker_id=card.worker_id,
                    node_id=card.node_id, needs_vram_gb=needs_vram_gb)


def oom_error(card: FakeCard) -> NeedsBiggerCard:
    """What a unit that ran out of memory even at micro-batch 1 raises (worker.task.train_fitting)."""
    return NeedsBiggerCard.than(card.vram_gb, f"out of memory even at micro-batch 1 on {card.name}")


@dataclass(frozen=True)
class FakeCard:
    node_id: str
    vram_gb: float
    tokens_per_s: float
    name: str = "FakeCard"
    worker: str = ""  # its worker's id; "" for one named after the node
    loads_4bit: bool = False  # a CUDA card whose worker has bitsandbytes (the label its node carries)

    @property
    def worker_id(self) -> str:
        return self.worker or f"w-{self.node_id}"


@dataclass
class FakeRun:
    """One submitted run: its units train in order on ``card``."""

    card: FakeCard
    specs: list[TaskSpec]
    resources: dict[str, float]
    started: float
    outcomes: dict[str, str] = field(default_factory=dict)  # task id -> error ("" done), once decided
    needs_vram_gb: dict[str, float] = field(default_factory=dict)  # task id -> VRAM, for units out of memory
    hung: bool = False  # never ends by itself (a run that stopped heartbeating)

    @property
    def task_ids(self) -> list[str]:
        return [unit_of(s)[0] for s in self.specs]

    @property
    def tokens(self) -> int:
        return sum(unit_of(s)[2] for s in self.specs)

    def seconds(self) -> float:
        return self.tokens / self.card.tokens_per_s


class FakeDispatcher:
    """An in-memory stand-in for Ray (coordinator.schedule.ray_dispatch.RayDispatcher), for tests only."""

    def __init__(self, cards: list[FakeCard], upload: Upload | None = None, start: float | None = None) -> None:
        self.cards = {c.node_id: c for c in cards}
        self.upload = upload
        self.now = time.time() if start is None else start
        self.running: list[FakeRun] = []
        self.submitted: list[FakeRun] = []  # every run ever submitted, in order
        self.cancelled: list[FakeRun] = []
        self._ended: list[FakeRun] = []  # ended, not yet polled

    # -- the Dispatcher protocol ---------------------------------------------------------------

    def nodes(self) -> list[Node]:
        busy = {run.card.node_id for run in self.running}
        return [node_of(card, card.node_id in busy) for card in self.cards.values()]

    def submit(self, specs: list[TaskSpec], resources: dict[str, float], node_id: str) -> None:
        card = self.cards[node_id]
        # Ray's hard node affinity and custom resources would leave such a run pending forever.
        assert resources.get(VRAM_RESOURCE, 0.0) <= card.vram_gb, (
            f"a run asking for {resources.get(VRAM_RESOURCE)} GB was pinned to a {card.vram_gb:g} GB card")
        assert node_id not in {r.card.node_id for r in self.running}, f"card {node_id} already runs a run"
        run = FakeRun(card, list(specs), dict(resources), self.now)
        self.running.append(run)
        self.submitted.append(run)

    def poll(self) -> list[Finished]:
        done, self._ended = self._ended, []
        out = []
        for run in done:
            for spec in run.specs:
                task_id, fence, tokens = unit_of(spec)
                error = run.outcomes[task_id]
                if error:
                    out.append(finished(task_id, fence, error, run.card,
                                        needs_vram_gb=run.needs_vram_gb.get(task_id, 0.0)))
                else:
                    out.append(finished(task_id, fence, "", run.card, tokens, tokens / run.card.tokens_per_s))
        return out

    def cancel(self, task_id: str, only_alone: bool = False) -> list[tuple[str, int]]:
        """Like Ray's: the whole run stops (its units are all lost); a run that ended is left to poll."""
        stopped = []
        for run in list(self.running):
            if task_id in run.task_ids and (len(run.specs) == 1 or not only_alone):
                self.running.remove(run)
                self.cancelled.append(run)
                stopped += [unit_of(s)[:2] for s in run.specs]
        return stopped

    def in_flight(self) -> int:
        return len(self.running)

    def placement(self) -> dict[str, tuple[str, int]]:
        where = {}
        for run in self.running:
            ahead = 0
            for spec in run.specs:
                task_id, _, tokens = unit_of(spec)
                ahead += tokens
                where[task_id] = (run.card.node_id, ahead)
        return where

    # -- what the test does --------------------------------------------------------------------

    def add_card(self, card: FakeCard) -> None:
        """A card joins the cluster."""
        self.cards[card.node_id] = card

    def advance(self, seconds: float) -> None:
        """Let simulated time pass: every run whose units are all trained by then ends."""
        self.now += seconds
        for run in list(self.running):
            if not run.hung and run.started + run.seconds() <= self.now + 1e-9:
                self._end(run, {})

    def hang(self, task_id: str) -> None:
        """The run holding ``task_id`` hangs: it ends only when the test or a cancel ends it."""
        self.run_of(task_id).hung = True

    def complete(self, task_id: str) -> None:
        """The run holding ``task_id`` ends now, every unit trained."""
        self._end(self.run_of(task_id), {})

    def fail(self, task_id: str, error: str = "RuntimeError: the trainer failed") -> None:
        """The run holding ``task_id`` ends now; that unit failed, the others trained."""
        self._end(self.run_of(task_id), {task_id: error})

    def oom(self, task_id: str) -> None:
        """That unit runs out of memory even at micro-batch 1; the rest of its run is not tried
        (worker.task.run_units stops there: the rest would run out the same way)."""
        run = self.run_of(task_id)
        rest = run.task_ids[run.task_ids.index(task_id):]
        oom = oom_error(run.card)
        run.needs_vram_gb.update(dict.fromkeys(rest, oom.vram_gb))
        self._end(run, dict.fromkeys(rest, error_line(oom)))

    def crash(self, task_id: str, error: str = "NodeDiedError: the node died") -> None:
        """The run holding ``task_id`` dies as a whole (its node died): every unit fails."""
        run = self.run_of(task_id)
        self._end(run, dict.fromkeys(run.task_ids, error))

    def run_of(self, task_id: str) -> FakeRun:
        for run in self.running:
            if task_id in run.task_ids:
                return run
        raise AssertionError(f"no run holds {task_id}; running: {[r.task_ids for r in self.running]}")

    def _end(self, run: FakeRun, errors: dict[str, str]) -> None:
        for spec in run.specs:
            task_id = unit_of(spec)[0]
            error = errors.get(task_id, "")
            if not error and self.upload is not None:
                refused = self.upload(spec, run.card.worker_id)
                if refused:
                    error = f"TaskAborted: the coordinator refused the adapter: {refused}"
            run.outcomes[task_id] = error
        self.running.remove(run)
        self._ended.append(run)
