"""A real TCP proxy in front of the test Redis that can lose one reply.

The request goes through and runs on the server; the connection is cut before its reply comes
back. The coordinator's Redis client (coordinator.server.redis_client) then retries on a new
connection, so the same command or script runs a second time: what a network blip does to a
non-idempotent call in production.
"""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit, urlunsplit


class LosesReplies:
    def __init__(self, url: str) -> None:
        """In front of the Redis at ``url``; :attr:`url` is the same server through the proxy."""
        parts = urlsplit(url)
        self.target = (parts.hostname, parts.port)
        self._url = parts
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._drop = threading.Event()
        self.dropped = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        auth = f":{self._url.password}@" if self._url.password else ""
        return urlunsplit((self._url.scheme, f"{auth}127.0.0.1:{self.port}", self._url.path, "", ""))

    def lose_next_reply(self) -> None:
        self._drop.set()

    def close(self) -> None:
        self._closed = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if replies and self._drop.is_set():
                    self._drop.clear()
                    self.dropped += 1
                    break  # the reply is lost with the connection
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
