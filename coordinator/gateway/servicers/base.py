"""What every servicer shares: the dependencies, the lanes, the one map from domain errors to
status codes (``_answers``) and the summaries as messages.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from coordinator.gateway import long_polls, quotas
from coordinator.gateway.lanes import CALLS, LANE_OF, RETRY_AFTER, Lanes

from coordinator.schedule import inbox_dispatch

from coordinator.observe import status

from coordinator.gateway.auth import Identity, TokenRegistry, caller
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
from coordinator.settings import Settings
from coordinator.model.store import Store
from coordinator.collect.partial_uploads import PartialUploads
from nomoat.v1 import nomoat_pb2 as pb

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
