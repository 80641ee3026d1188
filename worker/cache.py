"""The worker's cache of model versions, shared by every task (and every worker) on a machine.

A version number means something only within the coordinator's model lineage (see
:mod:`nomoat.lineage`): a volunteer may serve two coordinators, or one restarted on a new data
dir, whose versions 0 are different models. So a version lives in
``<cache>/models/<lineage>/<n>`` as a Hugging Face folder with a stamp naming (lineage, version)
and the sha256 of every file, and is checked against the stamp before every use; a folder that
fails the check is removed and built again.

To reach a newer version the cache asks the coordinator for the cheapest way from the newest
version of the same lineage it holds: the low-rank patches in between, or a snapshot plus the
patches after it. Patches are applied with the coordinator's own code (:func:`nomoat.lora.patched`):
each weight is upcast to fp32 once, every patch is added in order, and it is cast back to the
file's dtype once, so a bf16 worker holds what the coordinator publishes. A folder appears by an
atomic rename, so two tasks bringing up the same version at once both end up with a whole one.
Old versions beyond ``keep`` (per lineage) are removed.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from nomoat import adapter as adapter_format
from nomoat import lineage as lineages
from nomoat import lora
from nomoat.client import CoordinatorClient

log = logging.getLogger("nomoat.cache")

_WEIGHT = ".weight"


def default_cache_dir() -> Path:
    """Where versions are cached when nobody said (``--cache-dir``, or NOMOAT_CACHE_DIR, read by
    the CLI and by :class:`worker.settings.NodeSettings`)."""
    return Path.home() / ".cache" / "nomoat"


def apply_patches(folder: Path, patches: list[Path]) -> None:
    """Add each patch's B·A to the weights in ``folder``'s safetensors files, in fp32, in order."""
    loaded = [adapter_format.load(p) for p in patches]
    for weights_file in sorted(folder.glob("*.safetensors")):
        if weights_file.name.startswith("nomoat-"):
            continue
        state = load_file(weights_file)
        weights = {key[: -len(_WEIGHT)]: w for key, w in state.items() if key.endswith(_WEIGHT)}
        changed = lora.patched(weights, loaded)
        if changed:
            state.update({module + _WEIGHT: w for module, w in changed.items()})
            save_file(state, weights_file, metadata={"format": "pt"})


class ModelCache:
    def __init__(self, root: Path | None = None, keep: int = 3) -> None:
        self.root = Path(root or default_cache_dir()) / "models"
        self.keep = keep

    def folder(self, lineage: str, version: int) -> Path:
        return self.root / lineages.check_id(lineage) / str(version)

    def cached(self, lineage: str) -> list[int]:
        """The versions of ``lineage`` with a folder (not yet checked against their stamps)."""
        where = self.root / lineages.check_id(lineage)
        if not where.exists():
            return []
        return sorted(int(p.name) for p in where.iterdir() if p.name.isdigit() and (p / lineages.STAMP).exists())

    def usable(self, lineage: str, version: int) -> Path | None:
        """The folder of (``lineage``, ``version``) if it passes its stamp's check; a folder that
        fails it (altered or half-removed files, a foreign stamp) is removed."""
        target = self.folder(lineage, version)
        if not target.exists():
            return None
        problem = lineages.problem(target, lineage, version)
        if not problem:
            return target
        log.warning("not using the cached model: %s; building it again", problem)
        shutil.rmtree(target, ignore_errors=True)
        return None

    def ensure(self, client: CoordinatorClient, lineage: str, version: int) -> Path:
        """The folder of version ``version`` of the coordinator's ``lineage``, built if needed."""
        target = self.usable(lineage, version)
        if target is None:
            target = self.folder(lineage, version)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.parent / f".build-{version}-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            self._build(client, lineage, version, staging)
            try:
                staging.rename(target)
            except OSError:  # another task got there first; its copy is as good as ours
                shutil.rmtree(staging, ignore_errors=True)
        self._prune(lineage, version)
        return target

    def _build(self, client: CoordinatorClient, lineage: str, version: int, staging: Path) -> None:
        """Make the stamped folder of (``lineage``, ``version``) in ``staging``."""
        have = next((v for v in reversed(self.cached(lineage))
                     if v <= version and self.usable(lineage, v) is not None), None)
        if have is None:
            client.pull(staging, version, lineage=lineage)  # stamped by the pull, as checked
            return
        download = staging.with_name(staging.name + "-download")
        client.pull(download, version, fmt="patches", since=have, lineage=lineage)
        try:
            if (download / "snapshot").exists():
                shutil.copytree(download / "snapshot", staging)
            else:
                shutil.copytree(self.folder(lineage, have), staging,
                                ignore=shutil.ignore_patterns(lineages.STAMP))
            apply_patches(staging, sorted((download / "patches").glob("*.safetensors"))
                          if (download / "patches").exists() else [])
            lineages.stamp(staging, lineage, version)
        finally:
            shutil.rmtree(download, ignore_errors=True)

    def _prune(self, lineage: str, newest: int) -> None:
        versions = self.cached(lineage)
        for v in versions[: max(0, len(versions) - self.keep)]:
            if v != newest:
                shutil.rmtree(self.folder(lineage, v), ignore_errors=True)
