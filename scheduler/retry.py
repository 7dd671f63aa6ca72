"""Riding out Redis outages: which errors are transient, and bounded retries with backoff.

A Redis restart, a Sentinel failover or a dropped connection shows up as a connection error on the
next command; redis-py reconnects on the command after it (our pools retry nothing themselves, so
no script ever runs twice behind our back). Whoever may safely repeat a call retries it here, with
capped exponential backoff and jitter, so a thousand clients that lost Redis together do not
come back in step. The cap is small (1 s): a loop whose Redis came back resumes within a second.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from scheduler.errors import RedisUnavailable
from scheduler.logs import get_logger

T = TypeVar("T")

log = get_logger("bilevel.retry")

# Errors that say "the server is not reachable (or not the master) right now", not "this call is
# wrong". READONLY is what a client still connected to a demoted master gets after a failover;
# LOADING what a restarted server answers while it reads its append-only file. (redis-py wraps
# socket errors in its own ConnectionError and TimeoutError; the built-in TimeoutError is left
# out on purpose: it is what a caller's own asyncio.timeout raises.)
_TRANSIENT: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    ReadOnlyError,
    TryAgainError,
)
# Server replies that mean "not now" during a failover: a master refusing writes without enough
# replicas (min-replicas-to-write), a replica that lost its master, a blocked command released
# because the server changed role, a server still loading its data.
_TRANSIENT_REPLIES = ("READONLY", "NOREPLICAS", "MASTERDOWN", "UNBLOCKED", "LOADING", "TRYAGAIN")
# Connection errors by type, but a retry cannot fix them: the credentials are wrong.
_PERMANENT: tuple[type[BaseException], ...] = (AuthenticationError, AuthorizationError)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same call later may succeed (an outage, not a bad call)."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, RedisUnavailable):
        # Raised by check_connection for an unreachable server; its reason says which.
        return "authentication" not in str(exc)
    if isinstance(exc, _TRANSIENT):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_TRANSIENT_REPLIES)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter: attempt n waits uniform(c/2, c), c = min(cap, base·2^n).

    The random half spreads the retries of clients that failed together over the interval, which
    keeps a restarted server from a thundering herd; the fixed half keeps a retry from coming
    back at once.
    """

    base_s: float = 0.05
    cap_s: float = 1.0
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def delay_s(self, attempt: int) -> float:
        ceiling = min(self.cap_s, self.base_s * 2.0 ** max(0, attempt))
        return self.rng.uniform(0.5 * ceiling, ceiling)


def describe(exc: BaseException) -> str:
    """A short, secret-free description of a transient error for logs and messages."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# One warning per kind of call per this many seconds: a client awaiting a thousand results that
# loses Redis would otherwise log a thousand identical lines.
_WARN_EVERY_S = 5.0
_last_warned: dict[str, float] = {}


def _first_in_a_while(what: str, now: float) -> bool:
    last = _last_warned.get(what)
    if last is not None and now - last < _WARN_EVERY_S:
        return False
    _last_warned[what] = now
    return True


@dataclass(frozen=True, slots=True)
class OutageRetry:
    """Retries a call that is safe to repeat while Redis is unreachable, for at most `within_s`;
    then raises RedisUnavailable naming `where` (host and port, never a secret).

    `within_s` = 0 tries once and turns a transient error straight into RedisUnavailable.
    """

    where: str
    within_s: float = 10.0
    backoff: Backoff = field(default_factory=Backoff)
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def call(
        self, op: Callable[[], Awaitable[T]], what: str, *, deadline_s: float | None = None
    ) -> T:
        """`await op()`, retried on transient errors until it succeeds, `within_s` has passed, or
        the monotonic `deadline_s` (a caller's own timeout) is near; other errors pass through."""
        started = self.monotonic()
        give_up = started + self.within_s
        if deadline_s is not None:
            give_up = min(give_up, deadline_s)
        attempt = 0
        while True:
            try:
                return await op()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                attempt += 1
                delay = self.backoff.delay_s(attempt)
                if self.monotonic() + delay > give_up:
                    waited = self.monotonic() - started
                    raise RedisUnavailable(
                        self.where,
                        None,
                        f"{what} failed for {waited:.1f} s ({attempt} attempts): {describe(exc)}",
                    ) from None
                if attempt == 1 and _first_in_a_while(what, self.monotonic()):
                    log.warning("redis_retrying", what=what, error=describe(exc))
                await self.sleep(delay)


__all__ = ["Backoff", "OutageRetry", "describe", "is_transient"]
