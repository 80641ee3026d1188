"""Identity of a model lineage: whose running model a version number belongs to.

Version 0 fixes a lineage (DESIGN.md, "Identity of a model lineage"): a random id, which tells
two coordinators of the same base model apart, plus the hashes of the base model's files, kept in
the coordinator's ledger. A version number alone means nothing outside that ledger, so everything
else names a version as (lineage, version): a worker's cache folder, its outbox entries, a pulled
folder. A folder carries a *stamp* (:data:`STAMP`, a small JSON file) with its lineage, version
and the sha256 of every other file in it, and is checked against it before use, so a volunteer
who serves two coordinators, or one restarted on a new data dir, never trains on the wrong
weights.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

STAMP = "nomoat-version.json"
_ID = re.compile(r"^[0-9a-f]{8,32}-[0-9a-f]{8,64}$")


class LineageError(ValueError):
    """A folder or an id does not belong to the lineage and version it should; says why."""


@dataclass(frozen=True)
class Lineage:
    id: str
    base_files: dict[str, str]  # version 0's Hugging Face folder: path -> sha256

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "base_files": self.base_files}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Lineage:
        data = json.loads(text)
        return cls(str(data["id"]), {str(k): str(v) for k, v in data["base_files"].items()})


def new_lineage(base_files: Mapping[str, str]) -> Lineage:
    """A fresh lineage for a base model: ``<random>-<digest of its file hashes>``."""
    digest = hashlib.sha256(json.dumps(sorted(base_files.items())).encode()).hexdigest()
    return Lineage(f"{secrets.token_hex(8)}-{digest[:16]}", dict(base_files))


def check_id(lineage: str) -> str:
    """``lineage`` when it is a well-formed id (it becomes a folder name), else LineageError."""
    if not _ID.match(lineage or ""):
        raise LineageError(f"the coordinator named its model lineage {lineage!r}, which is not a lineage id; "
                           "is it an older coordinator? Upgrade it to this version of nomoat")
    return lineage


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


HashFile = Callable[[Path], str]


def folder_files(folder: Path, hash_file: HashFile = file_sha256) -> dict[str, str]:
    """path -> sha256 of every file under ``folder`` but the stamp (``hash_file``: how one file
    is hashed; a cache passes a memoised one)."""
    return {
        str(p.relative_to(folder)): hash_file(p)
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and p.name != STAMP
    }


@dataclass(frozen=True)
class Stamp:
    lineage: str
    version: int
    files: dict[str, str]  # path -> sha256 of every file beside the stamp

    def write(self, folder: Path) -> None:
        data = {"lineage": self.lineage, "version": self.version, "files": self.files}
        (Path(folder) / STAMP).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")

    @classmethod
    def read(cls, folder: Path) -> Stamp | None:
        try:
            data = json.loads((Path(folder) / STAMP).read_text())
            return cls(str(data["lineage"]), int(data["version"]), {str(k): str(v) for k, v in data["files"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


def stamp(folder: Path, lineage: str, version: int, hash_file: HashFile = file_sha256) -> Stamp:
    """Hash every file of ``folder`` and write its stamp as (``lineage``, ``version``)."""
    made = Stamp(lineage, version, folder_files(folder, hash_file))
    made.write(folder)
    return made


def problem(folder: Path, lineage: str, version: int, hash_file: HashFile = file_sha256) -> str:
    """Why ``folder`` is not version ``version`` of ``lineage`` as stamped, or "" when it is.

    Every file is hashed again: a file altered, added or removed since the stamp was written
    makes the folder unusable, whatever its name says.
    """
    found = Stamp.read(folder)
    if found is None:
        return f"{folder} has no readable {STAMP}"
    if (found.lineage, found.version) != (lineage, version):
        return (f"{folder} holds version {found.version} of lineage {found.lineage}, "
                f"not version {version} of lineage {lineage}")
    now = folder_files(folder, hash_file)
    changed = sorted((set(now) ^ set(found.files)) | {p for p in now if found.files.get(p) != now[p]})
    if changed:
        return f"{folder}: {len(changed)} file(s) differ from its stamp ({', '.join(changed[:3])})"
    return ""
