"""Opening Redis connections from settings, with errors that name the server but never a secret."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.exceptions import AuthenticationError, AuthorizationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from scheduler.errors import RedisUnavailable

_SCHEMES = ("redis", "rediss", "unix")
_DEFAULT_PORT = 6379

# Reads give up after this long, so a dead server or network is noticed rather than waited on.
SOCKET_TIMEOUT_S = 30.0
# Blocking commands (BLPOP, BLMOVE) wait at most this long per call, well inside the socket
# timeout; a longer wait loops. (redis-py's own default socket timeout is 5 s, which a 5 s block
# would race.)
MAX_BLOCK_S = 5.0


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """Host and port of a Redis URL; safe to print."""

    host: str
    port: int | None

    def __str__(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"


def parse_address(url: str) -> ServerAddress:
    """Validate a Redis URL's shape and return where it points; errors never echo the URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RedisUnavailable("<unparsable URL>", None, f"invalid Redis URL ({exc})") from None
    if parts.scheme not in _SCHEMES:
        raise RedisUnavailable(
            parts.hostname or "<no host>",
            port,
            f"URL scheme {parts.scheme or '(none)'!r} is not one of {', '.join(_SCHEMES)}",
        )
    if parts.scheme == "unix":
        if not parts.path:
            raise RedisUnavailable("<no socket path>", None, "unix:// URL has no socket path")
        return ServerAddress(parts.path, None)
    if not parts.hostname:
        raise RedisUnavailable("<no host>", port, "Redis URL has no host")
    return ServerAddress(parts.hostname, port or _DEFAULT_PORT)


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


# Connections one client opens at most. Callers beyond it wait for a free one (a blocking pool):
# redis-py's default pool raises "Too many connections" instead, which a burst of concurrent
# submits or result() calls would hit.
MAX_CONNECTIONS = 64


def client_from_url(url: str, *, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    """An asyncio Redis client for `url` (no I/O yet). Responses are decoded to str."""
    parse_address(url)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=5.0,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_keepalive=True,
        health_check_interval=30,
        max_connections=max_connections,
        # Wait for a free connection as long as a command may take.
        timeout=SOCKET_TIMEOUT_S,
    )
    pool.connection_class = _FAST.get(pool.connection_class, pool.connection_class)
    # from_pool: the client owns the pool and closes it with itself.
    return aioredis.Redis.from_pool(pool)


async def check_connection(client: aioredis.Redis, url: str) -> None:
    """PING the server; turn failures into RedisUnavailable naming host and port only."""
    address = parse_address(url)
    try:
        await client.ping()
    except (AuthenticationError, AuthorizationError):
        raise RedisUnavailable(
            address.host, address.port, "authentication failed (check the user and password)"
        ) from None
    except ResponseError as exc:
        reason = "authentication required" if "NOAUTH" in str(exc) else "server refused PING"
        raise RedisUnavailable(address.host, address.port, reason) from None
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        kind = "timed out" if isinstance(exc, RedisTimeoutError) else "connection failed"
        raise RedisUnavailable(address.host, address.port, kind) from None
