"""Outbound-only workers: a second transport behind the scheduler's Dispatcher, for the public.

A volunteer behind a home router opens no port and runs no code it is sent. It connects out to
the coordinator's gRPC port and asks for work with a long-poll (``Workers.RequestWork``); a run
arrives as data, the units' :class:`~nomoat.spec.TaskSpec` as JSON checked field by field on the
worker; it heartbeats, fetches shards and uploads exactly as a Ray task does, and says how each
unit ended (``Workers.ReportRun``). The lease rules decide everything else: a worker that goes
quiet loses its leases when they expire, and the scheduler re-issues them with new fences.

Two halves, meeting only in the ledger (coordinator.ledger.inbox), so several coordinator
frontends can serve long-polls while one scheduler places runs:

* :class:`OutboundDispatcher`, in the scheduler's process: the workers that asked for work
  lately are its cards (:meth:`~OutboundDispatcher.nodes`); a run placed on one goes into that
  worker's inbox; reports come back from the results list as
  :class:`~coordinator.schedule.transport.Finished`.
* :func:`request_work` and :func:`report_run`, in whichever frontend the worker's call reached:
  a blocking pop on the caller's inbox, and the report checked against the run's record and
  passed on.
"""

from __future__ import annotations

import json
import logging
import math
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from coordinator.gateway.auth import Identity
from coordinator.errors import InvalidRequest, NotFound, NotPermitted
from coordinator.schedule.holder import hand_back
from coordinator.ledger import Ledger, RunReport
from coordinator.schedule.transport import Finished, Node, placement_of
from coordinator.settings import Settings
from nomoat import card as cards
from nomoat.spec import SpecError, TaskSpec, UnitResult
from nomoat.v1 import nomoat_pb2 as pb

log = logging.getLogger("nomoat.outbound")

NODE_PREFIX = "outbound:"  # an outbound worker's node id is this and its worker id
CARD_CACHE_S = 30.0  # how long the dispatcher trusts a worker's card as read from the ledger
POLLS_PER_S = 100.0  # the short polls a frontend invites per second when its long-poll slots are full
MAX_POLL_AGAIN_S = 30.0
# A long-poll waits in slices this long (whole seconds: BLPOP's timeout on Redis before 6.0),
# checking between them that its worker still waits for the answer.
POLL_SLICE_S = 1.0


def node_id_of(worker_id: str) -> str:
    return NODE_PREFIX + worker_id


def is_outbound(node_id: str) -> bool:
    return node_id.startswith(NODE_PREFIX)


@dataclass
class _Run:
    run_id: str
    worker_id: str
    units: list[tuple[str, int, int]]  # (task id, fence, tokens), in the order they train

    @property
    def node_id(self) -> str:
        return node_id_of(self.worker_id)


@dataclass(frozen=True)
class _Card:
    """What placement reads of a worker's registered card."""

    vram_gb: float
    loads_4bit: bool


_NO_CARD = _Card(0.0, False)  # a worker whose record holds no card is no card to place on


@dataclass
class OutboundDispatcher:
    """The scheduler's Dispatcher for outbound-only workers (see the module docstring)."""

    ledger: Ledger
    liveness_s: float = 60.0
    _runs: dict[str, _Run] = field(default_factory=dict)
    _cards: dict[str, tuple[_Card, float]] = field(default_factory=dict)  # worker -> (its card, read at)

    def nodes(self) -> list[Node]:
        """The workers that asked for work within ``liveness_s``, and those with a run of ours
        (busy: a worker training does not poll; its leases decide its fate)."""
        now = time.time()
        self.ledger.inbox.forget_before(now - 10 * self.liveness_s)
        busy = {run.worker_id for run in self._runs.values()}
        ids = sorted(set(self.ledger.inbox.polling(now - self.liveness_s)) | busy)
        found = self._cards_of(ids, now)
        return [Node(node_id_of(w), found[w].vram_gb, w in busy, worker_id=w, loads_4bit=found[w].loads_4bit)
                for w in ids if found[w].vram_gb > 0]

    def _cards_of(self, worker_ids: list[str], now: float) -> dict[str, _Card]:
        """Each worker's card as a Ray node would advertise it (worker.probe: its VRAM rounded
        down, never more, and whether it loads a 4-bit base), from the ledger in one round trip
        for those not cached."""
        stale = [w for w in worker_ids if now - self._cards.get(w, (_NO_CARD, -math.inf))[1] >= CARD_CACHE_S]
        for worker_id, raw in zip(stale, self.ledger.workers.cards(stale)):
            card = _NO_CARD
            if raw:
                registered = cards.from_message(pb.Card.FromString(raw))
                card = _Card(int(registered.vram_gb * 100) / 100, registered.loads_4bit)
            self._cards[worker_id] = (card, now)
        return {w: self._cards[w][0] for w in worker_ids}

    def submit(self, specs: list[TaskSpec], resources: dict[str, float], node_id: str) -> None:
        """Put the run in its worker's inbox. The coordinator's own worker token stays here: an
        outbound worker calls with its own."""
        self.submit_many([(specs, resources, node_id)])

    def submit_many(self, runs: list[tuple[list[TaskSpec], dict[str, float], str]]) -> None:
        """:meth:`submit` each run, every inbox in one round trip."""
        placed = []
        for specs, _, node_id in runs:
            worker_id = node_id[len(NODE_PREFIX):]
            run_id = "r-" + secrets.token_hex(8)
            payload = [json.dumps(replace(s, token="", worker_id=worker_id).to_dict()) for s in specs]
            placed.append((run_id, worker_id, [(s.task_id, s.fence) for s in specs], payload))
        self.ledger.inbox.place_many(placed)
        for (run_id, worker_id, _, _), (specs, _, _) in zip(placed, runs):
            self._runs[run_id] = _Run(run_id, worker_id, [(s.task_id, s.fence, s.tokens) for s in specs])

    def poll(self) -> list[Finished]:
        finished: list[Finished] = []
        for report in self.ledger.inbox.reports():
            run = self._runs.pop(report.run_id, None)
            if run is None:
                continue  # cancelled meanwhile, or placed by a coordinator before a restart
            finished += _finished(run, report)
        return finished

    def cancel(self, task_id: str, only_alone: bool = False) -> list[tuple[str, int]]:
        """Forget the run holding ``task_id`` (taking it back from the inbox if it was not yet
        handed out). A worker already training it learns on its next heartbeat that the lease is
        gone and stops. A run already reported is left for :meth:`poll`."""
        stopped: list[tuple[str, int]] = []
        for run in list(self._runs.values()):
            ids = [t for t, _, _ in run.units]
            if task_id not in ids or (only_alone and len(ids) > 1):
                continue
            if self.ledger.inbox.reported(run.run_id):
                continue
            self.ledger.inbox.withdraw(run.run_id, run.worker_id)
            self._runs.pop(run.run_id, None)
            stopped += [(t, f) for t, f, _ in run.units]
        return stopped

    def in_flight(self) -> int:
        return len(self._runs)

    def placement(self) -> dict[str, tuple[str, int]]:
        return placement_of((run.node_id, run.units) for run in self._runs.values())


def _finished(run: _Run, report: RunReport) -> list[Finished]:
    """Each unit of ``run`` as its report says it ended. Units handed back are already back in
    the queue; a unit the report leaves out (or garbles) failed."""
    results: dict[str, UnitResult] = {}
    fences = {t: f for t, f, _ in run.units}
    for raw in report.units:
        unit = parse_unit(raw)
        if unit is not None and fences.get(unit.task_id) == unit.fence:
            results[unit.task_id] = unit
    finished = []
    for task_id, fence, _ in run.units:
        if task_id in report.handed_back and task_id not in results:
            continue
        unit = results.get(task_id) or UnitResult(task_id, fence, "the worker's report left this unit out")
        finished.append(Finished.of(unit, run.worker_id, run.node_id))
    return finished


def parse_unit(raw: str) -> UnitResult | None:
    try:
        return UnitResult.from_dict(json.loads(raw))
    except (SpecError, ValueError, TypeError):
        return None


# -- a frontend's side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """The answer to a long-poll: a run (its id and unit specs as JSON), or when to ask again."""

    run_id: str = ""
    specs: tuple[str, ...] = ()
    poll_again_s: float = 0.0


class LongPolls:
    """How many long-polls this frontend holds at once: each holds a server thread, and the
    threads must also serve heartbeats and uploads. A poll over the limit is answered at once
    with a time to ask again, spread so the polls arriving stay near ``POLLS_PER_S``."""

    def __init__(self, slots: int) -> None:
        self._slots = threading.BoundedSemaphore(max(1, slots))

    def acquire(self) -> bool:
        return self._slots.acquire(blocking=False)

    def release(self) -> None:
        self._slots.release()


def _own(ledger: Ledger, identity: Identity, worker_id: str) -> None:
    """A worker token acts only for workers it registered (admin for any)."""
    record = ledger.workers.get(worker_id) if worker_id else None
    if record is None:
        raise NotFound(f"there is no worker {worker_id!r}; register first")
    if identity.role != "admin" and record.token != identity.token_hash:
        raise NotPermitted(f"worker {worker_id} was registered with another token")


def request_work(ledger: Ledger, settings: Settings, identity: Identity, worker_id: str, wait_s: float,
                 polls: LongPolls, still_wanted: Callable[[], bool] = lambda: True) -> Work:
    """The next run placed on ``worker_id``, waiting up to ``wait_s`` (capped at the coordinator's
    ``long_poll_s``) for one; when every long-poll slot is taken, no wait, and a time to ask again.

    The wait is taken in slices of ``POLL_SLICE_S``, and ends early once ``still_wanted()`` says
    no (the worker cancelled its poll, the server is stopping): a poll nobody waits for does not
    hold a slot and a server thread for the rest of its time."""
    _own(ledger, identity, worker_id)
    ledger.inbox.seen(worker_id)
    wait = max(0.0, min(wait_s, settings.long_poll_s))
    held = wait > 0 and polls.acquire()
    try:
        end = time.monotonic() + wait
        got = ledger.inbox.take(worker_id, min(wait, POLL_SLICE_S) if held else 0.0)
        while got is None and held and end - time.monotonic() >= POLL_SLICE_S and still_wanted():
            got = ledger.inbox.take(worker_id, POLL_SLICE_S)
    finally:
        if held:
            polls.release()
    if got is not None:
        run_id, specs = got
        log.info("run %s (%d units) handed to worker %s", run_id, len(specs), worker_id)
        return Work(run_id, tuple(specs))
    if held:
        return Work()  # waited the whole poll: ask again at once
    polling = ledger.inbox.polling_count(time.time() - settings.outbound_liveness_s)
    again = min(MAX_POLL_AGAIN_S, max(1.0, polling / POLLS_PER_S))
    return Work(poll_again_s=again * random.uniform(0.5, 1.5))


def report_run(ledger: Ledger, identity: Identity, worker_id: str, run_id: str, units: list[str],
               handed_back: list[str]) -> None:
    """Check a worker's report against its run's record and pass it on to the scheduler. Units it
    hands back go back in the queue now, without spending an attempt.

    Raises NotFound for an unknown run, NotPermitted for another worker's, InvalidRequest for a
    unit that is not the run's or is malformed.
    """
    _own(ledger, identity, worker_id)
    record = ledger.inbox.run(run_id)
    if record is None:
        raise NotFound(f"there is no run {run_id!r} (it may be older than a week)")
    if record.worker_id != worker_id:
        raise NotPermitted(f"run {run_id} was given to another worker")
    fences = dict(record.units)
    for raw in units:
        unit = parse_unit(raw)
        if unit is None:
            raise InvalidRequest("a unit of the report is not a valid unit result")
        if fences.get(unit.task_id) != unit.fence:
            raise InvalidRequest(f"task {unit.task_id} under fence {unit.fence} is not a unit of run {run_id}")
    for task_id in handed_back:
        if task_id not in fences:
            raise InvalidRequest(f"task {task_id} is not a unit of run {run_id}")
        hand_back(ledger, task_id, fences[task_id], worker_id, f"worker {worker_id} handed it back unstarted")
    ledger.inbox.seen(worker_id)
    ledger.inbox.report(RunReport(run_id, worker_id, tuple(units), tuple(handed_back)))
