"""Volunteer controls: when this machine trains, and how hard. ``nomoat worker start`` options:

``--hours 22-07``
    Train only inside this local-time window (``HH[:MM]-HH[:MM]``; it may wrap midnight).
``--idle-only``
    Train only while nobody else uses the GPU and the user is away. *Another process on the GPU*:
    NVML's list of compute and graphics processes (the ``nvidia-ml-py`` package), else
    ``nvidia-smi --query-compute-apps``, minus this worker's own processes. *The user*: systemd-
    logind's idle hint (``loginctl show-session``, no session named: the manager's, which is
    idle only when every session is: desktops set it on screen-idle, and logind derives it for
    text sessions from their terminals), else, without logind, the newest access to a terminal
    (``/dev/pts/*``, ``/dev/tty[0-9]*``: what ``w`` reports as IDLE). Away means idle for
    ``idle_after_s`` (5 minutes). If neither source answers, only the GPU is watched (logged once).
``--max-power WATTS``
    NVML's power limit when this process may set it (root; restored on exit), else duty-cycling:
    after each optimizer step the task sleeps long enough to keep the card's average power,
    as NVML or nvidia-smi reads it, under the target.
``--max-upload-mbps M``
    Adapter uploads are paced by a token bucket to M megabits per second.
``nomoat worker pause`` / ``resume``
    A file in the worker's state dir (``<cache dir>/control/paused``).

How a pause takes effect (any of: the pause file, outside the hours, not idle): the worker
finishes the unit it is training, hands back the units of its run it has not started (they go
back in the queue without spending an attempt: a handed-back unit did not fail) and takes no
more work until it may train again; to the coordinator it is a worker that went quiet, and
after three lease lifetimes it shows as gone. The agent decides; the processes that train (Ray
tasks in Ray mode) read its decision from ``<state dir>/held`` (:class:`ControlFiles`).

The pieces are small and pure where they can be (:class:`Hours`, :class:`TokenBucket` here; the
card's side in :mod:`worker.gpu`, :class:`~worker.gpu.DutyCycle` included; the user's in
:mod:`worker.idle`); :class:`Controls` puts them together behind
``allowed_now()``, ``wait_until_allowed()``, ``throttle_upload()`` and ``duty_cycle()``.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from worker.gpu import DutyCycle, Gpu, NoGpu, own_pids
from worker.idle import IDLE_AFTER_S, user_idle_seconds

log = logging.getLogger("nomoat.controls")


class ControlError(ValueError):
    """A control was given a value it cannot use; the message says what to write instead."""


# -- the hours window -------------------------------------------------------------------------

_HOURS = re.compile(r"^\s*(\d{1,2})(?::(\d{2}))?\s*-\s*(\d{1,2})(?::(\d{2}))?\s*$")


@dataclass(frozen=True)
class Hours:
    """A daily local-time window [start, end), in minutes after midnight; wraps when start > end."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> Hours:
        """``22-07``, ``9:30-17``, ``00:00-24:00``; anything else raises ControlError."""
        m = _HOURS.match(text or "")
        if not m:
            raise ControlError(f"--hours {text!r} is not a window of hours; write START-END in 24-hour local "
                               "time, e.g. 22-07 (10 pm to 7 am) or 9:30-17:00")
        h1, m1, h2, m2 = (int(g) if g else 0 for g in m.groups())
        for h, mins in ((h1, m1), (h2, m2)):
            if h > 24 or mins > 59 or (h == 24 and mins):
                raise ControlError(f"--hours {text!r}: {h}:{mins:02d} is not a time of day (00:00 to 24:00)")
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start % 1440 == end % 1440 and not (start == 0 and end == 1440):
            raise ControlError(f"--hours {text!r} starts and ends at the same time; to train at any hour "
                               "leave --hours out")
        return cls(start, end)

    def contains(self, moment: dt.time | dt.datetime) -> bool:
        minute = moment.hour * 60 + moment.minute
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end  # wraps midnight

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


# -- upload pacing ----------------------------------------------------------------------------


class TokenBucket:
    """At most ``rate`` bytes a second on average, bursts up to ``burst`` bytes.

    ``take(n)`` blocks until ``n`` bytes may go (a request larger than the burst is let through
    once the bucket is full, then owes the difference), and returns the seconds it waited.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ControlError("an upload limit must be above 0")
        self.rate, self.burst = float(rate), float(burst)
        self.clock, self.sleep = clock, sleep
        self.level = self.burst
        self.at = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now

    def take(self, n: int) -> float:
        waited = 0.0
        with self._lock:
            self._refill()
            need = min(float(n), self.burst)
            if self.level < need:
                wait = (need - self.level) / self.rate
                self.sleep(wait)
                waited += wait
                self._refill()
            self.level -= n  # may go below 0: a large request is paid for by the next ones
        return waited


def mbps_bucket(mbps: float) -> TokenBucket:
    """The bucket for ``--max-upload-mbps``: megabits to bytes, a quarter second of burst."""
    rate = mbps * 1e6 / 8
    return TokenBucket(rate, burst=max(rate / 4, 64 << 10))


# -- pause files ------------------------------------------------------------------------------


class ControlFiles:
    """The worker's state dir: ``paused`` (the volunteer's ``nomoat worker pause``) and ``held``
    (the agent's own decision, for the processes that train to read). Each holds its reason."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _write(self, name: str, text: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(self.root / name)

    def _read(self, name: str) -> str | None:
        try:
            return (self.root / name).read_text().strip() or name
        except FileNotFoundError:
            return None

    def pause(self, reason: str = "") -> None:
        self._write("paused", reason or f"paused by `nomoat worker pause` at {time.strftime('%H:%M')}")

    def resume(self) -> bool:
        """Remove the pause; False when there was none."""
        try:
            (self.root / "paused").unlink()
            return True
        except FileNotFoundError:
            return False

    def paused(self) -> str | None:
        return self._read("paused")

    def hold(self, reason: str) -> None:
        self._write("held", reason)

    def unhold(self) -> None:
        (self.root / "held").unlink(missing_ok=True)

    def held(self) -> str | None:
        return self._read("held")

    def stop_reason(self) -> str:
        """Why a process that trains must not start another unit now; "" when it may."""
        return self.paused() or self.held() or ""


# -- all together -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlSettings:
    """The volunteer's choices, from ``nomoat worker start``."""

    state_dir: Path
    hours: Hours | None = None
    idle_only: bool = False
    idle_after_s: float = IDLE_AFTER_S
    max_power_w: float = 0.0
    max_upload_mbps: float = 0.0

    def describe(self) -> str:
        """One line for the volunteer: what will hold the worker back ("" for nothing)."""
        parts = [f"trains {self.hours} local time" if self.hours else "",
                 "only while the GPU and the user are idle" if self.idle_only else "",
                 f"at most {self.max_power_w:g} W" if self.max_power_w else "",
                 f"uploads at most {self.max_upload_mbps:g} Mbit/s" if self.max_upload_mbps else ""]
        return "; ".join(p for p in parts if p)


@dataclass
class Controls:
    """Whether this worker may train now, and how hard; see the module docstring."""

    settings: ControlSettings
    gpu: Gpu = field(default_factory=NoGpu)
    now: Callable[[], dt.datetime] = dt.datetime.now
    user_idle: Callable[[], float | None] = user_idle_seconds
    mine: Callable[[], set[int]] = own_pids
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        self.files = ControlFiles(self.settings.state_dir)
        self._bucket = mbps_bucket(self.settings.max_upload_mbps) if self.settings.max_upload_mbps > 0 else None
        self._duty: DutyCycle | None = None
        self._unknown_user_noted = False

    def allowed_now(self) -> tuple[bool, str]:
        """(True, "") when the worker may take work, else (False, why) in words."""
        paused = self.files.paused()
        if paused:
            return False, paused
        hours = self.settings.hours
        if hours and not hours.contains(self.now()):
            return False, f"outside the hours {hours} (local time)"
        if self.settings.idle_only:
            others = self.gpu.processes() - self.mine()
            if others:
                return False, f"another process uses the GPU (pid {', '.join(map(str, sorted(others)))})"
            idle = self.user_idle()
            if idle is None and not self._unknown_user_noted:
                log.warning("--idle-only cannot tell whether the user is active here (no logind, no terminal); "
                            "it watches the GPU only")
                self._unknown_user_noted = True
            if idle is not None and idle < self.settings.idle_after_s:
                return False, f"the user is active (idle for less than {self.settings.idle_after_s:.0f} s)"
        return True, ""

    def wait_until_allowed(self, stop: threading.Event | None = None, every_s: float = 5.0) -> bool:
        """Block until the worker may train; False when ``stop`` was set first."""
        stop = stop or threading.Event()
        allowed, why = self.allowed_now()
        if allowed:
            return True
        log.info("waiting: %s", why)
        while not stop.wait(every_s):
            allowed, now_why = self.allowed_now()
            if allowed:
                return True
            if now_why != why:
                log.info("still waiting: %s", now_why)
                why = now_why
        return False

    def throttle_upload(self, nbytes: int) -> float:
        """Before sending ``nbytes``: waits as --max-upload-mbps requires; returns the seconds."""
        return self._bucket.take(nbytes) if self._bucket else 0.0

    def duty_cycle(self) -> float:
        """Between steps: rests as --max-power requires; returns the seconds rested."""
        if self.settings.max_power_w <= 0:
            return 0.0
        if self._duty is None:
            self._duty = DutyCycle(self.settings.max_power_w, self.gpu.power_w, sleep=self.sleep)
        return self._duty.step()

    def limit_power(self) -> str:
        """At start: the NVML power limit if it can be set, else duty-cycling. Returns a sentence
        saying which; raises ControlError when power can be neither limited nor read."""
        target = self.settings.max_power_w
        if target <= 0:
            return ""
        why = self.gpu.set_power_limit(target)
        if not why:
            return f"the card's power limit is set to {target:g} W (restored when the worker stops)"
        if self.gpu.power_w() is None:
            raise ControlError(f"--max-power {target:g} cannot be kept: {why}, and the card's power draw cannot be "
                               "read (NVML or nvidia-smi) to duty-cycle it; leave --max-power out")
        return f"duty-cycling to keep the card under {target:g} W on average ({why})"

    def close(self) -> None:
        self.gpu.restore()
