"""The ledger's records to and from Redis hashes: the one place a ledger value is parsed.

Redis stores every field as a string; :mod:`coordinator.ledger.records` holds the typed records
the rest of the coordinator sees. Each ``*_from_hash`` builds one from a hash's fields and
``to_fields`` writes one back, so no caller ever calls ``int()`` or ``json.loads`` on a ledger
value.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from enum import Enum
from typing import Any

from coordinator.ledger.records import (
    AdapterRecord,
    AdapterState,
    FoldedAdapter,
    JobConfig,
    JobRecord,
    JobState,
    ReplicaGroup,
    TaskRecord,
    TaskState,
    TrustEvent,
    TrustRecord,
    VersionRecord,
    WorkerRecord,
)
from coordinator.schedule.noise import NoiseScale, Sample


def decode(mapping: dict[bytes | str, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in mapping.items()
    }


def to_fields(fields: dict[str, Any]) -> dict[str, str]:
    """A record's fields as Redis hash values: JSON for documents, hex for bytes; None is left out."""
    out = {}
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, Enum):
            out[key] = value.value
        elif isinstance(value, JobConfig):
            out[key] = json.dumps(value.to_dict())
        elif isinstance(value, (dict, list, tuple)):
            out[key] = json.dumps(value)
        elif isinstance(value, bytes):
            out[key] = value.hex()
        elif isinstance(value, bool):
            out[key] = "1" if value else "0"
        else:
            out[key] = str(value)
    return out


def _num(data: dict[str, str], key: str, kind: type, default: Any = 0) -> Any:
    value = data.get(key)
    return default if value in (None, "") else kind(float(value) if kind is int else value)


def _maybe(data: dict[str, str], key: str, kind: type) -> Any:
    return _num(data, key, kind, None)


NOISE_FIELDS = ("noise_g2", "noise_trace", "noise_samples")  # a job's NoiseScale, in its hash


def noise_from_hash(data: dict[str, str | None]) -> NoiseScale:
    return NoiseScale(_num(data, "noise_g2", float), _num(data, "noise_trace", float),
                      _num(data, "noise_samples", int))


def job_from_hash(job_id: str, data: dict[str, str]) -> JobRecord:
    return JobRecord(
        job_id=job_id, name=data.get("name", ""), config=JobConfig.from_dict(json.loads(data["config"])),
        dataset=data.get("dataset", ""), records=data.get("records", ""),
        n_records=_num(data, "n_records", int), n_validation=_num(data, "n_validation", int),
        tokens=_num(data, "tokens", int), total_tasks=_num(data, "total_tasks", int),
        state=JobState(data.get("state", "running")), created=_num(data, "created", float),
        finished=_num(data, "finished", float), adapters_folded=_num(data, "adapters_folded", int),
        adapters_rejected=_num(data, "adapters_rejected", int), error=data.get("error", ""),
        warning=data.get("warning", ""), base_loss=_maybe(data, "base_loss", float),
        base_version=_maybe(data, "base_version", int),
        noise=noise_from_hash(data),
    )


def task_from_hash(data: dict[str, str]) -> TaskRecord:
    return TaskRecord(
        task_id=data["task_id"], job=data.get("job", ""), index=_num(data, "index", int),
        start=_num(data, "start", int), end=_num(data, "end", int), tokens=_num(data, "tokens", int),
        state=TaskState(data.get("state", "pending")), fence=_num(data, "fence", int),
        attempts=_num(data, "attempts", int), deadline=_num(data, "deadline", float),
        leased_at=_num(data, "leased_at", float), base_version=_num(data, "base_version", int, -1),
        claimed=_num(data, "claimed", int),
        finished=_num(data, "finished", float), error=data.get("error", ""), adapter=data.get("adapter", ""),
        vram_floors={k: float(v) for k, v in json.loads(data.get("vram_floors") or "{}").items()},
        events=tuple((float(t), e) for t, e in json.loads(data.get("events") or "[]")),
        twin=data.get("twin", ""), twin_of=data.get("twin_of", ""),
        holder_worker=data.get("holder_worker", ""),
        batch_size=_num(data, "batch_size", int), learning_rate=_num(data, "learning_rate", float),
        replica_of=data.get("replica_of", ""), avoid=tuple(json.loads(data.get("avoid") or "[]")),
        pinned=data.get("pinned") == "1",
        fold_width=_num(data, "fold_width", int, 1),
    )


def new_task_fields(task: TaskRecord) -> dict[str, str]:
    """The hash of a task as a job creates it: its shard, pending, never leased."""
    return to_fields({"task_id": task.task_id, "job": task.job, "index": task.index, "start": task.start,
                      "end": task.end, "tokens": task.tokens, "state": TaskState.PENDING, "attempts": 0,
                      "fence": 0})


def new_job_fields(job: JobRecord, created: float) -> dict[str, str]:
    return to_fields({"name": job.name, "config": job.config, "dataset": job.dataset, "records": job.records,
                      "n_records": job.n_records, "n_validation": job.n_validation, "tokens": job.tokens,
                      "total_tasks": job.total_tasks, "state": JobState.RUNNING, "created": created,
                      "adapters_folded": 0, "adapters_rejected": 0})


def adapter_from_hash(adapter_id: str, data: dict[str, str]) -> AdapterRecord:
    return AdapterRecord(
        adapter_id=adapter_id, task=data.get("task", ""), fence=_num(data, "fence", int),
        sha256=data.get("sha256", ""), job=data.get("job", ""), worker=data.get("worker", ""),
        base_version=_num(data, "base_version", int), rank=_num(data, "rank", int),
        alpha=_num(data, "alpha", float), tokens=_num(data, "tokens", int),
        train_loss=_num(data, "train_loss", float, math.nan), size=_num(data, "size", int),
        state=AdapterState(data.get("state", "buffered")), accepted=_num(data, "accepted", float),
        reason=data.get("reason", ""), volunteer=data.get("volunteer", ""), version=_maybe(data, "version", int),
        weight=_maybe(data, "weight", float), unmerged_in=_maybe(data, "unmerged_in", int),
        gradients=Sample(_num(data, "grad_micro_sq", float), _num(data, "grad_batch_sq", float),
                         _num(data, "grad_micro_batch", float), _num(data, "grad_batch_size", float)),
    )


def version_from_hash(number: int, data: dict[str, str]) -> VersionRecord:
    return VersionRecord(
        version=number, parent=_num(data, "parent", int, -1), patch=data.get("patch", ""),
        files=json.loads(data["files"]) if data.get("files") else {},
        adapters=tuple(FoldedAdapter(a["id"], float(a["weight"]), int(a.get("tau", 0)))
                       for a in json.loads(data.get("adapters") or "[]")),
        eval_loss=_num(data, "eval_loss", float, math.nan),
        metrics=json.loads(data["metrics"]) if data.get("metrics") else {},
        job_id=data.get("job_id", ""), delta=data.get("delta", ""), created=_num(data, "created", float),
    )


def version_fields(record: VersionRecord) -> dict[str, str]:
    fields: dict[str, Any] = {
        "parent": record.parent, "adapters": [asdict(a) for a in record.adapters],
        "eval_loss": record.eval_loss, "job_id": record.job_id, "created": record.created,
    }
    for key in ("patch", "delta", "files", "metrics"):  # absent when empty, as they always were
        if getattr(record, key):
            fields[key] = getattr(record, key)
    return to_fields(fields)


def worker_from_hash(worker_id: str, data: dict[str, str], last_seen: float) -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id, name=data.get("name", ""), card=bytes.fromhex(data.get("card", "")),
        node_id=data.get("node_id", ""), token=data.get("token", ""), registered=_num(data, "registered", float),
        last_seen=last_seen, tasks_done=_num(data, "tasks_done", int),
        tokens_trained=_num(data, "tokens_trained", float), train_seconds=_num(data, "train_seconds", float),
        tokens_per_s=_num(data, "tokens_per_s", float),
        # recorded at registration; a record from before that is Ray's if it names a Ray node
        kind=data.get("kind") or ("ray" if data.get("node_id", "") and not data["node_id"].startswith("outbound:")
                                  else "outbound"),
    )


def trust_from_hash(volunteer: str, data: dict[str, str], versions: dict[str, float]) -> TrustRecord:
    counts = {k[2:]: int(float(v)) for k, v in data.items() if k.startswith("n:")}
    recent = tuple(TrustEvent(float(t), o, d) for t, o, d in json.loads(data.get("recent") or "[]"))
    return TrustRecord(volunteer, counts, recent, {int(v): int(n) for v, n in versions.items()},
                       held=_num(data, "held", int), probation=_num(data, "probation", int) > 0,
                       banned=_num(data, "banned", int) > 0)


def replica_group_from_hash(task_id: str, data: dict[str, str]) -> ReplicaGroup:
    return ReplicaGroup(
        task_id=task_id, job=data.get("job", ""), base_version=_num(data, "base_version", int),
        state=data.get("state", "open"), opened=_num(data, "opened", float),
        runs=tuple(json.loads(data.get("runs") or "[]")), results=dict(json.loads(data.get("results") or "{}")),
        settled=_num(data, "settled", float),
    )
