"""The Datasets service: a submitted dataset, streamed in."""

from __future__ import annotations

from collections.abc import Iterator

from coordinator.gateway import quotas

from coordinator.schedule import submit

from nomoat.v1 import nomoat_pb2 as pb
from nomoat.v1 import nomoat_pb2_grpc as rpc

from coordinator.gateway.servicers.base import Deps, _answers, _identity

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
