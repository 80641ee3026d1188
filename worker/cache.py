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

Memory: a patch is applied one tensor at a time (each weight upcast, patched, cast back and
written before the next is read, :mod:`nomoat.weights`), so catching up a 1B model never holds
more than one of its tensors in fp32, let alone two copies of the model. Checking a folder
against its stamp hashes every file (about 1 s per GB); :class:`HashMemo` remembers each file's
hash by (path, size, mtime, inode), so a folder is hashed once, not before every task. A file
changed in place gets a new mtime and is hashed again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from rich.console import Console

from nomoat import adapter as adapter_format
from nomoat import lineage as lineages
from nomoat import lora, weights
from nomoat.client import CoordinatorClient
from nomoat.progress import PullBar

log = logging.getLogger("nomoat.cache")

_WEIGHT = ".weight"


def default_cache_dir() -> Path:
    """Where versions are cached when nobody said (``--cache-dir``, or NOMOAT_CACHE_DIR, read by
    the CLI and by :class:`worker.settings.NodeSettings`)."""
    return Path.home() / ".cache" / "nomoat"


def apply_patches(folder: Path, patches: list[Path]) -> None:
    """Add each patch's B·A to the weights in ``folder``'s safetensors files, in fp32, in order.

    File by file and tensor by tensor: a patched file is rewritten beside itself and renamed
    over it; only one tensor (and its fp32 copy) is in memory at a time."""
    loaded = [adapter_format.load(p) for p in patches]
    touched = {m for p in loaded for m in p.factors}
    for name in weights.weight_files(folder):
        path = Path(folder) / name
        specs = weights.specs_of(path)
        if not any(s.name.endswith(_WEIGHT) and s.name[: -len(_WEIGHT)] in touched for s in specs):
            continue
        tmp = path.with_name(f".{path.name}.patching")
        with weights.Reader(path) as fh, weights.Writer(tmp, specs) as out:
            for spec in specs:
                tensor = fh.get_tensor(spec.name)
                module = spec.name[: -len(_WEIGHT)]
                if spec.name.endswith(_WEIGHT) and module in touched:
                    tensor = lora.patched({module: tensor}, loaded)[module]
                out.write(tensor)
                del tensor
        os.replace(tmp, path)


class HashMemo:
    """sha256 of files by (path, size, mtime, inode), kept in one small JSON file.

    Shared by every task (and process) on the machine: a lost write only costs a re-hash."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._known: dict[str, list] = {}
        self._dirty = False
        try:
            self._known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self._known = {}

    def __call__(self, file: Path) -> str:
        st = os.stat(file)
        key, identity = str(Path(file).resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
        with self._lock:
            found = self._known.get(key)
            if isinstance(found, list) and len(found) == 4 and found[:3] == identity:
                return str(found[3])
        sha = lineages.file_sha256(file)
        with self._lock:
            self._known[key] = [*identity, sha]
            self._dirty = True
        return sha

    def forget_under(self, folder: Path) -> None:
        prefix = str(Path(folder).resolve()) + os.sep
        with self._lock:
            gone = [k for k in self._known if k.startswith(prefix)]
            for k in gone:
                del self._known[k]
            self._dirty = self._dirty or bool(gone)

    def moved(self, old: Path, new: Path) -> None:
        """Files under ``old`` are now under ``new`` (a rename keeps size, mtime and inode)."""
        before, after = str(Path(old).resolve()) + os.sep, str(Path(new).resolve()) + os.sep
        with self._lock:
            for k in [k for k in self._known if k.startswith(before)]:
                self._known[after + k[len(before):]] = self._known.pop(k)
                self._dirty = True

    def save(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            data = json.dumps(self._known)
            self._dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".hashes-")
        with os.fdopen(fd, "w") as fh:
            fh.write(data)
        os.replace(tmp, self.path)


class ModelCache:
    def __init__(self, root: Path | None = None, keep: int = 3) -> None:
        self.root = Path(root or default_cache_dir()) / "models"
        self.keep = keep
        self.hashes = HashMemo(self.root / "hashes.json")

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
        problem = lineages.problem(target, lineage, version, self.hashes)
        self.hashes.save()
        if not problem:
            return target
        log.warning("not using the cached model: %s; building it again", problem)
        shutil.rmtree(target, ignore_errors=True)
        self.hashes.forget_under(target)
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
                self.hashes.moved(staging, target)
            except OSError:  # another task got there first; its copy is as good as ours
                shutil.rmtree(staging, ignore_errors=True)
        self._prune(lineage, version)
        return target

    @staticmethod
    def _bar() -> PullBar:
        """What a volunteer sees while the model arrives: a bar with bytes and rate on a terminal,
        one line per file and a summary in a log (the worker's stderr, or its Ray node's log)."""
        return PullBar(Console(stderr=True))

    def _build(self, client: CoordinatorClient, lineage: str, version: int, staging: Path) -> None:
        """Make the stamped folder of (``lineage``, ``version``) in ``staging``."""
        have = next((v for v in reversed(self.cached(lineage))
                     if v <= version and self.usable(lineage, v) is not None), None)
        if have is None:
            log.info("pulling version %d of the model", version)
            with self._bar() as bar:
                client.pull(staging, version, lineage=lineage, progress=bar)  # stamped by the pull, as checked
            return
        log.info("catching up from version %d to %d by patch", have, version)
        download = staging.with_name(staging.name + "-download")
        with self._bar() as bar:
            client.pull(download, version, fmt="patches", since=have, lineage=lineage, progress=bar)
        try:
            if (download / "snapshot").exists():
                shutil.copytree(download / "snapshot", staging)
            else:
                shutil.copytree(self.folder(lineage, have), staging,
                                ignore=shutil.ignore_patterns(lineages.STAMP))
            apply_patches(staging, sorted((download / "patches").glob("*.safetensors"))
                          if (download / "patches").exists() else [])
            lineages.stamp(staging, lineage, version, self.hashes)
        finally:
            shutil.rmtree(download, ignore_errors=True)

    def _prune(self, lineage: str, newest: int) -> None:
        versions = self.cached(lineage)
        for v in versions[: max(0, len(versions) - self.keep)]:
            if v != newest:
                shutil.rmtree(self.folder(lineage, v), ignore_errors=True)
                self.hashes.forget_under(self.folder(lineage, v))
        self.hashes.save()
