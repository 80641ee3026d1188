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
atomic rename, built by one process at a time (a lock per version: another that needs it waits
for that build); a build's pull has a fixed name, so one cut off is resumed by the next process
that builds the version. Old versions beyond ``keep`` (per lineage) are removed, and what builds
of versions older than the newest left unfinished is swept.

Memory: a patch is applied one tensor at a time (each weight upcast, patched, cast back and
written before the next is read, :mod:`nomoat.weights`), so catching up a 1B model never holds
more than one of its tensors in fp32, let alone two copies of the model. Checking a folder
against its stamp hashes every file (about 1 s per GB); :class:`HashMemo` remembers each file's
hash by (path, size, mtime, inode), so a folder is hashed once, not before every task. A file
changed in place gets a new mtime and is hashed again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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
        """The folder of version ``version`` of the coordinator's ``lineage``, built if needed.

        One process builds a version at a time (a lock file per version); another that needs it
        meanwhile waits and then uses that build. The build's download has a fixed name, so a
        pull that broke off (the worker was stopped, the link went down) is resumed by whichever
        process builds that version next, not started over."""
        target = self.usable(lineage, version)
        if target is None:
            target = self.folder(lineage, version)
            target.parent.mkdir(parents=True, exist_ok=True)
            with _lock(self._lock_file(lineage, version)):
                built = self.usable(lineage, version)  # another process built it while we waited
                if built is None:
                    staging = self._staging(lineage, version)
                    shutil.rmtree(staging, ignore_errors=True)  # a build that died half-patched
                    self._build(client, lineage, version, staging)
                    staging.rename(target)
                    self.hashes.moved(staging, target)
        self._prune(lineage, version)
        return target

    def _lock_file(self, lineage: str, version: int) -> Path:
        return self.folder(lineage, version).parent / f".{version}.lock"

    def _staging(self, lineage: str, version: int) -> Path:
        """Where version ``version`` is built; its pull's partial folder and a catch-up's download
        (and that one's partial folder) are named after it."""
        return self.folder(lineage, version).parent / f".build-{version}"

    def _leftovers(self, lineage: str, version: int) -> list[Path]:
        """What a build of ``version`` that never finished leaves: the staging folder, the
        download, and their pulls' partial folders (nomoat.partial)."""
        staging = self._staging(lineage, version)
        download = staging.with_name(staging.name + "-download")
        return [p for s in (staging, download) for p in (s, s.parent / f".{s.name}.partial")]

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
        self._sweep(lineage, newest)

    def _sweep(self, lineage: str, newest: int) -> None:
        """Remove what unfinished builds of versions before ``newest`` left behind (a pull given
        up, a worker killed mid-build): nothing will resume them now that a newer one is here.
        A version some process is still building (its lock is held) is left alone."""
        where = self.folder(lineage, newest).parent
        older = {int(m.group(1) or m.group(2)) for p in where.glob(".*") if (m := _LEFTOVER.fullmatch(p.name))}
        for version in sorted(v for v in older if v < newest):
            lock_file = self._lock_file(lineage, version)
            with _lock(lock_file, wait=False) as held:
                if not held:
                    continue
                for path in self._leftovers(lineage, version):
                    shutil.rmtree(path, ignore_errors=True)
                lock_file.unlink(missing_ok=True)


# The names ModelCache._lock_file and ModelCache._leftovers give (group 1 or 2: the version).
_LEFTOVER = re.compile(r"\.(\d+)\.lock|\.{1,2}build-(\d+)(?:-download)?(?:\.partial)?")


@contextmanager
def _lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock on ``path`` (created if missing) for the block; with ``wait`` False,
    yields False at once when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock
