"""A pull under way: ``.<name>.partial`` beside the target, resumable by another try or process.

Files land there with a state file naming the lineage, version and every file's sha256 and size
as the pull's header announced them. A pull that breaks off leaves it behind; the next try asks
for each file from the byte it holds (:meth:`Partial.resume_points`), and :meth:`Partial.adopt`
keeps only what the coordinator resumes (a version that changed meanwhile starts its changed
files over). :meth:`Partial.commit` stamps the folder and renames it into place, so the target is
never half-written. The folder is held under a lock while a pull uses it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nomoat.framing import PullError
from nomoat.lineage import Stamp
from nomoat.v1 import nomoat_pb2 as pb

STATE = "nomoat-pull.json"  # in the partial folder: what the header of the pull under way said



@dataclass(frozen=True)
class State:
    lineage: str
    version: int
    fmt: int
    since: int
    files: dict[str, tuple[str, int]]  # path -> (sha256, size)

    def to_json(self) -> str:
        return json.dumps({"lineage": self.lineage, "version": self.version, "format": self.fmt,
                           "since": self.since, "files": {p: list(v) for p, v in self.files.items()}})

    @classmethod
    def read(cls, path: Path) -> State | None:
        try:
            d = json.loads(path.read_text())
            return cls(str(d["lineage"]), int(d["version"]), int(d["format"]), int(d["since"]),
                       {str(p): (str(v[0]), int(v[1])) for p, v in d["files"].items()})
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None


class Partial:
    """``.<name>.partial`` beside ``out``: a pull under way, held under a lock while in use."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.dir = self.out.parent / f".{self.out.name}.partial"
        self._fd: int | None = None

    def __enter__(self) -> Partial:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.dir, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise PullError(f"another pull into {self.out} is under way") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.dir.exists() and next(self._files(), None) is None:
            shutil.rmtree(self.dir, ignore_errors=True)  # nothing kept worth resuming from
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def state(self) -> State | None:
        return State.read(self.dir / STATE)

    def _files(self) -> Iterator[Path]:
        return (p for p in self.dir.rglob("*") if p.is_file() and p.name != STATE)

    def resume_points(self, fmt: int, since: int) -> list[pb.ResumeFrom]:
        """What the last try left, as the request asks for the rest; anything unusable is removed."""
        state = self.state()
        if state is None or (state.fmt, state.since) != (fmt, since):
            self.clear()
            return []
        points, root = [], self.dir.resolve()
        for path, (sha, size) in state.files.items():
            held = self.dir / path
            if root not in held.resolve().parents:
                continue  # not a name a header could have given (the header's are checked)
            n = held.stat().st_size if held.is_file() else 0
            if n > size:
                held.unlink()
            elif n:
                points.append(pb.ResumeFrom(path=path, sha256=sha, offset=n))
        return points

    def adopt(self, header: pb.PullHeader, fmt: int, since: int) -> str:
        """Keep only what the header resumes, and record it; a sentence when the version moved."""
        before = self.state()
        starts = {e.path: e.offset for e in header.files}
        for held in list(self._files()):
            if not starts.get(str(held.relative_to(self.dir))):
                held.unlink()
        for folder in sorted((p for p in self.dir.rglob("*") if p.is_dir()), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()  # a folder this version no longer has (a catch-up's snapshot/) must not appear
        state = State(header.lineage, header.version, fmt, since,
                      {e.path: (e.sha256, e.size) for e in header.files})
        tmp = self.dir / f"{STATE}.tmp"
        tmp.write_text(state.to_json())
        tmp.replace(self.dir / STATE)
        if before is None or (before.lineage, before.version) == (state.lineage, state.version):
            return ""
        kept = sum(1 for e in header.files if e.offset)
        return (f"the coordinator now serves version {header.version}"
                + (f" of lineage {header.lineage}" if before.lineage != header.lineage else "")
                + f", not the version {before.version} this pull began with: {kept} file(s) of it are kept, "
                  "the others start over")

    def commit(self, header: pb.PullHeader) -> None:
        """Stamp the folder and move it to ``out`` (replacing what was there)."""
        (self.dir / STATE).unlink(missing_ok=True)
        if header.lineage:
            Stamp(header.lineage, header.version, {e.path: e.sha256 for e in header.files}).write(self.dir)
        if self.out.exists():
            shutil.rmtree(self.out)
        self.dir.rename(self.out)

    def clear(self) -> None:
        for held in list(self._files()):
            held.unlink()
        (self.dir / STATE).unlink(missing_ok=True)
