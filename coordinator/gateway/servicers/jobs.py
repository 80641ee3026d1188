"""The Jobs service: status and a job's progress."""

from __future__ import annotations

import asyncio

from coordinator.gateway.lanes import STREAMS

from coordinator.observe import status

from nomoat.v1 import nomoat_pb2 as pb
from nomoat.v1 import nomoat_pb2_grpc as rpc

from coordinator.gateway.servicers.base import WATCH_EVERY_S, Deps, _answers, _job_info, _worker_info, _version_info


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
