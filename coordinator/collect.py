"""Collect: an uploaded adapter is checked and, if it holds the task's current lease, accepted.

The checks here are the cheap, structural ones that need no model: the bytes match the
manifest's size and sha256, they are a nomoat safetensors adapter (never a pickle), the manifest
tells the truth about rank, alpha and base version, and keys and shapes match the job's LoRA
config. The expensive gates (norm against recent adapters, held-out loss) run at fold time.

``upload`` is the whole workflow the Upload call runs: refuse early what cannot be accepted
(too big, a stale lease, another token's lease) before any byte is kept, receive the rest of a
resumable upload, then ``receive`` checks and records it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from coordinator import folding, trust
from coordinator.auth import Identity
from coordinator.errors import Incomplete, WrongState
from coordinator.leases import holder
from coordinator.ledger import Accepted, Check, Ledger
from coordinator.store import BlobStore
from coordinator.uploads import PartialUploads, UploadRefused, UploadRetry
from nomoat import adapter as adapter_format

if TYPE_CHECKING:
    from coordinator.replication import Replication


@dataclass(frozen=True)
class Manifest:
    task_id: str
    fence: int
    base_version: int
    rank: int
    alpha: float
    tokens: int
    train_loss: float
    sha256: str
    size: int
    worker_id: str = ""
    lineage: str = ""  # the model lineage of base_version; empty from workers that predate it


def upload(
    ledger: Ledger,
    store: BlobStore,
    shapes: Mapping[str, tuple[int, int]],
    partials: PartialUploads,
    identity: Identity,
    manifest: Manifest,
    offset: int,
    blocks: Iterable[bytes],
    *,
    max_bytes: int,
    lineage: str = "",
    replication: Replication | None = None,
) -> Accepted:
    """The whole upload: refuse early what cannot be accepted, receive the bytes from
    ``offset`` on (resumable, see PartialUploads), then check and record the adapter.

    Every answer about the adapter is an Accepted (refusals included). Raises WrongState when
    the upload cannot go on now but may be resumed, Incomplete when the stream ended early
    (the bytes so far are kept; the message says where to resume). An adapter that fails a check
    counts against its volunteer's trust (the token it came with); with ``replication``, the
    adapter of a replicated task is held until its replicas settle.
    """
    if manifest.size > max_bytes:
        return Accepted("refused", f"the adapter is {manifest.size} bytes; the limit is {max_bytes}")
    if manifest.lineage and manifest.lineage != lineage:  # trained on another coordinator's model
        return Accepted("refused", f"the adapter was trained on model lineage {manifest.lineage}, "
                                   f"not this coordinator's {lineage}")
    result = precheck(ledger, manifest.task_id, manifest.fence, manifest.sha256)
    if result is not None:
        return result
    worker_id, token_hash = holder(ledger, identity, manifest.worker_id)
    m = replace(manifest, worker_id=worker_id)  # the worker credited, if any
    problem = ledger.leases.hold(m.task_id, m.fence, m.worker_id, token_hash)
    if problem:
        return Accepted("refused", problem)
    volunteer = trust.volunteer_of(token_hash, worker_id)
    try:
        data = partials.receive(m.task_id, m.fence, m.sha256, m.size, offset, blocks)
    except UploadRefused as exc:  # bytes that do not match their manifest
        return _counted(ledger, volunteer, Accepted("refused", str(exc), Check.CORRUPT))
    except UploadRetry as exc:
        raise WrongState(str(exc)) from None
    if data is None:
        held = partials.offset(m.task_id, m.fence, m.sha256)
        raise Incomplete(f"the upload stopped at byte {held} of {m.size}; resume from offset {held}")
    result = receive(ledger, store, shapes, m, data, volunteer=volunteer, replication=replication)
    partials.discard(m.task_id, m.fence, m.sha256)
    return _counted(ledger, volunteer, result)


def _counted(ledger: Ledger, volunteer: str, result: Accepted) -> Accepted:
    """A refusal for a failed check counts against the volunteer's trust (coordinator.trust)."""
    if result.check is not None:
        ledger.trust.record(volunteer, result.check.value, result.detail)
    return result


def precheck(ledger: Ledger, task_id: str, fence: int, sha256: str) -> Accepted | None:
    """Before any bytes are stored: None when (task, fence) holds the lease, else the answer.

    A retry of an upload that was already accepted is answered "duplicate" at once. The ledger
    decides again, atomically, when the upload is complete; this only keeps a stale or unknown
    lease from making the coordinator store its bytes.
    """
    return ledger.adapters.precheck(task_id, fence, sha256)


def receive(
    ledger: Ledger,
    store: BlobStore,
    shapes: Mapping[str, tuple[int, int]],
    manifest: Manifest,
    data: bytes,
    *,
    volunteer: str = "",
    replication: Replication | None = None,
) -> Accepted:
    """Check an upload and record it; never raises for bad input, refuses with a reason (and
    the check it failed, when it failed one)."""
    if len(data) != manifest.size:
        return Accepted("refused", f"the upload has {len(data)} bytes but the manifest says {manifest.size}",
                        Check.CORRUPT)
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256:
        return Accepted("refused", "the upload's sha256 does not match its manifest: it was corrupted on the way",
                        Check.CORRUPT)
    task = ledger.tasks.get(manifest.task_id)
    if task is None:
        return Accepted("refused", f"there is no task {manifest.task_id!r}")
    if not ledger.leases.problem(manifest.task_id, manifest.fence):
        if task.base_version != manifest.base_version:
            return Accepted(
                "refused",
                f"the manifest names base version {manifest.base_version} but the task's run was "
                f"given version {task.base_version}", Check.MALFORMED,
            )
        config = ledger.jobs.get(task.job).config
        try:
            adapter = adapter_format.from_bytes(data)
            if adapter.rank != manifest.rank or not math.isclose(adapter.alpha, manifest.alpha, rel_tol=1e-6):
                raise folding.AdapterRejected(
                    f"the manifest says rank {manifest.rank}, alpha {manifest.alpha} but the file holds "
                    f"rank {adapter.rank}, alpha {adapter.alpha}"
                )
            targets = set(config.target_modules)
            expected = {m: s for m, s in shapes.items() if m.rsplit(".", 1)[-1] in targets}
            folding.check_structure(adapter, expected, config.lora_rank, config.lora_alpha)
        except (adapter_format.AdapterFormatError, folding.AdapterRejected) as exc:
            return Accepted("refused", f"the adapter was refused: {exc}", Check.MALFORMED)
        store.put(data)
    # The ledger decides under its own atomicity whether this fence still holds the lease.
    return ledger.adapters.accept(
        manifest.task_id, manifest.fence, digest, worker_id=manifest.worker_id,
        base_version=manifest.base_version, rank=manifest.rank, alpha=manifest.alpha,
        # The fold weighs adapters by tokens trained; a worker may not claim more than its task holds.
        tokens=min(manifest.tokens, task.tokens or manifest.tokens),
        train_loss=manifest.train_loss, size=manifest.size, volunteer=volunteer,
        hold=replication.hold_for(task, volunteer) if replication is not None else None,
    )
