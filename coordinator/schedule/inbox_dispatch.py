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
  a wait on the caller's inbox, and the report checked against the run's record and
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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from coordinator.gateway.auth import Identity
from coordinator.errors import InvalidRequest, NotFound, NotPermitted
from coordinator.schedule.holder import hand_back
from coordinator.ledger import Claim, Ledger, RunReport
from coordinator.ledger.leaders import Term
from coordinator.ledger.leases import secret_hash
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
    # The scheduler's round: the fence its runs are placed under (coordinator.ledger.leaders).
    term: Term = field(default_factory=Term)
    _runs: dict[str, _Run] = field(default_factory=dict)
    _cancelled: deque = field(default_factory=lambda: deque(maxlen=10_000))  # run ids this process cancelled
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
            placed.append((run_id, worker_id, [(s.task_id, s.fence) for s in specs], payload,
                           {s.task_id: secret_hash(s.lease_secret) for s in specs}))
        self.ledger.inbox.place_many(placed, leader=self.term.fence)
        for (run_id, worker_id, *_), (specs, _, _) in zip(placed, runs):
            self._runs[run_id] = _Run(run_id, worker_id, [(s.task_id, s.fence, s.tokens) for s in specs])

    def poll(self) -> list[Finished]:
        finished: list[Finished] = []
        for report in self.ledger.inbox.reports():
            run = self._runs.pop(report.run_id, None)
            if run is None and report.run_id not in self._cancelled:
                run = self._adopt(report.run_id)
            if run is None:
                continue  # cancelled meanwhile, or its record is gone (older than a week)
            finished += _finished(run, report)
        return finished

    def _adopt(self, run_id: str) -> _Run | None:
        """A run this process did not place (another scheduler did, before it died or lost its
        lease, or this one before a restart), from the ledger's record of it: its units' results
        are handled as if it had (each step checks the unit's fence, so a stale one changes nothing)."""
        record = self.ledger.inbox.run(run_id)
        if record is None:
            return None
        return _Run(run_id, record.worker_id, [(t, f, 0) for t, f in record.units])

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
            self._cancelled.append(run.run_id)
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
    """How many long-polls this frontend holds at once (each holds a Redis look every few
    seconds, and in the blocking form a thread). A poll over the limit is answered at once
    with a time to ask again, spread so the polls arriving stay near ``POLLS_PER_S``."""

    def __init__(self, slots: int) -> None:
        self._slots = threading.BoundedSemaphore(max(1, slots))

    def acquire(self) -> bool:
        return self._slots.acquire(blocking=False)

    def release(self) -> None:
        self._slots.release()


def _own(ledger: Ledger, identity: Identity, worker_id: str) -> None:
    """A worker token acts only for workers it registered (admin for any)."""
    token = ledger.workers.token_of(worker_id) if worker_id else None
    if token is None:
        raise NotFound(f"there is no worker {worker_id!r}; register first")
    if identity.role != "admin" and token != identity.token_hash:
        raise NotPermitted(f"worker {worker_id} was registered with another token")


def open_poll(ledger: Ledger, identity: Identity, worker_id: str) -> None:
    """A poll for work begins: the caller must own ``worker_id``, which now counts as alive."""
    _own(ledger, identity, worker_id)
    ledger.inbox.seen(worker_id)


def first_look(ledger: Ledger, identity: Identity, worker_id: str) -> Work | None:
    """A poll begins (:func:`open_poll`) and takes the next run in the worker's inbox, or None:
    the ownership check (cached) and one round trip."""
    _own(ledger, identity, worker_id)
    return _work(worker_id, ledger.inbox.seen_and_take(worker_id))


def take(ledger: Ledger, worker_id: str, wait_s: float = 0.0) -> Work | None:
    """The next run in the worker's inbox (waiting up to ``wait_s`` for one), or None."""
    return _work(worker_id, ledger.inbox.take(worker_id, wait_s))


def _work(worker_id: str, got: tuple[str, list[str]] | None) -> Work | None:
    if got is None:
        return None
    run_id, specs = got
    log.info("run %s (%d units) handed to worker %s", run_id, len(specs), worker_id)
    return Work(run_id, tuple(specs))


def poll_later(ledger: Ledger, settings: Settings) -> Work:
    """No run and no long-poll slot: when to ask again, spread so the short polls that arrive
    stay near ``POLLS_PER_S``."""
    polling = ledger.inbox.polling_count(time.time() - settings.outbound_liveness_s)
    again = min(MAX_POLL_AGAIN_S, max(1.0, polling / POLLS_PER_S))
    return Work(poll_again_s=again * random.uniform(0.5, 1.5))


def request_work(ledger: Ledger, settings: Settings, identity: Identity, worker_id: str, wait_s: float,
                 polls: LongPolls, still_wanted: Callable[[], bool] = lambda: True) -> Work:
    """The next run placed on ``worker_id``, waiting up to ``wait_s`` (capped at the coordinator's
    ``long_poll_s``) for one; when every long-poll slot is taken, no wait, and a time to ask again.

    The blocking form, for callers with a thread to spend (the asyncio gateway waits without
    one: coordinator.gateway.long_polls). The wait is taken in slices of ``POLL_SLICE_S``, and
    ends early once ``still_wanted()`` says no."""
    open_poll(ledger, identity, worker_id)
    wait = max(0.0, min(wait_s, settings.long_poll_s))
    held = wait > 0 and polls.acquire()
    try:
        end = time.monotonic() + wait
        got = take(ledger, worker_id, min(wait, POLL_SLICE_S) if held else 0.0)
        while got is None and held and end - time.monotonic() >= POLL_SLICE_S and still_wanted():
            got = take(ledger, worker_id, POLL_SLICE_S)
    finally:
        if held:
            polls.release()
    if got is not None:
        return got
    if held:
        return Work()  # waited the whole poll: ask again at once
    return poll_later(ledger, settings)


def report_run(ledger: Ledger, identity: Identity, worker_id: str, run_id: str, units: list[str],
               handed_back: list[str], lease_secrets: dict[str, str] | None = None) -> None:
    """Check a worker's report against its run's record and pass it on to the scheduler. Units it
    hands back go back in the queue now, without spending an attempt.

    Every unit named must be one of the run's, shown with its lease secret (``lease_secrets``:
    task id -> the secret its spec carried): a report speaks only for leases its worker holds.
    Raises NotFound for a run that is not the caller's (unknown, or another worker's: the same
    answer), InvalidRequest for a unit that is not the run's, lacks its secret, or is malformed.
    """
    _own(ledger, identity, worker_id)
    record = ledger.inbox.run(run_id)
    if record is None or record.worker_id != worker_id:
        raise NotFound(f"worker {worker_id} has no run {run_id!r} (it may be older than a week)")
    fences = dict(record.units)
    shown = {t: secret_hash(s) for t, s in (lease_secrets or {}).items()}

    def check(task_id: str, fence: int) -> None:
        if fences.get(task_id) != fence or (record.secrets and shown.get(task_id) != record.secrets.get(task_id)):
            raise InvalidRequest(f"task {task_id} under fence {fence} is not a unit of run {run_id} "
                                 "with the lease secret its spec carried")

    for raw in units:
        unit = parse_unit(raw)
        if unit is None:
            raise InvalidRequest("a unit of the report is not a valid unit result")
        check(unit.task_id, unit.fence)
    for task_id in handed_back:
        check(task_id, fences.get(task_id, -1))
    for task_id in handed_back:
        hand_back(ledger, task_id, fences[task_id], worker_id, f"worker {worker_id} handed it back unstarted",
                  Claim(worker_id, (lease_secrets or {}).get(task_id, "")))
    ledger.inbox.seen(worker_id)
    ledger.inbox.report(RunReport(run_id, worker_id, tuple(units), tuple(handed_back)))
