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
