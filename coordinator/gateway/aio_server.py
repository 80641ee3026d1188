"""The asyncio gRPC server on an event loop thread of its own, driven from threaded code.

The coordinator is threaded (the scheduler and folder loops, the dashboard); only the gRPC
gateway is asyncio (coordinator.gateway.lanes says why). :class:`LoopServer` owns the loop and
offers what the rest of the process used of a ``grpc.Server``: add a port, start, stop (and wait).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health

T = TypeVar("T")


class _Stopped:
    """What :meth:`LoopServer.stop` returns: already stopped, so ``wait()`` returns at once."""

    def wait(self, timeout: float | None = None) -> bool:  # noqa: ARG002
        return True


class LoopHealth:
    """The asyncio health servicer, set from any thread."""

    def __init__(self, server: LoopServer, servicer: health.aio.HealthServicer) -> None:
        self._server = server
        self.servicer = servicer

    def set(self, service: str, status: int) -> None:
        self._server.call(lambda: self.servicer.set(service, status))

    def enter_graceful_shutdown(self) -> None:
        self._server.call(self.servicer.enter_graceful_shutdown)


class LoopServer:
    """A ``grpc.aio`` server built by ``build`` (a coroutine function, run on the new loop)."""

    def __init__(self, build: Callable[[], Awaitable[grpc.aio.Server]],
                 on_stop: Callable[[], None] = lambda: None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-loop", daemon=True)
        self._thread.start()
        self._on_stop = on_stop
        self._stopped = False
        self.server: grpc.aio.Server = self.call(build)

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run the coroutine ``fn()`` on the loop and wait for its answer."""
        async def run() -> T:
            return await fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result()

    def _sync(self, fn: Callable[..., T], *args: Any) -> T:
        async def run() -> T:
            return fn(*args)

        return self.call(run)

    def add_generic_rpc_handlers(self, handlers) -> None:
        """Serve more handlers (their behaviours must be ``async``)."""
        self._sync(self.server.add_generic_rpc_handlers, handlers)

    def add_insecure_port(self, address: str) -> int:
        return self._sync(self.server.add_insecure_port, address)

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        return self._sync(self.server.add_secure_port, address, credentials)

    def start(self) -> None:
        self.call(self.server.start)

    def stop(self, grace: float | None) -> _Stopped:
        """Stop serving (calls in flight get ``grace`` seconds), then the loop; returns when done."""
        if self._stopped:
            return _Stopped()
        self._stopped = True
        try:
            self.call(lambda: self.server.stop(grace))
        finally:
            self._on_stop()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        return _Stopped()
