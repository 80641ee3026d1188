"""The coordinator's HTTP port: the dashboard page, its data, a live stream of it, and /metrics.

``nomoat coordinator start --http 127.0.0.1:8470`` serves, on a port of its own (gRPC keeps its
own): ``/`` the page (coordinator/gateway/web/static/, no build step, nothing fetched from elsewhere),
``/api/snapshot`` its data as JSON (coordinator.observe.dashboard), ``/api/events`` the same as
server-sent events whenever it changes, ``/metrics`` Prometheus' text format
(coordinator.observe.metrics) and ``/healthz``. Everything but ``/healthz`` and the page's own static
files needs a reader (or admin) token, as ``Authorization: Bearer TOKEN`` or ``?token=TOKEN``
(the page passes on the one in its address to its API and stream calls: a browser's EventSource
cannot send a header).

The standard library's threading HTTP server, one thread per request, in a thread of its own.
A live stream holds its thread; one :class:`Feed` reads the ledger for all of them (at most
once per ``interval_s``, and only while someone watches), so a hundred open pages cost Redis
what one does. Request lines are logged without their query, which may hold a token.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from coordinator.observe import dashboard
from coordinator.gateway.auth import HTTP_ROLES, Identity, TokenRegistry
from coordinator.ledger import Ledger
from coordinator.observe.metrics import CONTENT_TYPE as METRICS_TYPE
from coordinator.observe.metrics import Metrics
from coordinator.settings import Settings

log = logging.getLogger("nomoat.web")
STATIC = Path(__file__).parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".txt": "text/plain; charset=utf-8"}
FILES = {"/static/" + p.name: p for p in STATIC.iterdir() if p.suffix in _TYPES} if STATIC.is_dir() else {}
ROUTES = ("/", "/api/snapshot", "/api/events", "/metrics", "/healthz", "/static")  # request counts' path label
MAX_STREAMS = 64  # live streams one process holds open at once (each holds a thread)
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream
RECHECK_S = 30.0  # a stream re-checks its token this often: a revoked token's stream ends
NO_TOKEN = ("This dashboard needs a reader token: open it as http://HOST:PORT/?token=TOKEN, or send "
            "'Authorization: Bearer TOKEN'. An admin makes one with: nomoat token create --role reader")
BAD_TOKEN = "The token is not valid (unknown or revoked). An admin makes a new one with: nomoat token create --role reader"
# The page and its files only: no inline script, nothing from another origin, never framed.
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class Feed:
    """The dashboard's data, read once per interval for every live stream that waits on it."""

    def __init__(self, make: Callable[[], dict], interval_s: float = 1.0) -> None:
        self.make = make
        self.interval_s = interval_s
        self._cond = threading.Condition()
        self._watchers = 0
        self._seq = 0
        self._payload = b""
        self._compare: object = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=10)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @contextmanager
    def watching(self) -> Iterator[None]:
        with self._cond:
            self._watchers += 1
            self._cond.notify_all()  # wake the reader if it slept for want of watchers
        try:
            yield
        finally:
            with self._cond:
                self._watchers -= 1

    def refresh(self) -> None:
        """Read the data now; a change is published to every stream waiting for one."""
        data = self.make()
        compare = {k: v for k, v in data.items() if k != "at"}  # the time alone is no news
        with self._cond:
            if compare != self._compare:
                self._compare = compare
                self._payload = json.dumps(data, separators=(",", ":")).encode()
                self._seq += 1
                self._cond.notify_all()

    def next(self, after: int, timeout: float) -> tuple[int, bytes] | None:
        """The newest data once it is newer than ``after`` (a sequence number); None on timeout or stop."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._seq <= after and not self._stopping.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return None if self._stopping.is_set() else (self._seq, self._payload)

    def _run(self) -> None:
        failing = False
        while not self._stopping.is_set():
            with self._cond:
                while self._watchers == 0 and not self._stopping.is_set():
                    self._cond.wait()
            if self._stopping.is_set():
                return
            try:
                self.refresh()
                if failing:
                    log.info("the dashboard reads its data again")
                failing = False
            except Exception:  # noqa: BLE001  (Redis away, say: the streams keep the last data)
                if not failing:  # once, not every interval, until it works again
                    log.warning("reading the dashboard's data failed; retrying", exc_info=True)
                failing = True
            self._stopping.wait(self.interval_s)


class WebServer:
    """The HTTP port, started in a thread of its own; :meth:`stop` closes it and its streams."""

    def __init__(self, address: str, ledger: Ledger, settings: Settings, registry: TokenRegistry,
                 interval_s: float = 1.0, tls_cert: str | None = None, tls_key: str | None = None) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--http {address}: give HOST:PORT, such as 127.0.0.1:8470 (or 'off')")
        self.host = host.strip("[]")
        self.port = int(port)
        self.ledger = ledger
        self.settings = settings
        self.registry = registry
        self.metrics = Metrics(ledger, settings)
        self.feed = Feed(lambda: dashboard.to_json(dashboard.snapshot(ledger, settings)), interval_s)
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        self.tls = bool(tls_cert)
        self._httpd = _Server((self.host, self.port), _handler(self))
        if tls_cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls_cert, tls_key)
            # The handshake happens in the request's own thread, on its first read: a client that
            # stalls in it must not hold up the accept loop.
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True,
                                                     do_handshake_on_connect=False)
        self.port = self._httpd.server_address[1]  # the real one when 0 asked for a free port
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def start(self) -> None:
        self.feed.start()
        self._thread.start()

    def stop(self) -> None:
        self.feed.stop()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def identify(self, token: str) -> tuple[Identity | None, HTTPStatus, str]:
        """Who calls with ``token``; else the status to answer and a sentence saying why not."""
        if not token:
            return None, HTTPStatus.UNAUTHORIZED, NO_TOKEN
        identity = self.registry.lookup(token)
        if identity is None:
            return None, HTTPStatus.UNAUTHORIZED, BAD_TOKEN
        if identity.role not in HTTP_ROLES:
            return None, HTTPStatus.FORBIDDEN, (f"A {identity.role} token may not open the dashboard; use a reader "
                                                "token (nomoat token create --role reader).")
        return identity, HTTPStatus.OK, ""


def _token(authorization: str, query_token: str) -> str:
    """The bearer token of a request: its Authorization header, else its ``token`` parameter."""
    if authorization.startswith("Bearer "):
        return authorization[len("Bearer "):].strip()
    return query_token


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stream left open never holds up shutdown
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        # A client that broke off, or spoke plain HTTP to the TLS port: its problem, not a traceback.
        log.debug("a request from %s broke off", client_address[0], exc_info=True)


def _handler(web: WebServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "nomoat"
        sys_version = ""
        _route = "other"  # the request counts' path label, set per request

        def log_message(self, format: str, *args) -> None:  # noqa: A002  (the base class's name)
            log.debug("%s %s", self.client_address[0], format % args)

        def log_request(self, code="-", size="-") -> None:  # without the query: it may hold a token
            log.debug('"%s %s" %s', self.command, urlsplit(self.path).path, code)

        def do_GET(self) -> None:  # noqa: N802  (the base class's name)
            try:
                self._get()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the caller went away
            except Exception as exc:  # noqa: BLE001  (a sentence for the caller, the trace for the log)
                log.exception("the HTTP port could not answer %s", urlsplit(self.path).path)
                self._send(HTTPStatus.SERVICE_UNAVAILABLE,
                           f"The coordinator could not answer: {exc}. Try again shortly.\n".encode(), _TYPES[".txt"])

        def _get(self) -> None:
            url = urlsplit(self.path)
            path = url.path
            self._route = next((r for r in ROUTES if path == r or (r == "/static" and path.startswith("/static/"))),
                               "other")
            if path == "/healthz":
                return self._send(HTTPStatus.OK, b"ok\n", _TYPES[".txt"])
            if path in FILES:
                return self._send(HTTPStatus.OK, FILES[path].read_bytes(), _TYPES[FILES[path].suffix])
            if path not in ("/", "/index.html", "/api/snapshot", "/api/events", "/metrics"):
                return self._send(HTTPStatus.NOT_FOUND,
                                  f"There is no page {path} here; the dashboard is at /.\n".encode(), _TYPES[".txt"])
            token = _token(self.headers.get("Authorization", ""), parse_qs(url.query).get("token", [""])[0])
            identity, code, why = web.identify(token)
            if identity is None:
                return self._send(code, (why + "\n").encode(), _TYPES[".txt"],
                                  {"WWW-Authenticate": 'Bearer realm="nomoat"'})
            if path == "/metrics":
                return self._send(HTTPStatus.OK, web.metrics.exposition(), METRICS_TYPE)
            if path == "/api/events":
                return self._stream(token)
            if path == "/api/snapshot":
                body = json.dumps(dashboard.to_json(dashboard.snapshot(web.ledger, web.settings))).encode()
                return self._send(HTTPStatus.OK, body, "application/json")
            return self._send(HTTPStatus.OK, (STATIC / "index.html").read_bytes(), _TYPES[".html"])

        def _send(self, code: HTTPStatus, body: bytes, kind: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for key, value in {**_SECURITY_HEADERS, **(extra or {}), "Content-Type": kind,
                               "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
            web.metrics.process.requests.labels(self._route, str(int(code))).inc()

        def _stream(self, token: str) -> None:
            if not web.streams.acquire(blocking=False):
                return self._send(HTTPStatus.SERVICE_UNAVAILABLE,
                                  f"{MAX_STREAMS} live streams are open already; try again later.\n".encode(),
                                  _TYPES[".txt"])
            try:
                self.send_response(HTTPStatus.OK)
                for key, value in {**_SECURITY_HEADERS, "Content-Type": "text/event-stream"}.items():
                    self.send_header(key, value)
                self.end_headers()
                web.metrics.process.requests.labels(self._route, "200").inc()
                web.metrics.process.streams.inc()
                try:
                    self._events(token)
                finally:
                    web.metrics.process.streams.dec()
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
                pass  # the page went away
            finally:
                web.streams.release()

        def _events(self, token: str) -> None:
            self.wfile.write(b"retry: 2000\n\n")
            self.wfile.flush()
            seq, checked = 0, time.monotonic()
            with web.feed.watching():
                while not web.feed.stopping:
                    got = web.feed.next(seq, KEEPALIVE_S)
                    if got is None:
                        self.wfile.write(b": keep-alive\n\n")
                    else:
                        seq, payload = got
                        self.wfile.write(b"event: snapshot\nid: %d\ndata: %s\n\n" % (seq, payload))
                    self.wfile.flush()
                    if time.monotonic() - checked > RECHECK_S:
                        if web.registry.lookup(token) is None:
                            self.wfile.write(b"event: refused\ndata: " + json.dumps(BAD_TOKEN).encode() + b"\n\n")
                            return
                        checked = time.monotonic()

    return Handler
