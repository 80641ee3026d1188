"""The Workers service: registration, leases held, shards, uploads, outbound runs."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from coordinator.gateway import long_polls

from coordinator.collect import accept

from coordinator.schedule import holder

from coordinator.schedule import inbox_dispatch

from coordinator.observe import contributions

from coordinator.schedule import registration
from coordinator.gateway.auth import caller, may_join_ray
from coordinator.errors import (
    BrokenOff,
    InvalidRequest,
)
from coordinator.ledger import Ledger
from coordinator.schedule.noise import Sample
from coordinator.collect.partial_uploads import PartialUploads
from nomoat.v1 import nomoat_pb2 as pb
from nomoat.v1 import nomoat_pb2_grpc as rpc

from coordinator.gateway.servicers.base import LONG_POLL_SLOTS, Deps, _answers, _identity, _worker_info

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
