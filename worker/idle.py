"""Whether the volunteer is at the machine (``--idle-only``'s user half; see :mod:`worker.controls`).

systemd-logind's idle hint (``loginctl show-session``, no session named: the manager's, idle only
when every session is), else the newest access to a terminal (``/dev/pts/*``, ``/dev/tty[0-9]*``:
what ``w`` reports as IDLE).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

IDLE_AFTER_S = 300.0  # the user counts as active this long after the last key press


def parse_logind(text: str, now: float) -> float | None:
    """Seconds the user has been idle, from ``loginctl show-session -p IdleHint -p IdleSinceHint``
    (the manager's properties); None when the output does not say."""
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    hint = props.get("IdleHint")
    if hint == "no":
        return 0.0
    if hint != "yes":
        return None
    since = props.get("IdleSinceHint", "0")
    since_s = int(since) / 1e6 if since.isdigit() else 0.0
    return max(0.0, now - since_s) if since_s > 0 else float("inf")


def terminal_idle_seconds(now: float, paths: Iterable[Path]) -> float | None:
    """Seconds since the newest read of any of these terminals (their atime); None if none."""
    ages = []
    for path in paths:
        try:
            ages.append(max(0.0, now - path.stat().st_atime))
        except OSError:
            continue
    return min(ages) if ages else None


def terminals(dev: Path = Path("/dev")) -> list[Path]:
    found = [p for p in (dev / "pts").glob("[0-9]*")] if (dev / "pts").exists() else []
    return found + [p for p in dev.glob("tty[0-9]*")]


def user_idle_seconds(now: float | None = None,
                      run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                      dev: Path = Path("/dev")) -> float | None:
    """How long the user has been away: logind's idle hint, else the terminals'; None if unknown."""
    now = time.time() if now is None else now
    try:
        done = run(["loginctl", "show-session", "-p", "IdleHint", "-p", "IdleSinceHint"],
                   capture_output=True, text=True, timeout=5)
        idle = parse_logind(done.stdout, now) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        idle = None
    if idle is not None:
        return idle
    return terminal_idle_seconds(now, terminals(dev))
