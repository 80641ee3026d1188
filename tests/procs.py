"""Start nomoat's own commands as real processes, the way a user runs them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NOMOAT = [sys.executable, "-m", "nomoat.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A nomoat command in the background, its output in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.args = args
        with open(log, "wb") as fh:
            self.p = subprocess.Popen([*NOMOAT, *args], stdout=fh, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})}, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while text not in self.output():
            if self.p.poll() is not None:
                raise AssertionError(f"{self.args[:2]} exited ({self.p.returncode}):\n{self.output()[-3000:]}")
            if time.monotonic() > end:
                raise AssertionError(f"{self.args[:2]} did not print {text!r} in {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.3)

    def interrupt(self, timeout: float = 90) -> int:
        """Ctrl-C, as a user would; returns the exit code."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        return self.p.returncode


def run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([*NOMOAT, *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


# -- faults: killing whole process trees, and reading the ledger of a running coordinator ------


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found through /proc), not ``pid`` itself."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and everything it started (its Ray node, raylet, task workers), at once."""
    victims = [pid, *descendants(pid)]
    for _ in range(2):  # a second sweep catches anything started while the first one ran
        for victim in victims:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        victims = [v for v in descendants(pid) if v not in victims]
    return victims


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def redis_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "redis" / "redis.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def kill_leftovers(data_dir: Path) -> None:
    """After a test: a redis-server that a killed coordinator left behind."""
    pid = redis_pid(data_dir)
    try:
        if pid and os.readlink(f"/proc/{pid}/cwd") == str((data_dir / "redis").resolve()):
            os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def ledger_of(data_dir: Path):
    """The Ledger of the coordinator running on ``data_dir`` (its embedded Redis)."""
    from coordinator.ledger import Ledger
    from coordinator.ledger.redis_server import EmbeddedRedis
    from coordinator.server import redis_client

    return Ledger(redis_client(EmbeddedRedis(data_dir / "redis").url))


def wait_until(predicate, timeout: float, what: str, every: float = 0.5):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def coordinator(data_dir: Path, address: str, log: Path, *extra: str) -> Proc:
    return Proc(["coordinator", "start", "--data-dir", str(data_dir), "--listen", address, *extra], log)


def worker(address: str, data_dir: Path, tmp: Path, name: str, card: str = "RTX 3060:12") -> Proc:
    """A Ray-mode volunteer (``--ray``): trusted, so it joins with the trusted-worker token."""
    token = (data_dir / "trusted-worker.token").read_text().strip()
    return Proc(["worker", "start", "--ray", "--coordinator", address, "--simulate-gpu", card, "--threads", "1",
                 "--name", name, "--cache-dir", str(tmp / f"cache-{name}")],
                tmp / f"{name}.log", env={"NOMOAT_TOKEN": token})


def outbound_worker(address: str, data_dir: Path, tmp: Path, name: str, card: str = "RTX 3060:12",
                    env: dict[str, str] | None = None) -> Proc:
    """A public volunteer: outbound-only (no --ray), with the plain worker token."""
    token = (data_dir / "worker.token").read_text().strip()
    return Proc(["worker", "start", "--coordinator", address, "--simulate-gpu", card, "--threads", "1",
                 "--name", name, "--cache-dir", str(tmp / f"cache-{name}")],
                tmp / f"{name}.log", env={"NOMOAT_TOKEN": token, **(env or {})})


def running_tasks(proc: Proc) -> set[str]:
    """Task ids whose Ray worker process runs under ``proc`` (Ray titles it ray::nomoat:<task>,<task>...)."""
    found = set()
    for pid in descendants(proc.p.pid):
        line = cmdline(pid)
        if line.startswith("ray::nomoat:"):
            found.update(line.split()[0][len("ray::nomoat:"):].split(","))
    return found
