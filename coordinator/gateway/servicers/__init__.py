"""gRPC servicers: translate messages to domain calls and back, nothing else.

Each method turns its request into the domain's terms, calls one domain function, and turns
the answer into the reply. Refusals a client should act on (a bad dataset, a stale lease) are
the domain's typed errors (coordinator.errors), answered with a status code and the error's
sentence by ``_answers``, the one place that maps them; an adapter upload that fails its checks
is a normal reply with ``accepted = false`` and the reason, so the worker can log it and move on.

One module per service (datasets, jobs, workers, models, admin) on a shared base; the
names are importable from here as before.
"""

from __future__ import annotations

import inspect
import types

import grpc

from nomoat import framing
from nomoat.v1 import nomoat_pb2 as pb
from nomoat.v1 import nomoat_pb2_grpc as rpc
from coordinator.gateway.servicers.base import (
    LONG_POLL_SLOTS,
    WATCH_EVERY_S,
    REQUEST_STREAMS,
    _STATUS,
    Deps,
    _stream,
    _answers,
    _identity,
    _job_info,
    _worker_info,
    _version_info,
)
from coordinator.gateway.servicers.datasets import _dataset_parts, DatasetsServicer  # noqa: F401
from coordinator.gateway.servicers.jobs import JobsServicer  # noqa: F401
from coordinator.gateway.servicers.workers import _adapter_blocks, _manifest, WorkersServicer  # noqa: F401
from coordinator.gateway.servicers.models import ModelsServicer  # noqa: F401
from coordinator.gateway.servicers.admin import AdminServicer  # noqa: F401

__all__ = ["AdminServicer", "DatasetsServicer", "Deps", "JobsServicer", "LONG_POLL_SLOTS", "ModelsServicer", "REQUEST_STREAMS", "WATCH_EVERY_S", "WorkersServicer", "_STATUS", "_answers", "_identity", "_job_info", "_on_loop", "_stream", "_version_info", "_worker_info", "add_all"]


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
