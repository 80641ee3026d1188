"""The worker's cache of model versions, shared by every task (and every worker) on a machine.

A version lives in ``<cache>/versions/<n>`` as a Hugging Face folder. To reach a newer version
the cache asks the coordinator for the cheapest way from the newest version it holds: the low-rank
patches in between (each ``W += B·A``, applied in fp32), or a snapshot plus the patches after it.
A folder appears by an atomic rename, so two tasks bringing up the same version at once both end
up with a whole one. Old versions beyond ``keep`` are removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nomoat import adapter as adapter_format
from nomoat.client import CoordinatorClient


def default_cache_dir() -> Path:
    return Path(os.environ.get("NOMOAT_CACHE_DIR") or Path.home() / ".cache" / "nomoat")


def apply_patches(folder: Path, patches: list[Path]) -> None:
    """Add each patch's B·A to the weights in ``folder``'s safetensors files, in fp32, in order."""
    loaded = [adapter_format.load(p) for p in patches]
    for weights_file in sorted(folder.glob("*.safetensors")):
        if weights_file.name.startswith("nomoat-"):
            continue
        state = load_file(weights_file)
        touched = False
        for patch in loaded:
            for module, (a, b) in patch.factors.items():
                key = f"{module}.weight"
                if key in state:
                    w = state[key]
                    state[key] = torch.addmm(w.to(torch.float32), b, a).to(w.dtype)
                    touched = True
        if touched:
            save_file(state, weights_file, metadata={"format": "pt"})


class ModelCache:
    def __init__(self, root: Path | None = None, keep: int = 3) -> None:
        self.root = Path(root or default_cache_dir()) / "versions"
        self.keep = keep

    def folder(self, version: int) -> Path:
        return self.root / str(version)

    def cached(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(p.name) for p in self.root.iterdir()
                      if p.name.isdigit() and (p / "config.json").exists())

    def ensure(self, client: CoordinatorClient, version: int) -> Path:
        target = self.folder(version)
        if not (target / "config.json").exists():
            self.root.mkdir(parents=True, exist_ok=True)
            staging = self.root / f".build-{version}-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            self._build(client, version, staging)
            try:
                staging.rename(target)
            except OSError:  # another task got there first; its copy is as good as ours
                shutil.rmtree(staging, ignore_errors=True)
        self._prune(version)
        return target

    def _build(self, client: CoordinatorClient, version: int, staging: Path) -> None:
        have = max((v for v in self.cached() if v <= version), default=None)
        if have is None:
            client.pull(staging, version)
            return
        download = staging.with_name(staging.name + "-download")
        client.pull(download, version, fmt="patches", since=have)
        try:
            if (download / "snapshot").exists():
                shutil.copytree(download / "snapshot", staging)
            else:
                shutil.copytree(self.folder(have), staging)
            apply_patches(staging, sorted((download / "patches").glob("*.safetensors"))
                          if (download / "patches").exists() else [])
        finally:
            shutil.rmtree(download, ignore_errors=True)

    def _prune(self, newest: int) -> None:
        versions = self.cached()
        for v in versions[: max(0, len(versions) - self.keep)]:
            if v != newest:
                shutil.rmtree(self.folder(v), ignore_errors=True)
