"""Opening Redis connections from settings, with errors that name the server but never a secret.

Two kinds of URL:

- `redis://`, `rediss://`, `unix://`: one server, as redis-py reads them.
- `redis+sentinel://[user:password@]host1[:port1][,host2[:port2],...]/<master-name>[/<db>][?options]`
  (and `rediss+sentinel://` for TLS to the sentinels and the data nodes): the sentinels to ask
  (port 26379 unless given) and the name of the master they watch. The client asks them for the
  current master whenever it (re)connects, so it follows a failover. `user:password` is for the
  master; `sentinel_username` / `sentinel_password` options are for the sentinels themselves;
  `sentinel_timeout` (seconds) bounds each question to a sentinel; any other option is a redis-py
  URL option of the master connections (`socket_timeout`, `ssl_ca_certs`, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import (
    URL_QUERY_ARGUMENT_PARSERS,
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from scheduler.errors import RedisUnavailable

_SCHEMES = ("redis", "rediss", "unix")
# Sentinel schemes, and whether they use TLS.
_SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
_ALL_SCHEMES = (*_SCHEMES, *_SENTINEL_SCHEMES)
_DEFAULT_PORT = 6379
_DEFAULT_SENTINEL_PORT = 26379

# Reads give up after this long, so a dead server or network is noticed rather than waited on.
SOCKET_TIMEOUT_S = 30.0
# Blocking commands (BLPOP, BLMOVE) wait at most this long per call, well inside the socket
# timeout; a longer wait loops. (redis-py's own default socket timeout is 5 s, which a 5 s block
# would race.)
MAX_BLOCK_S = 5.0
# A sentinel answers at once when it is up; every (re)connect asks the sentinels in turn, so one
# that is down must not hold a reconnect for as long as a command may take.
SENTINEL_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """Host and port of a Redis URL; safe to print."""

    host: str
    port: int | None

    def __str__(self) -> str:
        if self.port is None:
            return self.host
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SentinelAddress:
    """The sentinels of a sentinel URL and the master name asked of them; safe to print."""

    sentinels: tuple[ServerAddress, ...]
    master_name: str

    def __str__(self) -> str:
        where = ",".join(str(s) for s in self.sentinels)
        return f"master {self.master_name!r} via sentinels {where}"


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """A parsed sentinel URL. Holds secrets: never printed (its repr shows the address only)."""

    address: SentinelAddress
    tls: bool
    db: int
    # Keyword arguments of the master connections (credentials and URL options).
    master_kwargs: dict[str, Any] = field(repr=False)
    # Keyword arguments of the connections to the sentinels.
    sentinel_kwargs: dict[str, Any] = field(repr=False)


def _fail(
    url_kind: str, reason: str, where: str = "<no host>", port: int | None = None
) -> NoReturn:
    raise RedisUnavailable(where, port, f"{url_kind}: {reason}")


def parse_address(url: str) -> ServerAddress | SentinelAddress:
    """Validate a Redis URL's shape and return where it points; errors never echo the URL."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in _SENTINEL_SCHEMES:
        return parse_sentinel_url(url).address
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        # urlsplit's message may quote the URL's text (a port, say): never pass it on.
        reason = "port is not a number in 0-65535" if "Port" in str(exc) else "malformed host"
        raise RedisUnavailable("<unparsable URL>", None, f"invalid Redis URL ({reason})") from None
    if parts.scheme not in _SCHEMES:
        raise RedisUnavailable(
            parts.hostname or "<no host>",
            port,
            f"URL scheme {parts.scheme or '(none)'!r} is not one of {', '.join(_ALL_SCHEMES)}",
        )
    if parts.scheme == "unix":
        if not parts.path:
            raise RedisUnavailable("<no socket path>", None, "unix:// URL has no socket path")
        return ServerAddress(parts.path, None)
    if not parts.hostname:
        raise RedisUnavailable("<no host>", port, "Redis URL has no host")
    return ServerAddress(parts.hostname, port or _DEFAULT_PORT)


# Options of a sentinel URL that are about the sentinels, not the master.
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password", "sentinel_timeout")
# redis-py URL options that take text (the typed ones are in URL_QUERY_ARGUMENT_PARSERS).
_TEXT_OPTIONS = ("client_name",)
_TLS_TEXT_OPTIONS = (
    "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_data", "ssl_ca_path",
    "ssl_ciphers", "ssl_password",
)  # fmt: skip
# Options whose value goes to the sentinel connections as well as the master's, under TLS: one
# CA and client certificate serve the whole deployment.
_SHARED_TLS_OPTIONS = (*_TLS_TEXT_OPTIONS, "ssl_check_hostname", "ssl_min_version")


def _parse_host(spec: str, position: int, count: int) -> ServerAddress:
    """One `host[:port]` (or `[v6]:port`) of a sentinel list; errors name its position only."""
    label = f"sentinel {position} of {count}"
    if spec.startswith("["):
        host, bracket, rest = spec[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            _fail("invalid sentinel URL", f"{label} has a malformed IPv6 address")
        port_text = rest[1:]
    else:
        host, _, port_text = spec.partition(":")
    if not host:
        _fail("invalid sentinel URL", f"{label} has no host")
    if not port_text:
        return ServerAddress(host, _DEFAULT_SENTINEL_PORT)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        _fail(
            "invalid sentinel URL", f"{label} ({host}) has a port that is not a number in 1-65535"
        )
    return ServerAddress(host, int(port_text))


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse a `redis+sentinel://` or `rediss+sentinel://` URL (see the module docstring).

    RedisUnavailable names what is wrong (a sentinel by position, an option by name) and never
    echoes the URL's text, which holds passwords."""
    scheme, _, rest = url.partition("://")
    tls = _SENTINEL_SCHEMES[scheme.lower()]
    rest, _, fragment = rest.partition("#")
    if fragment:
        _fail("invalid sentinel URL", "a '#fragment' is not allowed")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    specs = hosts.split(",")
    sentinels = tuple(_parse_host(s, i + 1, len(specs)) for i, s in enumerate(specs))
    master_name, db = _master_name_and_db(path, sentinels)
    address = SentinelAddress(sentinels, master_name)
    master, sentinel_options = _options(query, tls, address)
    if userinfo:
        user, colon, password = userinfo.partition(":")
        if user:
            master["username"] = unquote(user)
        if colon and password:
            master["password"] = unquote(password)
    if "db" in master:  # as in redis-py, the query's db wins over the path's
        db = int(master.pop("db"))
    return SentinelUrl(address, tls, db, master, _sentinel_kwargs(sentinel_options, master, tls))


def _master_name_and_db(path: str, sentinels: tuple[ServerAddress, ...]) -> tuple[str, int]:
    where = "sentinels " + ",".join(str(s) for s in sentinels)
    segments = [unquote(s) for s in path.split("/")]
    if len(segments) > 1 and segments[-1] == "":
        segments.pop()  # a trailing slash
    if not segments[0]:
        _fail("invalid sentinel URL", "no master name (the path is /<master-name>[/<db>])", where)
    if len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        _fail(
            "invalid sentinel URL",
            "the path after the master name must be a database number: /<master-name>[/<db>]",
            where,
        )
    return segments[0], int(segments[1]) if len(segments) == 2 else 0


def _options(
    query: str, tls: bool, address: SentinelAddress
) -> tuple[dict[str, Any], dict[str, str]]:
    """The query's options: (master connection keyword arguments, sentinel_* options)."""
    master: dict[str, Any] = {}
    sentinel: dict[str, str] = {}
    allowed = {*URL_QUERY_ARGUMENT_PARSERS, *_TEXT_OPTIONS, *(_TLS_TEXT_OPTIONS if tls else ())}
    try:
        options = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        _fail("invalid sentinel URL", "malformed query string", str(address))
    for name, values in options.items():
        value = values[-1]
        if name in _SENTINEL_OPTIONS:
            sentinel[name] = value
        elif name in allowed:
            parser = URL_QUERY_ARGUMENT_PARSERS.get(name)
            try:
                master[name] = parser(value) if parser is not None else value
            except (TypeError, ValueError):
                _fail("invalid sentinel URL", f"option {name!r} has an invalid value", str(address))
        elif name.startswith("ssl_") and not tls:
            _fail("invalid sentinel URL", f"option {name!r} needs rediss+sentinel://", str(address))
        else:
            _fail("invalid sentinel URL", f"unknown option {name!r}", str(address))
    return master, sentinel


def _sentinel_kwargs(options: dict[str, str], master: dict[str, Any], tls: bool) -> dict[str, Any]:
    """Keyword arguments of the connections to the sentinels."""
    timeout_s = SENTINEL_TIMEOUT_S
    if "sentinel_timeout" in options:
        try:
            timeout_s = float(options["sentinel_timeout"])
        except ValueError:
            timeout_s = -1.0
        if not timeout_s > 0:
            _fail("invalid sentinel URL", "sentinel_timeout must be a positive number of seconds")
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": timeout_s,
        "socket_timeout": timeout_s,
        "socket_keepalive": True,
        # One attempt per sentinel: discovery already moves on to the next one, and redis-py's
        # default (ten retries with backoff) would hold every reconnect seconds per dead sentinel.
        "retry": Retry(NoBackoff(), 0),
    }
    if options.get("sentinel_username"):
        kwargs["username"] = options["sentinel_username"]
    if options.get("sentinel_password"):
        kwargs["password"] = options["sentinel_password"]
    if tls:
        kwargs["ssl"] = True
        kwargs.update({k: v for k, v in master.items() if k in _SHARED_TLS_OPTIONS})
    return kwargs


class _HiredisPacking(AbstractConnection):
    """Packs commands with hiredis (C) instead of redis-py's pure-Python packer.

    The store's scripts take hundreds of arguments per batch; redis-py's asyncio connection packs
    each in Python (about 0.6 µs an argument here, 7x hiredis). Its sync connection already uses
    hiredis this way (HiredisRespSerializer); the asyncio one does not, hence this override.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        """redis-py's own, with the write bounded by `asyncio.timeout` instead of
        `asyncio.wait_for`. On Python 3.11, wait_for swallows a cancellation that arrives as the
        awaited write completes, and a write almost always completes at once: a task cancelled
        around a command then runs on as if nothing happened (measured: about half of such
        cancellations were lost), so loops stopped by cancellation never stopped."""
        if not self.is_connected:
            await self.connect_check_health(check_health=False)
        if check_health:
            await self.check_health()  # type: ignore[no-untyped-call]
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            async with asyncio.timeout(self.socket_timeout):
                await self._send_packed_command(command)
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as e:
            await self.disconnect(nowait=True)
            err_no, errmsg = ("UNKNOWN", e.args[0]) if len(e.args) == 1 else e.args[:2]
            raise RedisConnectionError(f"Error {err_no} while writing to socket. {errmsg}.") from e
        except BaseException:
            # As redis-py does: a write cut short leaves the connection unusable.
            await self.disconnect(nowait=True)
            raise


class _FastConnection(_HiredisPacking, Connection):
    pass


class _FastSSLConnection(_HiredisPacking, SSLConnection):
    pass


class _FastUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


_FAST = {
    Connection: _FastConnection,
    SSLConnection: _FastSSLConnection,
    UnixDomainSocketConnection: _FastUnixConnection,
}


class _FastSentinelConnection(_HiredisPacking, SentinelManagedConnection):
    pass


class _FastSentinelSSLConnection(_HiredisPacking, SentinelManagedSSLConnection):
    pass


# Connections one client opens at most. Callers beyond it wait for a free one (a blocking pool):
# redis-py's default pool raises "Too many connections" instead, which a burst of concurrent
# submits or result() calls would hit.
MAX_CONNECTIONS = 64

# What every client's connections share, whatever the URL (a URL's own options win).
_CONNECTION_DEFAULTS: dict[str, Any] = {
    "decode_responses": True,
    "socket_connect_timeout": 5.0,
    "socket_timeout": SOCKET_TIMEOUT_S,
    "socket_keepalive": True,
    "health_check_interval": 30,
}


class SentinelMasterNotFound(MasterNotFoundError):
    """No sentinel named a usable master. `reason` says why, naming sentinels by host:port."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Sentinel(Sentinel):
    """redis-py's Sentinel, with a discovery error that says why no master was found.

    redis-py's own lists the sentinels' errors raw, and lets a sentinel's refusal (NOAUTH, say)
    escape as a ResponseError instead of trying the next sentinel."""

    def __init__(self, address: SentinelAddress, sentinel_kwargs: dict[str, Any]) -> None:
        hosts = [(s.host, s.port) for s in address.sentinels]
        super().__init__(hosts, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
        self.address = address

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        findings: list[tuple[ServerAddress, str]] = []
        for i, sentinel in enumerate(self.sentinels):
            kwargs = sentinel.connection_pool.connection_kwargs
            where = ServerAddress(str(kwargs["host"]), int(kwargs["port"]))
            try:
                masters = await sentinel.sentinel_masters()
            except (AuthenticationError, AuthorizationError):
                findings.append((where, "refused the credentials"))
                continue
            except ResponseError as exc:
                refused = "NOAUTH" in str(exc) or "NOPERM" in str(exc)
                findings.append((where, "refused the credentials" if refused else "refused"))
                continue
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                timed_out = isinstance(exc, RedisTimeoutError)
                findings.append((where, "timed out" if timed_out else "unreachable"))
                continue
            # redis-py types the reply as a dict or a list (of states with their names).
            by_name = masters if isinstance(masters, dict) else {m["name"]: m for m in masters}
            state = by_name.get(service_name)
            if state is None:
                findings.append((where, "does not know it"))
            elif self.check_master_state(state, service_name):
                # Ask this sentinel first next time, as redis-py does.
                self.sentinels[0], self.sentinels[i] = sentinel, self.sentinels[0]
                return str(state["ip"]), int(state["port"])
            else:
                findings.append((where, "reports it down"))
        raise SentinelMasterNotFound(_no_master_reason(service_name, findings))


def _no_master_reason(name: str, findings: list[tuple[ServerAddress, str]]) -> str:
    kinds = {finding for _, finding in findings}
    if kinds <= {"unreachable", "timed out"}:
        summary = "no sentinel reachable"
    elif "reports it down" in kinds:
        summary = f"the sentinels report master {name!r} down (a failover may be under way)"
    elif kinds <= {"does not know it", "unreachable", "timed out"}:
        summary = f"no sentinel knows a master named {name!r}"
    elif "refused the credentials" in kinds:
        summary = "a sentinel refused the credentials (check sentinel_username/sentinel_password)"
    else:
        summary = f"no sentinel names a master {name!r}"
    detail = ", ".join(f"{where} {finding}" for where, finding in findings)
    return f"{summary} ({detail})"


# How often, at most, a sentinel pool asks the sentinels whether the master moved while its
# connections stay open (in the background, when a connection is taken from the pool). redis-py
# asks only when it opens a connection: after a manual failover or a partition, connections to an
# old master that is still alive keep writing to it until the sentinels demote it, about 10 s
# later (measured), and every write it acknowledges meanwhile is lost.
MASTER_CHECK_S = 1.0


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """redis-py's SentinelConnectionPool (asks the sentinels for the master on every connect,
    drops idle connections when the master changes), waiting for a free connection as the
    plain URLs' BlockingConnectionPool does, closing its sentinel connections with itself, and
    dropping every connection, busy ones included, once the sentinels name another master."""

    sentinel_manager: _Sentinel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._checked_at = -MASTER_CHECK_S
        self._check: asyncio.Task[None] | None = None

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_check_master()
        return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]

    def _maybe_check_master(self) -> None:
        now = time.monotonic()
        if self.master_address is None or now - self._checked_at < MASTER_CHECK_S:
            return
        if self._check is None or self._check.done():
            self._checked_at = now
            self._check = asyncio.create_task(self._check_master(), name="bilevel-master-check")

    async def _check_master(self) -> None:
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
            # No answer now: the next check, or the next connect, asks again.
            await self.get_master_address()

    async def get_master_address(self) -> tuple[str, int]:
        """The master the sentinels name. redis-py's drops idle connections to another server;
        this drops busy ones too: they error now instead of at the old master's demotion (a
        BLPOP blocked there would never see a push to the new one)."""
        address: tuple[str, int] = await super().get_master_address()  # type: ignore[no-untyped-call]
        stale = [
            conn
            for conn in [*self._available_connections, *self._in_use_connections]
            if conn.is_connected
            and (getattr(conn, "host", None), getattr(conn, "port", None)) != address
        ]
        await asyncio.gather(*(conn.disconnect() for conn in stale), return_exceptions=True)
        return address

    async def aclose(self) -> None:
        if self._check is not None:
            self._check.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._check
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()


def client_from_url(url: str, *, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    """An asyncio Redis client for `url` (no I/O yet). Responses are decoded to str.

    For a sentinel URL the client's pool asks the sentinels for the current master each time it
    opens a connection, and at most every MASTER_CHECK_S while connections stay open. A
    connection to a master that died, or that the sentinels replaced, raises ConnectionError on
    its next use (a demoted master's ReadOnlyError becomes one too), and a command blocked on it
    (BLPOP) raises at once: callers that retry a ConnectionError reach the new master."""
    address = parse_address(url)
    if isinstance(address, SentinelAddress):
        return _sentinel_client(parse_sentinel_url(url), max_connections)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        **_CONNECTION_DEFAULTS,
        max_connections=max_connections,
        # Wait for a free connection as long as a command may take.
        timeout=SOCKET_TIMEOUT_S,
    )
    pool.connection_class = _FAST.get(pool.connection_class, pool.connection_class)
    # from_pool: the client owns the pool and closes it with itself.
    return aioredis.Redis.from_pool(pool)


def _sentinel_client(parsed: SentinelUrl, max_connections: int) -> aioredis.Redis:
    kwargs: dict[str, Any] = {
        **_CONNECTION_DEFAULTS,
        "max_connections": max_connections,
        "timeout": SOCKET_TIMEOUT_S,
        **parsed.master_kwargs,
        "db": parsed.db,
    }
    sentinel = _Sentinel(parsed.address, parsed.sentinel_kwargs)
    pool = _BlockingSentinelPool(
        parsed.address.master_name,
        sentinel,
        connection_class=_FastSentinelSSLConnection if parsed.tls else _FastSentinelConnection,
        **kwargs,
    )
    return aioredis.Redis.from_pool(pool)


async def check_connection(client: aioredis.Redis, url: str) -> None:
    """PING the server; turn failures into RedisUnavailable naming host and port only (for a
    sentinel URL: the sentinels, and the master they named)."""
    address = parse_address(url)
    if isinstance(address, SentinelAddress):
        host, port = str(address), None
    else:
        host, port = address.host, address.port
    try:
        await client.ping()
    except SentinelMasterNotFound as exc:
        raise RedisUnavailable(host, port, exc.reason) from None
    except (AuthenticationError, AuthorizationError):
        reason = "authentication failed (check the user and password)"
        raise RedisUnavailable(host, port, _at_master(client, reason)) from None
    except ResponseError as exc:
        reason = "authentication required" if "NOAUTH" in str(exc) else "server refused PING"
        raise RedisUnavailable(host, port, _at_master(client, reason)) from None
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        kind = "timed out" if isinstance(exc, RedisTimeoutError) else "connection failed"
        raise RedisUnavailable(host, port, _at_master(client, kind)) from None


def _at_master(client: aioredis.Redis, reason: str) -> str:
    """`reason`, naming the master a sentinel pool was sent to (a plain URL names it already)."""
    pool = client.connection_pool
    if isinstance(pool, _BlockingSentinelPool) and pool.master_address is not None:
        host, port = pool.master_address
        return f"{reason} at the master, {ServerAddress(host, port)}"
    return reason
