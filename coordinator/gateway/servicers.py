"""gRPC servicers: translate messages to domain calls and back, nothing else.

Each method turns its request into the domain's terms, calls one domain function, and turns
the answer into the reply. Refusals a client should act on (a bad dataset, a stale lease) are
the domain's typed errors (coordinator.errors), answered with a status code and the error's
sentence by ``_answers``, the one place that maps them; an adapter upload that fails its checks
is a normal reply with ``accepted = false`` and the reason, so the worker can log it and move on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import types
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from coordinator.gateway import admin, long_polls, quotas
from coordinator.gateway.lanes import CALLS, LANE_OF, RETRY_AFTER, STREAMS, Lanes

from coordinator.collect import accept

from coordinator.schedule import holder

from coordinator.schedule import inbox_dispatch

from coordinator.model import pull, retention

from coordinator.observe import contributions

from coordinator.observe import status

from coordinator.schedule import submit

from coordinator.schedule import registration
from coordinator.schedule import roster
from coordinator.gateway.auth import Identity, TokenRegistry, caller, may_join_ray, token_id
from coordinator.errors import (
    BrokenOff,
    Incomplete,
    InvalidRequest,
    LimitReached,
    NotFound,
    NotPermitted,
    RequestError,
    Unauthenticated,
    Unavailable,
    WrongState,
)
from coordinator.model.history import History
from coordinator.ledger import Ledger
from coordinator.schedule.noise import Sample
from coordinator.settings import Settings
from coordinator.model.store import Store
from coordinator.collect.partial_uploads import PartialUploads
from nomoat import framing
from nomoat.v1 import nomoat_pb2 as pb
from nomoat.v1 import nomoat_pb2_grpc as rpc

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from coordinator.fold.folder import Folder
    from coordinator.schedule.replication import Replication

log = logging.getLogger("nomoat.service")
# Long-polls one frontend holds at once: a waiting poll holds no thread, only a look at its
# inbox every few seconds (coordinator.gateway.long_polls).
LONG_POLL_SLOTS = 4096
WATCH_EVERY_S = 0.5  # how often a Watch stream looks at its job
REQUEST_STREAMS = frozenset({"Submit", "Upload"})  # bodies that read the client's stream

_STATUS: dict[type[RequestError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    WrongState: grpc.StatusCode.FAILED_PRECONDITION,
    NotPermitted: grpc.StatusCode.PERMISSION_DENIED,
    LimitReached: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Incomplete: grpc.StatusCode.DATA_LOSS,
    BrokenOff: grpc.StatusCode.CANCELLED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


@dataclass
class Deps:
    settings: Settings
    ledger: Ledger
    store: Store
    registry: TokenRegistry
    tokenizer: PreTrainedTokenizerBase
    shapes: dict[str, tuple[int, int]]  # every nn.Linear of the base model
    ray_address: str
    ray_auth_token: str
    history: History | None = None  # snapshots, patches, rebuilds
    operations: Folder | None = None  # this process's folder, if any: the admin's sweep takes its lock
    uploads: PartialUploads | None = None  # made in data_dir/uploads when first needed
    replication: Replication | None = None  # holds replicated tasks' adapters (None: none are replicated)
    long_polls: inbox_dispatch.LongPolls | None = None  # outbound workers' long-polls this frontend holds at once
    lanes: Lanes | None = None  # the server's threads and stream slots (coordinator.server.grpc_server)
    wakeups: long_polls.Wakeups | None = None  # wakes this frontend's long-polls when a run is placed


@contextlib.asynccontextmanager
async def _stream(deps: Deps, kind: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """One of this gateway's ``kind`` slots (at most the caller's share of them: checked first, in
    memory, so a refusal costs no ledger call) and one of the caller's own, for the block."""
    owner = await quotas.stream_owner(deps.lanes, lambda: caller(context, deps.registry))
    async with deps.lanes.stream(kind, owner), quotas.stream_slot(deps.lanes, deps.ledger, deps.settings, owner):
        yield


def _answers(method: Callable) -> Callable:
    """Serve ``method`` on the asyncio server, and answer a RequestError raised by it (or a
    domain call in it) with its status code.

    A synchronous body runs in its lane's threads (coordinator.gateway.lanes.LANE_OF): a unary
    call whole, a response stream one item at a time, a request stream (Submit, Upload) whole,
    reading the client's messages as a plain iterator. A stream holds one of its kind's slots
    for its length. An ``async def`` body (Watch, RequestWork) is written for the loop itself.
    """
    name = method.__name__
    lane = LANE_OF.get(name, CALLS)

    async def abort(context: grpc.aio.ServicerContext, exc: RequestError) -> None:
        code = next((c for kind, c in _STATUS.items() if isinstance(exc, kind)), grpc.StatusCode.UNKNOWN)
        retry = getattr(exc, "retry_after_s", 0)  # a refusal for capacity says when to come back
        await context.abort(code, str(exc), trailing_metadata=((RETRY_AFTER, f"{retry:g}"),) if retry else ())

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream_on_loop(self, request, context):
            try:
                async with _stream(self.deps, name, context):
                    async for item in method(self, request, context):
                        yield item
            except RequestError as exc:
                await abort(context, exc)
        return stream_on_loop

    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def on_loop(self, request, context):
            try:
                return await method(self, request, context)
            except RequestError as exc:
                await abort(context, exc)
        return on_loop

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        async def streaming(self, request, context):
            lanes = self.deps.lanes
            try:
                async with _stream(self.deps, name, context):
                    async for item in lanes.steps(method(self, request, context)):
                        yield item
            except RequestError as exc:
                await abort(context, exc)
        return streaming

    if name in REQUEST_STREAMS:
        @functools.wraps(method)
        async def consuming(self, request_iterator, context):
            lanes = self.deps.lanes
            try:
                async with _stream(self.deps, name, context):
                    return await lanes.consume(request_iterator, lambda messages: method(self, messages, context))
            except RequestError as exc:
                await abort(context, exc)
        return consuming

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await self.deps.lanes.run(lane, method, self, request, context)
        except RequestError as exc:
            await abort(context, exc)
    return unary


def _identity(context: grpc.ServicerContext, deps: Deps) -> Identity:
    identity = caller(context, deps.registry)
    if identity is None:  # revoked since the interceptor let the call in
        raise Unauthenticated("the token is not valid (unknown or revoked)")
    return identity


def _job_info(job: status.JobSummary) -> pb.JobInfo:
    return pb.JobInfo(
        job_id=job.job_id, name=job.name, state=job.state, tasks=pb.TaskCounts(**job.tasks),
        total_tasks=job.total_tasks, adapters_folded=job.adapters_folded, adapters_rejected=job.adapters_rejected,
        error=job.error, created=job.created, tokens=job.tokens, dataset_sha256=job.dataset_sha256,
        base_loss=job.base_loss, warning=job.warning, events=job.events,
        training=job.training, noise_scale=job.noise_scale,
    )


def _worker_info(w: status.WorkerSummary) -> pb.WorkerInfo:
    return pb.WorkerInfo(worker_id=w.worker_id, name=w.name, card=pb.Card.FromString(w.card),
                         last_seen=w.last_seen, tasks_done=w.tasks_done, state=w.state, trust=w.trust,
                         trust_score=w.trust_score, trust_reason=w.trust_reason, kind=w.kind)


def _version_info(v: status.VersionSummary) -> pb.VersionInfo:
    return pb.VersionInfo(version=v.version, parent=v.parent, eval_loss=v.eval_loss, adapters=v.adapters,
                          created=v.created, job_id=v.job_id, adapter_ids=v.adapter_ids, operation=v.operation)


def _dataset_parts(request_iterator: Iterator[pb.SubmitChunk]) -> Iterator[submit.DatasetPart]:
    for chunk in request_iterator:
        kind = chunk.WhichOneof("part")
        if kind == "header":
            h = chunk.header
            yield submit.DatasetHeader(h.filename, h.name, h.size, {
                "lora_rank": h.config.lora_rank,
                "lora_alpha": h.config.lora_alpha,
                "target_modules": list(h.config.target_modules),
                "seq_len": h.config.seq_len,
                "learning_rate": h.config.learning_rate,
                "batch_size": h.config.batch_size,
                "epochs": h.config.epochs,
                "tokens_per_task": h.config.tokens_per_task,
                "warm_start": h.config.warm_start,
            })
        elif kind == "sha256":
            yield submit.DatasetDigest(chunk.sha256)
        else:
            yield chunk.data  # an empty message carries no bytes, as an empty data part


def _adapter_blocks(request_iterator: Iterator[pb.UploadChunk], ledger: Ledger) -> Iterator[bytes]:
    received = 0
    try:
        for chunk in request_iterator:
            if chunk.WhichOneof("part") == "manifest":
                raise InvalidRequest("the manifest was sent twice")
            received += len(chunk.data)
            yield chunk.data
    except grpc.RpcError:  # the client went away mid-stream: what arrived is kept
        raise BrokenOff("the upload broke off; send the rest from UploadOffset") from None
    finally:
        ledger.counters.gateway("upload", received)


def _manifest(m: pb.AdapterManifest) -> accept.Manifest:
    return accept.Manifest(
        task_id=m.task_id, fence=m.fence, base_version=m.base_version, rank=m.rank, alpha=m.alpha,
        tokens=m.tokens, train_loss=m.train_loss, sha256=m.sha256, size=m.size, worker_id=m.worker_id,
        lineage=m.lineage, lease_secret=m.lease_secret,
        gradients=Sample(m.grad_micro_sq, m.grad_batch_sq, m.grad_micro_batch, m.grad_batch_size),
    )


class DatasetsServicer(rpc.DatasetsServicer):
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    @_answers
    def Submit(self, request_iterator, context):
        d = self.deps
        result = submit.receive(d.settings, d.ledger, d.store, d.tokenizer, list(d.shapes),
                                _dataset_parts(request_iterator), owner=quotas.owner_of(_identity(context, d)))
        return pb.SubmitReply(job_id=result.job_id, tasks=result.tasks, records=result.records,
                              tokens=result.tokens, validation_records=result.validation_records)


class JobsServicer(rpc.JobsServicer):
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    @_answers
    def Status(self, request, context):
        view = status.overview(self.deps.ledger, self.deps.settings, request.job_id, request.limit,
                               status.Page.of(request.page_token))
        return pb.StatusReply(jobs=[_job_info(j) for j in view.jobs],
                              workers=[_worker_info(w) for w in view.workers],
                              versions=[_version_info(v) for v in view.versions],
                              next_page_token=view.next_page.token())

    @_answers
    async def Watch(self, request, context):
        last = None
        while not context.done():
            standing = await self.deps.lanes.run(STREAMS, status.progress, self.deps.ledger, request.job_id)
            progress = pb.JobProgress(job=_job_info(standing.job), current_version=standing.current_version,
                                      eval_loss=standing.eval_loss, finished=standing.finished)
            if progress != last:
                yield progress
                last = progress
            if progress.finished:
                return
            await asyncio.sleep(WATCH_EVERY_S)


class WorkersServicer(rpc.WorkersServicer):
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    @_answers
    def Register(self, request, context):
        joining = registration.Registration(request.worker_id, request.name, request.node_id,
                                       request.card.SerializeToString(), request.card.name, request.card.vram_gb)
        joined = registration.join(self.deps.ledger, self.deps.settings, caller(context, self.deps.registry),
                                   joining, context.peer())
        ray = may_join_ray(joined.identity)  # the Ray token lets its holder run code anywhere: trusted only
        return pb.RegisterReply(worker_id=joined.worker_id, ray_address=self.deps.ray_address if ray else "",
                                ray_auth_token=self.deps.ray_auth_token if ray else "",
                                lineage=self.deps.history.lineage().id, credential=joined.credential,
                                volunteer_id=joined.identity.token_hash if joined.identity else "")

    @_answers
    def Heartbeat(self, request, context):
        beat = holder.heartbeat(self.deps.ledger, self.deps.settings, _identity(context, self.deps),
                                request.worker_id, request.task_id, request.fence, request.event,
                                request.lease_secret)
        return pb.HeartbeatReply(ok=beat.ok, deadline=beat.deadline, reason=beat.reason,
                                 base_version=beat.base_version, lineage=self.deps.history.lineage().id)

    @_answers
    def FetchShard(self, request, context):
        shard = holder.shard(self.deps.ledger, self.deps.store, _identity(context, self.deps),
                             request.task_id, request.fence, self.deps.settings.url_ttl_s,
                             request.worker_id, request.lease_secret)
        if shard.url:
            yield pb.DataChunk(url=shard.url, sha256=shard.sha256, size=shard.size)
            return
        sent = 0
        for block in shard.blocks:
            sent += len(block)
            yield pb.DataChunk(data=block)
        self.deps.ledger.counters.gateway("shard", sent)

    def _partials(self) -> PartialUploads:
        if self.deps.uploads is None:
            self.deps.uploads = PartialUploads(self.deps.settings.data_dir / "uploads")
        return self.deps.uploads

    @_answers
    def UploadTarget(self, request, context):
        wanted = accept.Manifest(task_id=request.task_id, fence=request.fence, base_version=0, rank=0, alpha=0.0,
                                 tokens=0, train_loss=0.0, sha256=request.sha256, size=request.size,
                                 worker_id=request.worker_id, lease_secret=request.lease_secret)
        url = accept.upload_target(self.deps.ledger, self.deps.store, _identity(context, self.deps), wanted,
                                   max_bytes=self.deps.settings.max_adapter_bytes, ttl_s=self.deps.settings.url_ttl_s)
        return pb.UploadTargetReply(url=url, expires_in_s=self.deps.settings.url_ttl_s if url else 0.0)

    @_answers
    def UploadOffset(self, request, context):
        return pb.UploadOffsetReply(offset=holder.upload_offset(
            self.deps.ledger, self._partials(), _identity(context, self.deps), request.task_id, request.fence,
            request.sha256, request.worker_id, request.lease_secret))

    @_answers
    def Upload(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None:
            raise InvalidRequest("no manifest was sent")
        if first.WhichOneof("part") != "manifest":
            raise InvalidRequest("the first message must be the manifest")
        m = first.manifest
        result = accept.upload(self.deps.ledger, self.deps.store, self.deps.shapes, self._partials(),
                                _identity(context, self.deps), _manifest(m), m.offset,
                                _adapter_blocks(request_iterator, self.deps.ledger),
                                max_bytes=self.deps.settings.max_adapter_bytes,
                                lineage=self.deps.history.lineage().id, replication=self.deps.replication,
                                in_store=m.in_store)
        if result.ok:
            return pb.UploadReply(accepted=True, adapter_id=result.detail)
        return pb.UploadReply(accepted=False, reason=result.detail)

    @_answers
    def Stats(self, request, context):
        mine = contributions.of_caller(self.deps.ledger, self.deps.settings, _identity(context, self.deps), request.worker_id)
        return pb.WorkerStatsReply(
            volunteer=mine.volunteer, workers=[_worker_info(w) for w in mine.workers], tasks_done=mine.tasks_done,
            tokens_trained=mine.tokens_trained, adapters_folded=mine.folded, adapters_refused=mine.refused,
            replicas_agreed=mine.agreed, replicas_disagreed=mine.disagreed,
            reasons=[pb.CheckCount(check=k, count=n) for k, n in mine.reasons.items()], recent=mine.recent,
            versions=[pb.VersionShare(version=v, adapters=n) for v, n in mine.versions.items()],
            trust=mine.standing.level.value, trust_score=mine.standing.score, trust_reason=mine.standing.why)

    @_answers
    async def RequestWork(self, request, context):
        d = self.deps
        if d.long_polls is None:
            d.long_polls = inbox_dispatch.LongPolls(LONG_POLL_SLOTS)
        work = await long_polls.request_work(d.lanes, d.wakeups, d.long_polls, d.ledger, d.settings,
                                             lambda: _identity(context, d), request.worker_id, request.wait_s)
        return pb.WorkReply(run_id=work.run_id, task_specs=list(work.specs), poll_again_s=work.poll_again_s)

    @_answers
    def ReportRun(self, request, context):
        inbox_dispatch.report_run(self.deps.ledger, _identity(context, self.deps), request.worker_id, request.run_id,
                            list(request.units), list(request.handed_back), dict(request.lease_secrets))
        return pb.RunReportReply(ok=True)


class ModelsServicer(rpc.ModelsServicer):
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    @_answers
    def Pull(self, request, context):
        plan = pull.plan(self.deps.ledger, self.deps.history, self.deps.store, request.format, request.since,
                         request.version, max_peft_bytes=self.deps.settings.max_peft_pull_bytes)
        start = pull.starts(plan, ((r.path, r.sha256, r.offset) for r in request.resume))
        urls = pull.links(self.deps.store, plan, self.deps.settings.url_ttl_s)  # {} unless an object store
        yield pb.PullChunk(header=pb.PullHeader(version=plan.version, lineage=plan.lineage, files=[
            pb.FileEntry(path=f.path, size=f.size, sha256=f.sha256, offset=start.get(f.path, 0),
                         url=urls.get(f.path, "")) for f in plan.files
        ]))
        sent = 0
        try:
            for path, offset, block in pull.blocks(self.deps.store, plan, pull.CHUNK, start, skip=urls):
                sent += len(block)
                yield framing.file_chunk(path, offset, block)  # already serialized (see add_all)
        finally:
            self.deps.ledger.counters.gateway("pull", sent)


class AdminServicer(rpc.AdminServicer):
    """Admin-only calls (the interceptor lets only admin tokens through)."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    @_answers
    def CreateToken(self, request, context):
        token = admin.create_token(self.deps.registry, request.role, request.name)
        return pb.CreateTokenReply(token=token, token_id=token_id(token))

    @_answers
    def RevokeToken(self, request, context):
        admin.revoke_token(self.deps.registry, request.token)
        return pb.RevokeTokenReply(revoked=True)

    @_answers
    def ListTokens(self, request, context):
        return pb.ListTokensReply(tokens=[
            pb.TokenInfo(token_id=e.token_id, role=e.role, name=e.name, created=e.created)
            for e in self.deps.registry.list()
        ])

    @_answers
    def Rollback(self, request, context):
        number, loss = admin.rollback(self.deps.ledger, request.version)
        return pb.VersionReply(version=number, eval_loss=loss)

    @_answers
    def Unmerge(self, request, context):
        number, loss = admin.unmerge(self.deps.ledger, request.adapter_id)
        return pb.VersionReply(version=number, eval_loss=loss)

    @_answers
    def ListVolunteers(self, request, context):
        return pb.ListVolunteersReply(volunteers=[
            pb.VolunteerInfo(volunteer_id=v.volunteer_id, name=v.name, joined=v.joined, worker_ids=v.worker_ids,
                             active_workers=v.active_workers, standing=v.standing, trust_score=v.score,
                             reason=v.reason, role=v.role)
            for v in roster.listing(self.deps.ledger, self.deps.settings)])

    def Sweep(self, request, context):
        d = self.deps
        report = retention.sweep_under(d.settings, d.ledger, d.store, d.history.dir if d.history else None,
                                       d.operations.lock if d.operations else None, dry_run=request.dry_run)
        return pb.SweepReply(lines=report.lines(), blobs=report.blobs, bytes=report.bytes, records=report.records)


    @_answers
    def BanVolunteer(self, request, context):
        volunteer_id = roster.resolve(self.deps.ledger, request.volunteer_id)
        dropped = roster.ban(self.deps.ledger, self.deps.registry, volunteer_id)
        return pb.VolunteerReply(volunteer_id=volunteer_id, leases_dropped=dropped)

    @_answers
    def ClearVolunteer(self, request, context):
        volunteer_id = roster.resolve(self.deps.ledger, request.volunteer_id)
        roster.clear(self.deps.ledger, volunteer_id)
        return pb.VolunteerReply(volunteer_id=volunteer_id)

    @_answers
    def RotateJoinCode(self, request, context):
        kept = self.deps.settings.data_dir / roster.JOIN_CODE_FILE
        code = roster.rotate_join_code(self.deps.ledger, self.deps.registry, kept)
        return pb.RotateJoinCodeReply(join_code=code)


def _on_loop(servicer):
    """The servicer with any RPC method left synchronous (written without ``@_answers``) served
    through ``_answers`` all the same: the asyncio server cannot call a plain function."""
    for name, fn in inspect.getmembers(type(servicer), inspect.isfunction):
        if name[:1].isupper() and not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
            setattr(servicer, name, types.MethodType(_answers(fn), servicer))
    return servicer


def add_all(server: grpc.aio.Server, deps: Deps) -> None:
    rpc.add_DatasetsServicer_to_server(_on_loop(DatasetsServicer(deps)), server)
    rpc.add_JobsServicer_to_server(_on_loop(JobsServicer(deps)), server)
    rpc.add_WorkersServicer_to_server(_on_loop(WorkersServicer(deps)), server)
    # Models by hand: Pull yields its file chunks already framed (nomoat.framing.file_chunk),
    # which the generated registration would try to serialize again.
    models = ModelsServicer(deps)
    handlers = {"Pull": grpc.unary_stream_rpc_method_handler(
        models.Pull, request_deserializer=pb.PullRequest.FromString, response_serializer=framing.serialize)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("nomoat.v1.Models", handlers),))
    server.add_registered_method_handlers("nomoat.v1.Models", handlers)
    rpc.add_AdminServicer_to_server(_on_loop(AdminServicer(deps)), server)
