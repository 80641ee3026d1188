"""A folded adapter's factors, read back from the patch of the version that folded it.

A fold's plain delta (the version's ``delta``, or its ``patch`` when no outer step changed it) is
the exact concatenation of the adapters it folded, each one's B already times its weight and
scale (:func:`nomoat.lora.build_patch`), and its header says where each adapter's rows are
(:func:`nomoat.lora.member`). So an unmerge (``W − w·s·B·A``) needs the patch, which every version
keeps, not the adapter's own file: once its version's patch can say where it is, the sweeper
frees a folded adapter's blob (coordinator.model.retention), the one copy of those factors that
was kept twice, and, when its job is retired, its record: the versions still name it with its
weight (:func:`from_versions`). Versions made before patches said where their adapters are still read the
adapter's blob, which the sweeper then keeps.
"""

from __future__ import annotations

import json

from coordinator.ledger import Ledger
from coordinator.ledger.records import AdapterRecord, AdapterState, VersionRecord
from coordinator.model.store import Store
from nomoat import adapter as adapter_format
from nomoat import lora

_FOLDED = (AdapterState.FOLDED, AdapterState.UNMERGED)


def fold_delta(record: VersionRecord) -> str:
    """The blob of a fold's plain delta (what its adapters' rows are in); "" for a rollback or an
    unmerge, whose patch holds no adapter's contribution."""
    if record.operation:
        return ""
    return record.delta or record.patch


def piece(ledger: Ledger, store: Store, entry: AdapterRecord) -> adapter_format.Adapter | None:
    """The adapter's weighted contribution ``(A, w·s·B)`` as its version's patch holds it, or
    None where that patch does not say (made before patches did)."""
    if entry.state not in _FOLDED or entry.version is None:
        return None
    record = ledger.versions.get(entry.version)
    ids = [a.id for a in record.adapters] if record is not None else []
    if entry.adapter_id not in ids or not (sha := fold_delta(record)) or not store.has(sha):
        return None
    return lora.member(adapter_format.from_bytes(store.get(sha)), ids.index(entry.adapter_id))


def from_versions(ledger: Ledger, adapter_id: str) -> AdapterRecord | None:
    """What the versions say of an adapter whose own record the sweeper expired with its retired
    job: the fold that took it in (its version and weight) and, if a later version took it out,
    that it is unmerged. None when no version names it. A scan of the versions: an admin's
    unmerge of an old adapter, never a hot path."""
    folded_in = unmerged_in = None
    for record in ledger.versions.all():
        for a in record.adapters:
            if a.id != adapter_id:
                continue
            if record.operation == "unmerge":
                unmerged_in = record.version
            elif not record.operation:
                folded_in = (record, a.weight)
    if folded_in is None:
        return None
    record, weight = folded_in
    state = AdapterState.UNMERGED if unmerged_in is not None else AdapterState.FOLDED
    return AdapterRecord(adapter_id, task="", fence=0, sha256="", job=record.job_id, state=state,
                         version=record.version, weight=weight, unmerged_in=unmerged_in)


def unmerge_patch(ledger: Ledger, store: Store, entry: AdapterRecord) -> adapter_format.Adapter:
    """The exact patch that takes a folded adapter's contribution out again, ``−w·s·B·A``: from
    its version's patch, else (older versions) from the adapter's own blob. Both give the same
    bits (the negation of the same fp32 product of the same scale)."""
    own = piece(ledger, store, entry)
    if own is not None:
        return lora.build_patch([own], [-1.0])
    if not entry.sha256:
        raise ValueError(f"adapter {entry.adapter_id}'s factors are not in its version's patch and its file "
                         "is gone; roll back to the version before it instead")
    return lora.build_patch([adapter_format.from_bytes(store.get(entry.sha256))], [-float(entry.weight or 0.0)])


def says_members(store: Store, sha256: str) -> bool:
    """Whether the patch ``sha256`` names where its adapters are (read from its header alone:
    the first bytes of the blob, never the tensors)."""
    try:
        n = int.from_bytes(store.get_range(sha256, 0, 8), "little")
        if not 0 < n < 100 << 20:
            return False
        header = json.loads(store.get_range(sha256, 8, 8 + n))
    except (OSError, ValueError):
        return False
    members = header.get("__metadata__", {}).get(lora.MEMBERS)
    try:
        return isinstance(members, str) and all(r is not None for r, _ in json.loads(members))
    except (ValueError, TypeError):
        return False
