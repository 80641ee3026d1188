"""Collect: an uploaded adapter is checked and, if it holds the task's current lease, accepted.

The checks here are the cheap, structural ones that need no model: the bytes match the
manifest's size and sha256, they are a nomoat safetensors adapter (never a pickle), the manifest
tells the truth about rank, alpha and base version, keys and shapes match the job's LoRA
config, and they are not, byte for byte, an adapter another task of the job already handed in (a
copy is refused by its sha256, before any byte: coordinator.ledger.adapters). The expensive gates
(norm against recent adapters, held-out loss) run at fold time.

``upload`` is the whole workflow the Upload call runs: refuse early what cannot be accepted
(too big, a stale lease, a lease the caller does not hold) before any byte is kept, receive the rest of a
resumable upload, then ``receive`` checks and records it.

With an object store the bytes never pass through here: ``upload_target`` gives the lease's
holder a presigned PUT for the one upload object of (task, fence, sha256), the worker PUTs the
adapter there, and its Upload carries the manifest alone (``in_store``); the coordinator reads
the object back and ``receive`` checks its size and sha256 against the manifest like any other
upload before anything of it is kept as a blob.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from coordinator.fold import folding

from coordinator.schedule import standing
from coordinator.gateway.auth import Identity
from coordinator.errors import Incomplete, WrongState
from coordinator.schedule.holder import claim_of
from coordinator.ledger import Accepted, Check, Claim, JobConfig, Ledger, Refusal, TaskRecord
from coordinator.ledger.adapters import REFUSED_COPY, REFUSED_LEASE  # noqa: F401  (REFUSED_COPY: named here with the others)
from coordinator.schedule.noise import Sample
from coordinator.model.store import Store, upload_key
from coordinator.collect.partial_uploads import PartialUploads, UploadRefused, UploadRetry
from nomoat import adapter as adapter_format
from nomoat.logs import fields

log = logging.getLogger("nomoat.collect")

# Why an upload was refused, as a short code (a Prometheus label: coordinator.observe.metrics) beside its
# sentence; REFUSED_LEASE (the ledger's: the upload does not hold the task's current lease) is the sixth.
REFUSED_SIZE = "too_big"  # over max_adapter_bytes
REFUSED_LINEAGE = "lineage"  # trained on another coordinator's model
REFUSED_TRANSFER = "transfer"  # the bytes do not match the manifest's size or sha256
REFUSED_BASE = "base_version"  # the manifest names another base version than the lease's run was given
REFUSED_FORMAT = "format"  # not a nomoat safetensors adapter of the job's shapes, rank and alpha
# (the ledger's REFUSED_COPY, "copy": another task's adapter of the same job, byte for byte, is the seventh)

if TYPE_CHECKING:
    from coordinator.schedule.replication import Replication


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
    gradients: Sample = Sample(0.0, 0.0, 0.0, 0.0)  # the worker's gradient noise measurement
    lease_secret: str = ""  # the secret of the lease it was trained under (its run's spec), never stored


def upload_target(ledger: Ledger, store: Store, identity: Identity, manifest: Manifest, *, max_bytes: int,
                  ttl_s: float) -> str:
    """A presigned PUT for this upload's own object, or "" when the bytes should come through
    Upload: the store is a folder, or the upload would be answered at once anyway (too big, a
    duplicate, a stale lease or another token's), which Upload then says without any byte."""
    if not store.direct or manifest.size > max_bytes:
        return ""
    # Only the lease's holder (its worker and secret) is given a URL: anyone else's answer is "".
    claim = claim_of(ledger, identity, manifest.worker_id, manifest.lease_secret)
    if precheck(ledger, manifest.task_id, manifest.fence, manifest.sha256, claim) is not None:
        return ""
    return store.presign_put(upload_key(manifest.task_id, manifest.fence, manifest.sha256), ttl_s)


def upload(
    ledger: Ledger,
    store: Store,
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
    in_store: bool = False,
) -> Accepted:
    """The whole upload (with ``in_store``, of the object PUT to ``upload_target``'s URL): refuse early what cannot be accepted, receive the bytes from
    ``offset`` on (resumable, see PartialUploads), then check and record the adapter; the
    answer is logged.

    Every answer about the adapter is an Accepted (refusals included), and is counted in the
    ledger (coordinator.ledger.counters: uploads by outcome, bytes, refusals with their reasons;
    an adapter held for its replicas counts as "held", neither buffered nor refused).
    Raises WrongState when the upload cannot go on now but may be resumed, Incomplete when the
    stream ended early (the bytes so far are kept; the message says where to resume). An adapter
    that fails a check counts against its volunteer's trust (the token it came with); with
    ``replication``, the adapter of a replicated task is held until its replicas settle.
    """
    result = _upload(ledger, store, shapes, partials, identity, manifest, offset, blocks, max_bytes=max_bytes,
                     lineage=lineage, replication=replication, in_store=in_store)
    refusal = None
    if result.status == "refused":
        task = ledger.tasks.get(manifest.task_id)
        refusal = Refusal(time.time(), "upload", result.kind or REFUSED_LEASE, result.detail, manifest.task_id,
                          manifest.worker_id, task.job if task else "")
    ledger.counters.upload("held" if result.held else result.status, manifest.size, refusal)
    log_answer(manifest, result)
    return result


def log_answer(m: Manifest, result: Accepted) -> None:
    """One line for an upload's answer: accepted (or a duplicate of one), or refused and why."""
    ids = {"task": m.task_id, "worker": m.worker_id or None, "fence": m.fence, "tokens": m.tokens, "bytes": m.size}
    if result.held:  # its task is replicated: it waits in the replica group (coordinator.schedule.replication)
        log.info("adapter %s of task %s (worker %s) held until its replicas agree: %d tokens, train loss %.4f",
                 result.detail, m.task_id, m.worker_id or "?", m.tokens, m.train_loss,
                 extra=fields("replica.held", adapter=result.detail, train_loss=m.train_loss, **ids))
    elif result.ok:
        log.info("adapter %s of task %s (worker %s) accepted: %d tokens, train loss %.4f", result.detail,
                 m.task_id, m.worker_id or "?", m.tokens, m.train_loss,
                 extra=fields("upload.accepted", adapter=result.detail, train_loss=m.train_loss,
                              duplicate=result.status == "duplicate", **ids))
    else:
        log.warning("upload of task %s (worker %s, fence %d) refused: %s", m.task_id, m.worker_id or "?", m.fence,
                    result.detail, extra=fields("upload.refused", reason=result.detail, **ids))


def _upload(ledger: Ledger, store: Store, shapes: Mapping[str, tuple[int, int]], partials: PartialUploads,
            identity: Identity, manifest: Manifest, offset: int, blocks: Iterable[bytes], *, max_bytes: int,
            lineage: str, replication: Replication | None, in_store: bool) -> Accepted:
    if manifest.size > max_bytes:
        return Accepted("refused", f"the adapter is {manifest.size} bytes; the limit is {max_bytes}", REFUSED_SIZE)
    if manifest.lineage and manifest.lineage != lineage:  # trained on another coordinator's model
        return Accepted("refused", f"the adapter was trained on model lineage {manifest.lineage}, "
                                   f"not this coordinator's {lineage}", REFUSED_LINEAGE)
    # Only the lease's holder (its worker and secret) gets past here; anyone else is told it
    # holds no such lease, before any byte is kept.
    claim = claim_of(ledger, identity, manifest.worker_id, manifest.lease_secret)
    result = precheck(ledger, manifest.task_id, manifest.fence, manifest.sha256, claim)
    worker_id = manifest.worker_id if claim is None or claim.worker_id == manifest.worker_id else ""
    token_hash = "" if identity.role == "admin" else identity.token_hash
    if result is not None:
        # A copy of another task's adapter, named by its sha256, is refused before any byte and
        # counts against the lease's holder as one received would (only the holder gets this far).
        return _counted(ledger, standing.volunteer_of(token_hash, worker_id), result) if result.check else result
    m = replace(manifest, worker_id=worker_id, lease_secret="")  # the worker credited, if any
    task = ledger.tasks.get(m.task_id)
    config = ledger.jobs.config(task.job) if task is not None else None
    if config is not None and m.size > (bound := adapter_bound(config, shapes)):
        return Accepted("refused", f"the adapter is {m.size} bytes; an adapter of this job's LoRA config "
                                   f"(rank {config.lora_rank}) is at most {bound}", REFUSED_SIZE)
    volunteer = standing.volunteer_of(token_hash, worker_id)
    if in_store:
        return _from_store(ledger, store, shapes, m, volunteer, max_bytes, replication)
    try:
        data = partials.receive(m.task_id, m.fence, m.sha256, m.size, offset, blocks)
    except UploadRefused as exc:  # bytes that do not match their manifest
        return _counted(ledger, volunteer, Accepted("refused", str(exc), REFUSED_TRANSFER, Check.CORRUPT))
    except UploadRetry as exc:
        raise WrongState(str(exc)) from None
    if data is None:
        held = partials.offset(m.task_id, m.fence, m.sha256)
        raise Incomplete(f"the upload stopped at byte {held} of {m.size}; resume from offset {held}")
    result = receive(ledger, store, shapes, m, data, volunteer=volunteer, replication=replication, task=task,
                     config=config)
    partials.discard(m.task_id, m.fence, m.sha256)
    return _counted(ledger, volunteer, result)


def _from_store(ledger: Ledger, store: Store, shapes: Mapping[str, tuple[int, int]], m: Manifest, volunteer: str,
                max_bytes: int, replication: Replication | None) -> Accepted:
    """An upload the worker PUT into the object store: read back, then checked like any other."""
    key = upload_key(m.task_id, m.fence, m.sha256)
    data = store.read_upload(key, limit=max_bytes) if store.direct else None
    if data is None:
        raise Incomplete("the adapter is not in the object store (or is larger than allowed); "
                         "PUT it to the URL UploadTarget gives, then send the manifest again")
    result = receive(ledger, store, shapes, m, data, volunteer=volunteer, replication=replication)
    store.delete_upload(key)
    return _counted(ledger, volunteer, result)


def _counted(ledger: Ledger, volunteer: str, result: Accepted) -> Accepted:
    """A refusal for a failed check counts against the volunteer's trust (coordinator.schedule.standing)."""
    if result.check is not None:
        ledger.trust.record(volunteer, result.check.value, result.detail)
    return result


def precheck(ledger: Ledger, task_id: str, fence: int, sha256: str, claim: Claim | None = None) -> Accepted | None:
    """Before any bytes are stored: None when (task, fence) holds the lease (and ``claim`` is
    its holder's), else the answer.

    A retry of an upload that was already accepted is answered "duplicate" at once. The ledger
    decides again, atomically, when the upload is complete; this only keeps a stale or unknown
    lease from making the coordinator store its bytes.
    """
    return ledger.adapters.precheck(task_id, fence, sha256, claim)


def receive(
    ledger: Ledger,
    store: Store,
    shapes: Mapping[str, tuple[int, int]],
    manifest: Manifest,
    data: bytes,
    *,
    volunteer: str = "",
    replication: Replication | None = None,
    task: TaskRecord | None = None,
    config: JobConfig | None = None,
) -> Accepted:
    """Check an upload and record it; never raises for bad input, refuses with a reason (and
    the check it failed, when it failed one). ``task`` and its job's ``config``: as the caller
    read them already (read here when not given)."""
    if len(data) != manifest.size:
        return Accepted("refused", f"the upload has {len(data)} bytes but the manifest says {manifest.size}",
                        REFUSED_TRANSFER, Check.CORRUPT)
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256:
        return Accepted("refused", "the upload's sha256 does not match its manifest: it was corrupted on the way",
                        REFUSED_TRANSFER, Check.CORRUPT)
    task = task or ledger.tasks.get(manifest.task_id)
    if task is None:
        return Accepted("refused", f"there is no task {manifest.task_id!r}", REFUSED_LEASE)
    if not ledger.leases.problem(manifest.task_id, manifest.fence):
        if task.base_version != manifest.base_version:
            return Accepted(
                "refused",
                f"the manifest names base version {manifest.base_version} but the task's run was "
                f"given version {task.base_version}", REFUSED_BASE, Check.MALFORMED,
            )
        config = config or ledger.jobs.get(task.job).config
        try:
            adapter = adapter_format.from_bytes(data)
            if adapter.rank != manifest.rank or not math.isclose(adapter.alpha, manifest.alpha, rel_tol=1e-6):
                raise folding.AdapterRejected(
                    f"the manifest says rank {manifest.rank}, alpha {manifest.alpha} but the file holds "
                    f"rank {adapter.rank}, alpha {adapter.alpha}"
                )
            targets = set(config.target_modules)
            expected = {m: s for m, s in shapes.items() if m.rsplit(".", 1)[-1] in targets}
            rank, alpha = expected_shape(config, adapter)
            folding.check_structure(adapter, expected, rank, alpha)
        except (adapter_format.AdapterFormatError, folding.AdapterRejected) as exc:
            return Accepted("refused", f"the adapter was refused: {exc}", REFUSED_FORMAT, Check.MALFORMED)
        store.put(data)
    # The ledger decides under its own atomicity whether this fence still holds the lease.
    accepted = ledger.adapters.accept(
        manifest.task_id, manifest.fence, digest, worker_id=manifest.worker_id,
        base_version=manifest.base_version, rank=manifest.rank, alpha=manifest.alpha,
        # The fold weighs adapters by tokens trained; a worker may not claim more than its task holds.
        tokens=min(manifest.tokens, task.tokens or manifest.tokens),
        train_loss=manifest.train_loss, size=manifest.size, volunteer=volunteer,
        hold=replication.hold_for(task, volunteer) if replication is not None else None,
        gradients=manifest.gradients,
    )
    if accepted.status == "accepted" and manifest.gradients.usable():
        ledger.jobs.add_noise(task.job, manifest.gradients)
    return accepted


# Bytes an adapter file holds beyond its factors: safetensors' JSON header (a name, dtype, shape
# and offsets per tensor) and the adapter's metadata.
BYTES_PER_TENSOR = 512
HEADER_BYTES = 64 << 10


def adapter_bound(config: JobConfig, shapes: Mapping[str, tuple[int, int]]) -> int:
    """The most bytes an adapter of a job with ``config`` can take: its factors in fp32 at the
    largest rank it may have (twice the job's for a warm start's difference), and the header. A
    partial upload is never allowed more (coordinator.collect.partial_uploads)."""
    targets = set(config.target_modules)
    modules = [(d_out, d_in) for m, (d_out, d_in) in shapes.items() if m.rsplit(".", 1)[-1] in targets]
    rank = 2 * config.lora_rank if config.warm_start else config.lora_rank
    return 4 * rank * sum(d_out + d_in for d_out, d_in in modules) + BYTES_PER_TENSOR * 2 * len(modules) + HEADER_BYTES


def expected_shape(config: JobConfig, adapter: adapter_format.Adapter) -> tuple[int, float]:
    """The rank and alpha an upload of a job with ``config`` must have: the job's, or for a
    warm-start job's contribution (metadata warm_start "1") twice each, the exact rank-2r
    difference ``[s·B₁ | −s·B₀]·[A₁; A₀]`` with the same scale."""
    if config.warm_start and adapter.meta.get(adapter_format.META_WARM) == "1":
        return 2 * config.lora_rank, 2.0 * config.lora_alpha
    return config.lora_rank, config.lora_alpha
