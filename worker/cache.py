"""The worker's cache of model versions, shared by every task (and every worker) on a machine.

A version is pulled once into ``<cache>/versions/<n>`` and then reused; the folder appears by
an atomic rename, so two tasks pulling the same version at once both end up with a whole one.
Old versions beyond ``keep`` are removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from nomoat.client import CoordinatorClient


def default_cache_dir() -> Path:
    return Path(os.environ.get("NOMOAT_CACHE_DIR") or Path.home() / ".cache" / "nomoat")


class ModelCache:
    def __init__(self, root: Path | None = None, keep: int = 3) -> None:
        self.root = Path(root or default_cache_dir()) / "versions"
        self.keep = keep

    def folder(self, version: int) -> Path:
        return self.root / str(version)

    def ensure(self, client: CoordinatorClient, version: int) -> Path:
        target = self.folder(version)
        if not (target / "config.json").exists():
            self.root.mkdir(parents=True, exist_ok=True)
            staging = self.root / f".pull-{version}-{os.getpid()}"
            client.pull(staging, version)
            try:
                staging.rename(target)
            except OSError:  # another task got there first; its copy is as good as ours
                shutil.rmtree(staging, ignore_errors=True)
        self._prune(version)
        return target

    def _prune(self, newest: int) -> None:
        versions = sorted(int(p.name) for p in self.root.iterdir() if p.name.isdigit())
        for v in versions[: max(0, len(versions) - self.keep)]:
            if v != newest:
                shutil.rmtree(self.folder(v), ignore_errors=True)
