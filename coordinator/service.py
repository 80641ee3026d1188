"""gRPC servicers: translate messages to domain calls and back, nothing else.

Refusals a client should act on (a bad dataset, a stale lease) are answered with a status code
and a sentence; an adapter upload that fails its checks is a normal reply with ``accepted =
false`` and the reason, so the worker can log it and move on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import grpc

from coordinator import collect, submit, uploads
from coordinator.auth import Identity, TokenRegistry, caller, token_id
from coordinator.history import plan_catch_up
from coordinator.ledger import Ledger, TooManyWorkers, count_states
from coordinator.settings import Settings
from coordinator.store import BlobStore
from nomoat.records import DatasetError
from nomoat.v1 import nomoat_pb2 as pb
from nomoat.v1 import nomoat_pb2_grpc as rpc

log = logging.getLogger("nomoat.service")
CHUNK = 1 << 20
MAX_EVENT_CHARS = 1000  # a heartbeat's event note, as kept in the ledger
MAX_JOB_EVENTS = 20  # the newest task notes a job's status shows


@dataclass
class Deps:
    settings: Settings
    ledger: Ledger
    store: BlobStore
    registry: TokenRegistry
    tokenizer: Any
    shapes: dict[str, tuple[int, int]]  # every nn.Linear of the base model
    ray_address: str
    ray_auth_token: str
    history: Any = None  # coordinator.history.History: snapshots, patches, rebuilds
    operations: Any = None  # coordinator.folder.Folder: rollback and unmerge (admin)
    uploads: Any = None  # coordinator.uploads.PartialUploads; made in data_dir/uploads when first needed


ACTIVE_TTLS = 3  # a worker heard from within this many lease lifetimes counts as active


def _active(last_seen: float, now: float, settings: Settings) -> bool:
    return now - last_seen < ACTIVE_TTLS * settings.lease_ttl_s


def _float(value: str | None, default: float = float("nan")) -> float:
    try:
        return float(value) if value not in (None, "") else default
    except ValueError:
        return default


def job_info(deps: Deps, job_id: str) -> pb.JobInfo | None:
    job = deps.ledger.job(job_id)
    if job is None:
        return None
    tasks = deps.ledger.tasks(job_id)
    counts = count_states(tasks)
    events = [(t, f"{task['task_id']}: {e}") for task in tasks for t, e in json.loads(task.get("events") or "[]")]
    return pb.JobInfo(
        job_id=job_id,
        name=job.get("name", ""),
        state=job.get("state", ""),
        tasks=pb.TaskCounts(**counts),
        total_tasks=int(job.get("total_tasks", 0)),
        adapters_folded=int(job.get("adapters_folded", 0)),
        adapters_rejected=int(job.get("adapters_rejected", 0)),
        error=job.get("error", ""),
        created=_float(job.get("created"), 0.0),
        tokens=int(job.get("tokens", 0)),
        dataset_sha256=job.get("dataset", ""),
        base_loss=_float(job.get("base_loss")),
        warning=job.get("warning", ""),
        events=[e for _, e in sorted(events)[-MAX_JOB_EVENTS:]],
    )


class DatasetsServicer(rpc.DatasetsServicer):
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def Submit(self, request_iterator, context):
        limit = self.deps.settings.max_dataset_bytes
        header, parts, received, digest, claimed = None, [], 0, hashlib.sha256(), None
        for chunk in request_iterator:
            kind = chunk.WhichOneof("part")
            if header is None and kind != "header":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be the header")
            if kind == "header":
                if header is not None:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the header was sent twice")
                header = chunk.header
                if header.size > limit:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"the dataset is {header.size} bytes; this coordinator accepts at most {limit}")
            elif kind == "data":
                received += len(chunk.data)
                if received > min(limit, header.size):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  "more data arrived than the header announced")
                digest.update(chunk.data)
                parts.append(chunk.data)
            elif kind == "sha256":
                claimed = chunk.sha256
        if header is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no dataset was sent")
        if received != header.size or claimed != digest.hexdigest():
            context.abort(grpc.StatusCode.DATA_LOSS,
                          "the dataset arrived incomplete or damaged (size or sha256 mismatch); nothing was stored")
        requested = {
            "lora_rank": header.config.lora_rank,
            "lora_alpha": header.config.lora_alpha,
            "target_modules": list(header.config.target_modules),
            "seq_len": header.config.seq_len,
            "learning_rate": header.config.learning_rate,
            "batch_size": header.config.batch_size,
            "epochs": header.config.epochs,
            "tokens_per_task": header.config.tokens_per_task,
        }
        try:
            result = submit.submit(self.deps.settings, self.deps.ledger, self.deps.store, self.deps.tokenizer,
                                   list(self.deps.shapes), b"".join(parts), header.filename, header.name, requested)
        except DatasetError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{header.filename}: {exc}")
        log.info("job %s: %d records, %d tasks", result.job_id, result.records, result.tasks)
        return pb.SubmitReply(job_id=result.job_id, tasks=result.tasks, records=result.records,
                              tokens=result.tokens, validation_records=result.validation_records)


class JobsServicer(rpc.JobsServicer):
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def Status(self, request, context):
        ledger = self.deps.ledger
        ids = [request.job_id] if request.job_id else ledger.job_ids()
        jobs = [j for j in (job_info(self.deps, i) for i in ids) if j is not None]
        if request.job_id and not jobs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"there is no job {request.job_id!r}")
        now = time.time()
        workers = []
        for w in ledger.workers():
            card = pb.Card()
            if w.get("card"):
                card.ParseFromString(bytes.fromhex(w["card"]))
            seen = _float(w.get("last_seen"), 0.0)
            workers.append(pb.WorkerInfo(
                worker_id=w["worker_id"], name=w.get("name", ""), card=card, last_seen=seen,
                tasks_done=int(w.get("tasks_done", 0)),
                state="active" if _active(seen, now, self.deps.settings) else "gone"))
        versions = [
            pb.VersionInfo(version=v["version"], parent=v["parent"], eval_loss=v["eval_loss"],
                           adapters=len(v.get("adapters", [])), created=_float(v.get("created"), 0.0),
                           job_id=v.get("job_id", ""), adapter_ids=[a["id"] for a in v.get("adapters", [])],
                           operation=v.get("metrics", {}).get("operation", ""))
            for v in ledger.versions()
        ]
        return pb.StatusReply(jobs=jobs, workers=workers, versions=versions)

    def Watch(self, request, context):
        last = None
        while context.is_active():
            info = job_info(self.deps, request.job_id)
            if info is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"there is no job {request.job_id!r}")
            latest = self.deps.ledger.latest_version() or 0
            record = self.deps.ledger.version(latest) or {}
            progress = pb.JobProgress(job=info, current_version=latest, eval_loss=record.get("eval_loss", 0.0),
                                      finished=info.state != "running")
            if progress != last:
                yield progress
                last = progress
            if progress.finished:
                return
            time.sleep(0.5)


def _identity(context: grpc.ServicerContext, deps: Deps) -> Identity:
    identity = caller(context, deps.registry)
    if identity is None:  # revoked since the interceptor let the call in
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "the token is not valid (unknown or revoked)")
    return identity


def _holder(deps: Deps, identity: Identity, worker_id: str) -> tuple[str, str]:
    """(worker id, token hash) for the lease checks: a worker token acts only for its own tasks.

    Admin is exempt (an empty hash checks nothing). A worker id registered with another token is
    dropped, so no token is seen or credited as another's worker. (Dropped, not refused: in Ray
    mode a task calls with the coordinator's worker token while its worker may have joined with
    a token of its own; its work still counts, only not towards that worker.)
    """
    if identity.role == "admin":
        return worker_id, ""
    if worker_id:
        registered = deps.ledger.worker(worker_id)
        if registered is not None and registered.get("token") != identity.token_hash:
            log.warning("a call named worker %s, which was registered with another token; ignoring the name",
                        worker_id)
            return "", identity.token_hash
    return worker_id, identity.token_hash


class WorkersServicer(rpc.WorkersServicer):
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def Register(self, request, context):
        if not request.name or len(request.name) > 200:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a worker needs a name of at most 200 characters")
        if len(request.node_id) > 200 or len(request.card.name) > 200:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the node id and card name are limited to 200 characters")
        if len(request.worker_id) > 64:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a worker id is at most 64 characters")
        identity = caller(context, self.deps.registry)
        settings = self.deps.settings
        try:
            worker_id, rejoining = self.deps.ledger.admit_worker(request.worker_id, {
                "name": request.name, "card": request.card.SerializeToString().hex(),
                "node_id": request.node_id, "token": identity.token_hash if identity else "",
            }, active_since=time.time() - ACTIVE_TTLS * settings.lease_ttl_s, most=settings.max_workers_per_token)
        except TooManyWorkers as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"this token already has {exc.active} active workers, the most one token may have "
                          f"(--max-workers-per-token {settings.max_workers_per_token}); stop one, or ask the "
                          "operator for another token")
        log.info("worker %s %s: %s with %s (%.0f GB)", worker_id, "rejoined" if rejoining else "registered",
                 request.name, request.card.name, request.card.vram_gb)
        return pb.RegisterReply(worker_id=worker_id, ray_address=self.deps.ray_address,
                                ray_auth_token=self.deps.ray_auth_token)

    def Heartbeat(self, request, context):
        deadline = time.time() + self.deps.settings.lease_ttl_s
        ledger = self.deps.ledger
        worker_id, token_hash = _holder(self.deps, _identity(context, self.deps), request.worker_id)
        reason = ledger.heartbeat(request.task_id, request.fence, deadline, worker_id, token_hash)
        if reason:
            return pb.HeartbeatReply(ok=False, deadline=0.0, reason=reason)
        ledger.touch_worker(worker_id)
        if request.event:
            ledger.add_task_event(request.task_id, request.event[:MAX_EVENT_CHARS])
        base = ledger.claim(request.task_id, request.fence, ledger.latest_version() or 0)
        return pb.HeartbeatReply(ok=True, deadline=deadline, base_version=max(base, 0))

    def FetchShard(self, request, context):
        problem = self.deps.ledger.lease_problem(request.task_id, request.fence)
        if problem:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        _, token_hash = _holder(self.deps, _identity(context, self.deps), "")
        problem = self.deps.ledger.hold(request.task_id, request.fence, "", token_hash)
        if problem:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)
        task = self.deps.ledger.task(request.task_id)
        job = self.deps.ledger.job(task["job"])
        lines = self.deps.store.get(job["records"]).splitlines(keepends=True)
        data = b"".join(lines[int(task["start"]) : int(task["end"])])
        for i in range(0, len(data), CHUNK):
            yield pb.DataChunk(data=data[i : i + CHUNK])

    def _partials(self) -> uploads.PartialUploads:
        if self.deps.uploads is None:
            self.deps.uploads = uploads.PartialUploads(self.deps.settings.data_dir / "uploads")
        return self.deps.uploads

    def UploadOffset(self, request, context):
        return pb.UploadOffsetReply(offset=self._partials().offset(request.task_id, request.fence, request.sha256))

    def Upload(self, request_iterator, context):
        limit = self.deps.settings.max_adapter_bytes
        first = next(request_iterator, None)
        if first is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no manifest was sent")
        if first.WhichOneof("part") != "manifest":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be the manifest")
        manifest = first.manifest
        if manifest.size > limit:
            return pb.UploadReply(accepted=False, reason=f"the adapter is {manifest.size} bytes; the limit is {limit}")
        m = collect.Manifest(
            task_id=manifest.task_id, fence=manifest.fence, base_version=manifest.base_version,
            rank=manifest.rank, alpha=manifest.alpha, tokens=manifest.tokens, train_loss=manifest.train_loss,
            sha256=manifest.sha256, size=manifest.size, worker_id=manifest.worker_id,
        )

        def blocks():
            for chunk in request_iterator:
                if chunk.WhichOneof("part") == "manifest":
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the manifest was sent twice")
                yield chunk.data

        result = collect.precheck(self.deps.ledger, m.task_id, m.fence, m.sha256)
        if result is None:
            worker_id, token_hash = _holder(self.deps, _identity(context, self.deps), m.worker_id)
            m = replace(m, worker_id=worker_id)  # the worker credited, if any
            problem = self.deps.ledger.hold(m.task_id, m.fence, m.worker_id, token_hash)
            if problem:
                result = collect.Accepted("refused", problem)
        if result is None:
            partials = self._partials()
            try:
                data = partials.receive(m.task_id, m.fence, m.sha256, m.size, manifest.offset, blocks())
            except uploads.UploadRefused as exc:
                result = collect.Accepted("refused", str(exc))
            except uploads.UploadRetry as exc:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            except grpc.RpcError:  # the client went away mid-stream: what arrived is kept
                context.abort(grpc.StatusCode.CANCELLED, "the upload broke off; send the rest from UploadOffset")
            else:
                if data is None:
                    held = partials.offset(m.task_id, m.fence, m.sha256)
                    context.abort(grpc.StatusCode.DATA_LOSS,
                                  f"the upload stopped at byte {held} of {m.size}; resume from offset {held}")
                result = collect.receive(self.deps.ledger, self.deps.store, self.deps.shapes, m, data)
                partials.discard(m.task_id, m.fence, m.sha256)
        if result.ok:
            return pb.UploadReply(accepted=True, adapter_id=result.detail)
        log.warning("upload for %s refused: %s", manifest.task_id, result.detail)
        return pb.UploadReply(accepted=False, reason=result.detail)


class ModelsServicer(rpc.ModelsServicer):
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def Pull(self, request, context):
        ledger = self.deps.ledger
        number = ledger.latest_version() if request.version < 0 else request.version
        if number is None or ledger.version(number) is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"there is no version {request.version}")
        try:
            files = self._files(request, number)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        yield pb.PullChunk(header=pb.PullHeader(version=number, files=[
            pb.FileEntry(path=p, size=len(data) if isinstance(data, bytes) else self.deps.store.size(data),
                         sha256=hashlib.sha256(data).hexdigest() if isinstance(data, bytes) else data)
            for p, data in files
        ]))
        for path, data in files:
            blocks = ([data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] if isinstance(data, bytes)
                      else self.deps.store.chunks(data, CHUNK))
            offset = 0
            for block in blocks:
                yield pb.PullChunk(file=pb.FileChunk(path=path, offset=offset, data=block))
                offset += len(block)

    def _files(self, request, number: int) -> list[tuple[str, bytes | str]]:
        """What to send: (path, bytes) for made-up files, (path, sha256) for files in the store."""
        history = self.deps.history
        if request.format not in pb.PullRequest.Format.values():
            raise ValueError(f"unknown pull format {request.format}; this coordinator knows "
                             f"{', '.join(pb.PullRequest.Format.keys())}")
        if request.format == pb.PullRequest.PEFT:
            return sorted(history.peft(request.since, number).items())
        if request.format == pb.PullRequest.PATCHES:
            if request.since > number:
                raise ValueError(f"version {request.since} is newer than version {number}")
            patches, snapshots = history.sizes(number)
            newest_snapshot = snapshots[max(snapshots)]  # what a whole folder costs today
            plan = plan_catch_up(request.since, number, patches, snapshots, full_bytes=newest_snapshot)
            files: list[tuple[str, bytes | str]] = []
            if plan.snapshot is not None:
                files += [(f"snapshot/{p}", sha) for p, sha in sorted(history.hf_files(plan.snapshot).items())
                          if not p.startswith("nomoat-")]
            files += [(f"patches/{v:06d}.safetensors", self.deps.ledger.version(v)["patch"]) for v in plan.patches]
            return files
        return [(p, sha) for p, sha in sorted(history.hf_files(number).items()) if not p.startswith("nomoat-")]


class AdminServicer(rpc.AdminServicer):
    """Admin-only calls (the interceptor lets only admin tokens through)."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def CreateToken(self, request, context):
        try:
            token = self.deps.registry.create(request.role, request.name)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("a %s token was created (%s)", request.role, request.name or request.role)
        return pb.CreateTokenReply(token=token, token_id=token_id(token))

    def RevokeToken(self, request, context):
        if not request.token:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name the token to revoke, or its token id")
        if not self.deps.registry.revoke(request.token):
            context.abort(grpc.StatusCode.NOT_FOUND,
                          "no such token: give the token or its id as `nomoat token list` shows it")
        log.info("token %s was revoked", token_id(request.token))
        return pb.RevokeTokenReply(revoked=True)

    def ListTokens(self, request, context):
        return pb.ListTokensReply(tokens=[
            pb.TokenInfo(token_id=e.token_id, role=e.role, name=e.name, created=e.created)
            for e in self.deps.registry.list()
        ])

    def Rollback(self, request, context):
        try:
            number, loss = self.deps.operations.rollback(request.version)
        except ValueError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.VersionReply(version=number, eval_loss=loss)

    def Unmerge(self, request, context):
        try:
            number, loss = self.deps.operations.unmerge(request.adapter_id)
        except ValueError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.VersionReply(version=number, eval_loss=loss)


def add_all(server: grpc.Server, deps: Deps) -> None:
    rpc.add_DatasetsServicer_to_server(DatasetsServicer(deps), server)
    rpc.add_JobsServicer_to_server(JobsServicer(deps), server)
    rpc.add_WorkersServicer_to_server(WorkersServicer(deps), server)
    rpc.add_ModelsServicer_to_server(ModelsServicer(deps), server)
    rpc.add_AdminServicer_to_server(AdminServicer(deps), server)
