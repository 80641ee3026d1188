"""The volunteer's card as the controls see it: who uses it, what it draws, and keeping its power
down (``--max-power``, ``--idle-only``'s GPU half; see :mod:`worker.controls`).

NVML (the ``nvidia-ml-py`` package) when its bindings and a driver are here, else ``nvidia-smi``
(read-only), else nothing. Setting a power limit needs NVML and root; without it
:class:`DutyCycle` rests between optimizer steps to keep the average draw under the target.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("nomoat.controls")

MAX_SLEEP_S = 30.0  # one duty-cycle pause at most (a lease must keep being renewed)


class Gpu(Protocol):
    """What the controls ask of the card (NVML, nvidia-smi, or nothing)."""

    def processes(self) -> set[int]: ...  # pids using it
    def power_w(self) -> float | None: ...  # now, or None when it cannot be read
    def set_power_limit(self, watts: float) -> str: ...  # "" when set, else why not
    def restore(self) -> None: ...


class NoGpu:
    def processes(self) -> set[int]:
        return set()

    def power_w(self) -> float | None:
        return None

    def set_power_limit(self, watts: float) -> str:
        return "this machine has no NVIDIA GPU that NVML or nvidia-smi can see"

    def restore(self) -> None:
        pass


class NvmlGpu:
    """The card through NVML. ``nvml`` is the ``pynvml`` module (nvidia-ml-py), or a stand-in."""

    def __init__(self, nvml: Any, index: int = 0) -> None:
        self.nvml = nvml
        nvml.nvmlInit()
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self._original_mw: int | None = None

    def processes(self) -> set[int]:
        found = set()
        for query in (self.nvml.nvmlDeviceGetComputeRunningProcesses, self.nvml.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                found.update(p.pid for p in query(self.handle))
            except self.nvml.NVMLError:
                pass
        return found

    def power_w(self) -> float | None:
        try:
            return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
        except self.nvml.NVMLError:
            return None

    def set_power_limit(self, watts: float) -> str:
        try:
            low, high = self.nvml.nvmlDeviceGetPowerManagementLimitConstraints(self.handle)
            if not low <= watts * 1000 <= high:
                return f"the card's power limit can be set between {low / 1000:.0f} and {high / 1000:.0f} W"
            original = self.nvml.nvmlDeviceGetPowerManagementLimit(self.handle)
            self.nvml.nvmlDeviceSetPowerManagementLimit(self.handle, int(watts * 1000))
        except self.nvml.NVMLError as exc:
            return f"NVML would not set the power limit ({exc}; setting it needs root)"
        self._original_mw = original
        return ""

    def restore(self) -> None:
        if self._original_mw is not None:
            try:
                self.nvml.nvmlDeviceSetPowerManagementLimit(self.handle, self._original_mw)
            except self.nvml.NVMLError as exc:
                log.warning("could not restore the card's power limit: %s", exc)
            self._original_mw = None


class SmiGpu:
    """The card through ``nvidia-smi`` (read-only: setting a limit is left to NVML)."""

    def __init__(self, run: Callable[..., subprocess.CompletedProcess] = subprocess.run, index: int = 0) -> None:
        self.run, self.index = run, index

    def _query(self, *args: str) -> list[str]:
        try:
            done = self.run(["nvidia-smi", f"--id={self.index}", *args, "--format=csv,noheader,nounits"],
                            capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []

    def processes(self) -> set[int]:
        return {int(line.split(",")[0]) for line in self._query("--query-compute-apps=pid")
                if line.split(",")[0].strip().isdigit()}

    def power_w(self) -> float | None:
        lines = self._query("--query-gpu=power.draw")
        try:
            return float(lines[0]) if lines else None
        except ValueError:
            return None

    def set_power_limit(self, watts: float) -> str:
        return "setting a power limit needs NVML (pip install nvidia-ml-py) and root"

    def restore(self) -> None:
        pass


def find_gpu() -> Gpu:
    """NVML when its bindings and driver are here, else nvidia-smi when it is on PATH, else none."""
    try:
        import pynvml

        return NvmlGpu(pynvml)
    except Exception as exc:  # noqa: BLE001  (no bindings, no driver, no card: try the next)
        log.debug("NVML is not usable here (%s)", exc)
    if shutil.which("nvidia-smi"):
        return SmiGpu()
    return NoGpu()


def own_pids(root: int | None = None, proc: Path = Path("/proc")) -> set[int]:
    """``root`` (this process) and every process below it: the worker's own GPU users."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir() if proc.exists() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    mine, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in mine:
            mine.add(pid)
            todo += children.get(pid, [])
    return mine


class DutyCycle:
    """Keeps the card's average power under ``target_w`` by resting between steps.

    Call :meth:`step` at each step boundary. It reads the power the card drew while working;
    above the target it rests for ``worked * (p - target) / (target - p_rest)``, which brings the
    average over work and rest to the target (``p_rest``, the power while resting, is measured
    at the end of each rest). Without a power reading it does nothing.
    """

    def __init__(self, target_w: float, power: Callable[[], float | None],
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.target, self.power, self.clock, self.sleep = float(target_w), power, clock, sleep
        self.rest_w = 0.0
        self.since = clock()
        self.warned = False

    def step(self) -> float:
        """Rest as long as needed after the work since the last call; returns the seconds rested."""
        now = self.clock()
        worked, self.since = now - self.since, now
        drawn = self.power()
        if drawn is None or drawn <= self.target or worked <= 0:
            return 0.0
        headroom = self.target - self.rest_w
        if headroom <= 0:
            if not self.warned:
                log.warning("the card draws %.0f W even at rest, above --max-power %.0f W; resting as long as "
                            "allowed between steps", self.rest_w, self.target)
                self.warned = True
            rest = MAX_SLEEP_S
        else:
            rest = min(MAX_SLEEP_S, worked * (drawn - self.target) / headroom)
        self.sleep(rest)
        resting = self.power()
        if resting is not None:
            self.rest_w = 0.5 * self.rest_w + 0.5 * resting if self.rest_w else resting
        self.since = self.clock()
        return rest
