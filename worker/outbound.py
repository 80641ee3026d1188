"""``nomoat worker start`` for the public: an outbound-only worker, no Ray, no open port.

    register -> long-poll for a run -> train each unit (worker.task, as a Ray task does) -> report

The worker connects out to the coordinator's gRPC port and nothing else. A run arrives as data:
each unit's :class:`~nomoat.spec.TaskSpec` as JSON, checked field by field by
``TaskSpec.from_dict``; nothing that arrives is code, and nothing is unpickled. Each unit runs
through :func:`worker.task.run_units`, the entry point a Ray task runs, so the trainer, the
heartbeat that keeps the lease, the shard fetch, the model cache and the uploader are the same;
only the coordinator's address and the token are this worker's own, never the spec's.

The connection may drop for any length of time (a home router, a laptop lid): every call is
retried with exponential backoff and jitter, registering again on the way (the worker keeps its
id), and the lease rules decide what happens to a unit meanwhile: a lease that ran out was
re-issued, its heartbeat says so, and the unit stops. Ctrl-C or SIGTERM hands the run's units
that have not finished back to the coordinator (they go back in the queue, no attempt spent).

``should_take_work`` is the hook for the volunteer's own limits (idle only, hours, pause): while
it says no, the worker asks for nothing and keeps no lease.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from nomoat.card import Card, to_message
from nomoat.client import CoordinatorClient, NomoatError
from nomoat.spec import SpecError, TaskSpec, UnitResult, error_line
from worker import credentials, uploader
from worker.cache import default_cache_dir
from worker.controls import Controls, ControlSettings
from worker.credentials import Credentials, is_join_code
from worker.settings import NodeSettings
from worker.task import run_units

log = logging.getLogger("nomoat.outbound")

POLL_WAIT_S = 20.0  # a long-poll's wait; the coordinator may cap it
IDLE_CHECK_S = 5.0  # how often a worker that should not take work asks should_take_work again
ORPHAN_EVERY_S = 10.0


class Backoff:
    """Exponential backoff with jitter: 1, 2, 4 ... up to ``cap`` s, each drawn from its upper half,
    so a thousand workers cut off at once do not come back at once."""

    def __init__(self, base: float = 1.0, cap: float = 60.0) -> None:
        self.base, self.cap, self.failures = base, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2 ** self.failures)
        self.failures += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.failures = 0


def parse_specs(raw: list[str]) -> list[TaskSpec]:
    """The units of a run, each checked by TaskSpec.from_dict; a malformed one is left out (the
    coordinator counts a unit the report leaves out as failed)."""
    specs = []
    for text in raw:
        try:
            specs.append(TaskSpec.from_dict(json.loads(text)))
        except (SpecError, ValueError) as exc:
            log.warning("a unit of the run was malformed and is skipped: %s", exc)
    return specs


class OutboundWorker:
    def __init__(self, client: CoordinatorClient, card: Card, name: str = "", cache_dir: Path | None = None,
                 threads: int = 0, tls_ca: str | None = None,
                 should_take_work: Callable[[], bool] | None = None, poll_wait_s: float = POLL_WAIT_S,
                 controls: Controls | None = None, credentials: Credentials | None = None) -> None:
        self.client = client
        # A join code is swapped for this user's volunteer credential when registering (worker.credentials).
        self.join_code = client.token if is_join_code(client.token) else ""
        self.credentials = credentials or (Credentials(client.address, client.ca_fingerprint) if self.join_code
                                           else None)
        self.card = card
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        cache = Path(cache_dir or default_cache_dir())
        # What only this machine knows; test hooks (simulated speed, injected OOM) stay as the
        # environment sets them, read once here.
        # The volunteer's limits (worker.controls): a pause, --hours, --idle-only decide whether to
        # ask for work at all; --max-power and --max-upload-mbps travel to the training code in
        # the node's settings, as they do to a Ray node's tasks.
        self.controls = controls or Controls(ControlSettings(cache / "control"))
        limits = self.controls.settings
        self.node = replace(NodeSettings.from_env(), cache_dir=cache, token=client.token,
                            tls_ca=str(Path(tls_ca).resolve()) if tls_ca else "", torch_threads=threads,
                            ca_fingerprint=client.ca_fingerprint,
                            max_power_w=limits.max_power_w, max_upload_mbps=limits.max_upload_mbps)
        self.should_take_work = should_take_work or self._allowed
        self.poll_wait_s = poll_wait_s
        self.worker_id = ""
        self.lineage = ""
        self.outbox = uploader.Outbox(cache / "outbox")
        self._stop = threading.Event()
        self.runs_done = 0
        self._held = ""

    def _allowed(self) -> bool:
        allowed, why = self.controls.allowed_now()
        if not allowed and why != self._held:
            log.info("not taking work: %s", why)
        self._held = "" if allowed else why
        return allowed

    # -- joining ------------------------------------------------------------------------------

    def start(self) -> None:
        """Register (once; later registrations keep the id). Raises NomoatError when the
        coordinator cannot be reached or refuses the token."""
        self.client.wait_ready()
        self._register()

    def _register(self) -> None:
        reply = credentials.register(self.client, self.credentials, self.name, to_message(self.card),
                                     worker_id=self.worker_id, join_code=self.join_code)
        self.worker_id, self.lineage = reply.worker_id, reply.lineage
        self.node = replace(self.node, token=self.client.token)  # the units' calls carry the volunteer's credential

    # -- the loop -----------------------------------------------------------------------------

    def run(self, install_signals: bool = True) -> None:
        """Ask for work and do it until Ctrl-C / SIGTERM (or :meth:`stop`)."""
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: self._stop.set())
        threading.Thread(target=self._deliver_orphans, name="outbox", daemon=True).start()
        backoff = Backoff()
        while not self._stop.is_set():
            if not self.should_take_work():
                self._stop.wait(IDLE_CHECK_S)
                continue
            try:
                reply = self.client.request_work(self.worker_id, self.poll_wait_s, stop=self._stop)
            except NomoatError as exc:
                self._reconnect(backoff, exc)
                continue
            backoff.reset()
            if not reply.run_id:
                self._stop.wait(reply.poll_again_s)
                continue
            self._do_run(reply.run_id, list(reply.task_specs))

    def _reconnect(self, backoff: Backoff, exc: Exception) -> None:
        """Wait (backing off), then register again: the coordinator may be a new one, or may have
        forgotten this worker; either way the same id comes back with the same token."""
        delay = backoff.next()
        log.warning("the coordinator did not answer (%s); trying again in %.0f s", str(exc).splitlines()[0], delay)
        if self._stop.wait(delay):
            return
        try:
            self._register()
        except NomoatError as again:
            log.info("registering again failed: %s", again)

    def _do_run(self, run_id: str, raw: list[str]) -> None:
        """Train the run's units in order; one unit's failure is its own, and a unit that needs a
        bigger card ends the run (the rest would not fit either). Then report."""
        specs = parse_specs(raw)
        log.info("run %s: %d units", run_id, len(specs))
        units: list[UnitResult] = []
        handed_back: list[str] = []
        bigger: UnitResult | None = None
        for spec in specs:
            if self._stop.is_set():
                handed_back.append(spec.task_id)
            elif bigger is not None:
                units.append(UnitResult(spec.task_id, spec.fence, bigger.error, needs_vram_gb=bigger.needs_vram_gb))
            else:
                unit = self._train(spec)
                if unit is None:  # stopped mid-way: handed back with the rest
                    handed_back.append(spec.task_id)
                    continue
                units.append(unit)
                if unit.needs_vram_gb > 0:
                    bigger = unit
        self._report(run_id, units, handed_back, {s.task_id: s.lease_secret for s in specs})
        self.runs_done += 1

    def _train(self, spec: TaskSpec) -> UnitResult | None:
        """One unit, through the Ray task's own entry point, in a thread so that a stop request
        need not wait for it; None when the worker was stopped before it finished."""
        # This worker's own connection and token, never what the spec names.
        own = replace(spec, coordinator=self.client.address, token="")
        out: list[UnitResult] = []

        def body() -> None:
            try:
                out.extend(run_units([own], self.node))
            except Exception as exc:  # noqa: BLE001  (run_units reports per unit; this is a bug guard)
                out.append(UnitResult(spec.task_id, spec.fence, error_line(exc)))

        thread = threading.Thread(target=body, name=f"unit-{spec.task_id}", daemon=True)
        thread.start()
        while thread.is_alive():
            if self._stop.wait(0.5):
                return None
        return out[0] if out else UnitResult(spec.task_id, spec.fence, "the unit ended without a result")

    def _report(self, run_id: str, units: list[UnitResult], handed_back: list[str],
                secrets: dict[str, str]) -> None:
        """Tell the coordinator, retrying while it is away; while stopping, only a few tries
        (whatever is not reported, the lease rules settle)."""
        backoff = Backoff(cap=30.0)
        payload = [json.dumps(u.to_dict()) for u in units]
        for attempt in range(1000):
            try:
                self.client.report_run(self.worker_id, run_id, payload, handed_back, secrets)
                if handed_back:
                    log.warning("handed back %d unit(s) of run %s: %s", len(handed_back), run_id,
                                ", ".join(handed_back))
                return
            except NomoatError as exc:
                if self._stop.is_set() and attempt >= 2:
                    log.warning("could not report run %s (%s); its leases will run out", run_id, exc)
                    return
                delay = backoff.next()
                log.warning("reporting run %s failed (%s); trying again in %.0f s", run_id, exc, delay)
                if self._stop.wait(delay) and attempt >= 2:
                    return

    def _deliver_orphans(self) -> None:
        while not self._stop.wait(ORPHAN_EVERY_S):
            try:
                uploader.deliver_orphans(self.client, self.outbox, self.lineage)
            except Exception:  # noqa: BLE001  (the outbox must never take the worker down)
                log.exception("delivering the outbox failed")

    def stop(self) -> None:
        self._stop.set()
