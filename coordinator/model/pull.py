"""Pull: which files a pull of (format, since, version) sends, and their bytes in blocks.

Three formats, as the proto names them: a Hugging Face folder of the version; a PEFT adapter
folder holding the exact update from ``since`` to the version; and, for worker caches, the
cheapest catch-up from ``since`` (a snapshot and/or patch files, see
``coordinator.model.history.plan_catch_up``). Files already in the blob store are sent from there by
sha256, read a block at a time (a shard of several GB is never in memory); made-up files (a PEFT
folder) are sent from memory.

A client whose earlier pull broke off names the bytes it holds of each file (path, sha256,
offset); :func:`starts` honours an offset only for a file of this plan with that same sha256, so
a resumed file is always the one the client began (see nomoat/transfer.py and nomoat/partial.py for the other end).

With an object store (a direct store) no byte goes through here: :func:`links` names each file's
presigned GET (made-up files are put into the store first, by content, so a repeat costs
nothing), the header carries them, and the client reads each file from the store, by Range from
where it holds it.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from coordinator.errors import InvalidRequest, LimitReached, NotFound
from coordinator.model import modelcard
from coordinator.model.history import History, plan_catch_up
from coordinator.ledger import Ledger
from coordinator.model.running import pulled
from coordinator.model.store import Store


# Bytes of a file per message. bench/pull.py on two shared cores: 1 MiB cost the least CPU per GB
# of 0.5, 1, 2 and 4 MiB (client and server together: 3.3-3.6 s/GB against 3.8 for 2 MiB and 4.6
# for 4 MiB: a block the writer hashes right after the receiver touched it still fits a core's
# L2), and the per-message cost is already small at 1 MiB. Well under gRPC's default 4 MiB
# limit, so any client can read them.
CHUNK = 1 << 20


class Format(enum.IntEnum):
    """PullRequest.Format of the proto (tests/test_pull.py keeps the two the same)."""

    HF = 0
    PEFT = 1
    PATCHES = 2


@dataclass(frozen=True)
class PullFile:
    path: str
    size: int
    sha256: str
    data: bytes | None = None  # a made-up file's bytes; None for a file in the store (by sha256)


@dataclass(frozen=True)
class PullPlan:
    version: int
    files: list[PullFile]
    lineage: str = ""  # the model lineage the version belongs to (see nomoat.lineage)


def plan(ledger: Ledger, history: History, store: Store, fmt: int, since: int, version: int,
         max_peft_bytes: int = 0) -> PullPlan:
    """What a pull sends; ``version`` < 0 means the newest.

    A PEFT folder is built in memory from the stored patches it chains: past ``max_peft_bytes``
    of them (0: no bound) it is refused, before any is read.
    Raises NotFound for a version that does not exist, InvalidRequest for an unknown format or
    a ``since`` the format cannot start from, LimitReached for a PEFT update past the bound.
    """
    number = ledger.versions.latest() if version < 0 else version
    if number is None or ledger.versions.get(number) is None:
        raise NotFound(f"there is no version {version}")
    if fmt == Format.PEFT and max_peft_bytes and 0 <= since < number:
        _bound_peft(ledger, store, since, number, max_peft_bytes)
    try:
        files = _files(ledger, history, fmt, since, number)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return PullPlan(number, [
        PullFile(p, len(data), hashlib.sha256(data).hexdigest(), data) if isinstance(data, bytes)
        else PullFile(p, store.size(data), data)
        for p, data in files
    ], history.lineage().id)


def _bytes(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n} bytes"


def _bound_peft(ledger: Ledger, store: Store, since: int, number: int, limit: int) -> None:
    """Refuse a PEFT update from ``since`` to ``number`` whose patches hold more than ``limit``
    bytes (their summed rank, as stored); reads sizes only, and stops at the bound."""
    total = 0
    for v in range(since + 1, number + 1):
        record = ledger.versions.get(v)
        total += store.size(record.patch) if record is not None and record.patch else 0
        if total > limit:
            raise LimitReached(
                f"the update from version {since} to {number} is more than {_bytes(limit)} of patches, "
                f"more than this coordinator builds into one PEFT adapter: pull the full version instead "
                f"(nomoat pull --out DIR), or a PEFT update from a version closer to {number}")


def _files(ledger: Ledger, history: History, fmt: int, since: int, number: int) -> list[tuple[str, bytes | str]]:
    """What to send: (path, bytes) for made-up files, (path, sha256) for files in the store."""
    if fmt not in Format._value2member_map_:
        raise ValueError(f"unknown pull format {fmt}; this coordinator knows "
                         f"{', '.join(Format.__members__)}")
    if fmt == Format.PEFT:
        return sorted(history.peft(since, number).items())
    if fmt == Format.PATCHES:
        if since > number:
            raise ValueError(f"version {since} is newer than version {number}")
        patches, snapshots = history.sizes(number)
        newest_snapshot = snapshots[max(snapshots)]  # what a whole folder costs today
        catch_up = plan_catch_up(since, number, patches, snapshots, full_bytes=newest_snapshot)
        files: list[tuple[str, bytes | str]] = []
        if catch_up.snapshot is not None:
            snapshot = pulled(history.hf_files(catch_up.snapshot))
            files += [(f"snapshot/{p}", sha) for p, sha in sorted(snapshot.items())]
        files += [(f"patches/{v:06d}.safetensors", ledger.versions.get(v).patch) for v in catch_up.patches]
        return files
    return sorted({**pulled(history.hf_files(number)), **_card(ledger, history, number)}.items())


def _card(ledger: Ledger, history: History, number: int) -> dict[str, str]:
    """The version's model card (README.md, nomoat.json): the blobs its record names, or for a
    version the folder did not make (version 0) one made from its record and put in the store (by
    content: the same card is stored once)."""
    record = ledger.versions.get(number)
    stored = modelcard.files_of(record)
    if stored:
        return stored
    made = modelcard.render(modelcard.Card(
        record.metrics.get("base_model", "the base model of this lineage"), history.lineage().id, number,
        record.parent, record.eval_loss, record.operation, loss_history=[[number, record.eval_loss]]))
    return {name: history.store.put(data) for name, data in made.items()}


def starts(planned: PullPlan, resume: Iterable[tuple[str, str, int]]) -> dict[str, int]:
    """Where each file's bytes start, given what the client holds, as (path, sha256, offset).

    An offset counts only for a file of the plan that still has that sha256, and within its
    size; every other file starts at 0 (the client, told so by the header, starts it over).
    """
    files = {f.path: f for f in planned.files}
    out = {}
    for path, sha256, offset in resume:
        f = files.get(path)
        if f is not None and f.sha256 == sha256 and 0 < offset <= f.size:
            out[path] = offset
    return out


def links(store: Store, planned: PullPlan, ttl_s: float) -> dict[str, str]:
    """path -> a presigned GET of the file, for a direct store ({} for a folder: the bytes then
    follow in the stream). Each URL names that one object and expires after ``ttl_s``."""
    if not store.direct:
        return {}
    return {f.path: store.presign_get(store.put(f.data) if f.data is not None else f.sha256, ttl_s)
            for f in planned.files}


def blocks(store: Store, planned: PullPlan, size: int = CHUNK,
           start: dict[str, int] | None = None, skip: Iterable[str] = ()) -> Iterator[tuple[str, int, bytes]]:
    """(path, offset, bytes) of every file in the plan but those in ``skip`` (fetched by URL),
    from its ``start`` offset on (0 if not named), in blocks of at most ``size`` bytes."""
    start, skip = start or {}, set(skip)
    for f in planned.files:
        if f.path in skip:
            continue
        offset = start.get(f.path, 0)
        if f.data is not None:
            for i in range(offset, len(f.data), size):
                yield f.path, i, f.data[i : i + size]
            continue
        for block in store.chunks(f.sha256, size, offset):
            yield f.path, offset, block
            offset += len(block)
