"""The Models service: pulls of a version's files."""

from __future__ import annotations

from coordinator.model import pull

from nomoat import framing
from nomoat.v1 import nomoat_pb2 as pb
from nomoat.v1 import nomoat_pb2_grpc as rpc

from coordinator.gateway.servicers.base import Deps, _answers


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
