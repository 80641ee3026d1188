"""The user's own nomoat folder (``$XDG_CONFIG_HOME/nomoat``, else ``~/.config/nomoat``): the
coordinators' CA certificates pinned by fingerprint (nomoat.pinning) and the volunteer
credentials a worker was minted (worker.credentials). Readable by the user alone."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_ENV = "NOMOAT_CONFIG_DIR"  # overrides the folder (tests, or several identities on one account)


def config_dir() -> Path:
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        root = Path(explicit)
    else:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        root = Path(base) / "nomoat"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole (a reader never sees half of it), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    tmp.replace(path)
