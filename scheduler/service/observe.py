"""The operator's HTTP server: Prometheus metrics, a live dashboard and its JSON, on a loopback port.

    GET /metrics      Prometheus text format (scheduler.service.metrics), read from Redis on scrape
    GET /api/state    the namespace as JSON (scheduler.service.snapshot.state_json);
                      ?decisions=N (0..50) limits the decisions listed
    GET / /dashboard  a static page (dashboard.html, vanilla JS and inline SVG) polling /api/state;
                      it arrives with the current state inlined, so it shows numbers at once

It runs in the process that started the service (`bilevel serve`, `make demo`), in two daemon
threads: the HTTP server (one thread per request) and an asyncio loop holding one Redis
connection pool, on which every request's reads run. Reading needs only Redis, so the numbers are
the namespace's whichever host leads.
"""

from __future__ import annotations

import asyncio
import errno
import json
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from scheduler.config import ConfigError, ServiceConfig
from scheduler.connection import client_from_url
from scheduler.keys import DECISIONS_LEN
from scheduler.logs import get_logger
from scheduler.retry import describe
from scheduler.service.metrics import SnapshotCollector
from scheduler.service.snapshot import Snapshot, state_json, take_snapshot
from scheduler.store import Store

log = get_logger("bilevel.observe")

# A request waits at most this long for Redis (a scrape that takes longer is useless anyway).
READ_TIMEOUT_S = 10.0
# How often a server whose configured port was taken tries to bind it again.
CLAIM_EVERY_S = 5.0
# Where the page's inlined state goes.
_STATE_SLOT = "/*INITIAL_STATE*/null"


def dashboard_html() -> str:
    """The dashboard page as shipped (package data beside this module)."""
    return resources.files("scheduler.service").joinpath("dashboard.html").read_text("utf-8")


class ObserveServer:
    """Serves /metrics, /api/state and the dashboard for one namespace until `stop()`.

    `start()` binds `config.metrics.host`:`port` (0: a free port; `url` says which); see there
    for a port that is taken.
    """

    def __init__(
        self, config: ServiceConfig, redis_url: str, *, claim_every_s: float = CLAIM_EVERY_S
    ) -> None:
        self.config = config
        self.redis_url = redis_url
        self.claim_every_s = claim_every_s
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="bilevel-observe-redis", daemon=True
        )
        self._store: Store | None = None
        # The configured port's server first once it is bound; a free port's while it is taken.
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        # Orders a port claimed late against stop().
        self._lock = threading.Lock()
        # The configured port was taken at start and is not yet ours.
        self.port_taken = False
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(self.snapshot, config.store.namespace))
        self._page = dashboard_html()

    @property
    def url(self) -> str:
        """http://host:port of the configured port once bound, else of the stand-in port."""
        assert self._servers, "not started"
        host, port = self._servers[0].server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ObserveServer:
        """Listen and serve. A configured port that is taken (the service this one stands by
        for, in a rolling upgrade, holds it) is served on a free port meanwhile, and claimed as
        soon as it is free; any other failure to listen is a ConfigError naming metrics.host."""
        metrics = self.config.metrics
        try:
            server = self._bind(metrics.port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or metrics.port == 0:
                raise ConfigError(
                    f"metrics.host: cannot listen on {metrics.host}:{metrics.port}: "
                    f"{exc.strerror or exc}"
                ) from None
            server = self._bind(0)
            self.port_taken = True
        self._loop_thread.start()
        self._store = self._call(self._open_store())
        self._serve(server)
        if self.port_taken:
            log.warning(
                "observe_port_taken",
                port=metrics.port,
                serving=self.url,
                retry_every_s=self.claim_every_s,
            )
            claimer = threading.Thread(
                target=self._claim, name="bilevel-observe-claim", daemon=True
            )
            claimer.start()
            self._threads.append(claimer)
        log.info("observe_started", url=self.url)
        return self

    def _bind(self, port: int) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer((self.config.metrics.host, port), _handler_for(self))
        server.daemon_threads = True
        return server

    def _serve(self, server: ThreadingHTTPServer, *, first: bool = False) -> None:
        thread = threading.Thread(
            target=server.serve_forever, name="bilevel-observe-http", daemon=True
        )
        thread.start()
        if first:
            self._servers.insert(0, server)
        else:
            self._servers.append(server)
        self._threads.append(thread)

    def _claim(self) -> None:
        """Bind the configured port once it is free (the stand-in port keeps serving too)."""
        port = self.config.metrics.port
        while not self._stopping.wait(self.claim_every_s):
            try:
                server = self._bind(port)
            except OSError:
                continue
            with self._lock:
                if self._stopping.is_set():
                    server.server_close()
                    return
                self._serve(server, first=True)
            self.port_taken = False
            log.info("observe_port_claimed", url=self.url)
            return

    async def _open_store(self) -> Store:
        return Store(client_from_url(self.redis_url), self.config.store)

    def _call(self, coro: Any, timeout_s: float = READ_TIMEOUT_S) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout_s)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError(f"Redis did not answer within {timeout_s:.0f} s") from None

    def snapshot(self, decisions: int = DECISIONS_LEN) -> Snapshot:
        """A fresh snapshot of the namespace (raises what reading Redis raised)."""
        assert self._store is not None, "not started"
        snap: Snapshot = self._call(take_snapshot(self._store, self.config, decisions=decisions))
        return snap

    def stop(self) -> None:
        """Stop serving and close the Redis connections (idempotent)."""
        with self._lock:
            self._stopping.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []
        for thread in self._threads:
            thread.join(timeout=5.0)
        self._threads = []
        if self._store is not None:
            store, self._store = self._store, None
            try:
                self._call(store.close(), timeout_s=5.0)
            except Exception as exc:
                log.debug("observe_close_failed", error=describe(exc))
        if self._loop_thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=5.0)
        if not self._loop.is_running():
            self._loop.close()

    # -- requests -----------------------------------------------------------------------------

    def respond(self, path: str, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of `path`."""
        if path == "/metrics":
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path in ("/", "/dashboard", "/api/state"):
            try:
                decisions = _decisions_param(query)
            except ValueError as exc:
                return _json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            try:
                state = state_json(self.snapshot(decisions))
            except Exception as exc:
                log.warning("observe_read_failed", error=describe(exc))
                error = {"error": f"cannot read Redis: {describe(exc)}"}
                if path == "/api/state":
                    return _json(HTTPStatus.SERVICE_UNAVAILABLE, error)
                state = error
            if path == "/api/state":
                return _json(HTTPStatus.OK, state)
            # "<" only occurs inside JSON strings, where \u003c means the same: no name (a tenant,
            # a queue) can close the script element or open a comment in it.
            inlined = json.dumps(state).replace("<", "\\u003c")
            page = self._page.replace(_STATE_SLOT, inlined, 1)
            return HTTPStatus.OK, "text/html; charset=utf-8", page.encode()
        body = "not found: try /metrics, /api/state or /dashboard\n"
        return HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", body.encode()


def _decisions_param(query: dict[str, list[str]]) -> int:
    values = query.get("decisions")
    if not values:
        return DECISIONS_LEN
    text = values[-1]
    if not text.isdigit() or int(text) > DECISIONS_LEN:
        raise ValueError(
            f"decisions must be a whole number from 0 to {DECISIONS_LEN}, got {text!r}"
        )
    return int(text)


def _json(status: int, value: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(value).encode()


def _handler_for(server: ObserveServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "bilevel"

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            try:
                status, content_type, body = server.respond(parts.path, parse_qs(parts.query))
            except Exception as exc:
                log.exception("observe_request_failed", path=parts.path)
                status, content_type = HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain"
                body = f"internal error: {describe(exc)}\n".encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # One line per request would drown serve's own output; errors are logged above.
            return

    return Handler


def start_observe(config: ServiceConfig, redis_url: str) -> ObserveServer | None:
    """The running server when `config.metrics.enabled`, else None (ConfigError naming
    metrics.host when it cannot listen)."""
    if not config.metrics.enabled:
        return None
    return ObserveServer(config, redis_url).start()


__all__ = ["ObserveServer", "dashboard_html", "start_observe"]
