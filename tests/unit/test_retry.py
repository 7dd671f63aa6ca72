"""Riding out Redis outages: what counts as transient, and the bounded retry."""

from __future__ import annotations

import asyncio
import random

import pytest
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from scheduler.errors import RedisUnavailable
from scheduler.retry import Backoff, OutageRetry, is_transient
from tests.conftest import ManualClock


class TestTransient:
    @pytest.mark.parametrize(
        "exc",
        [
            RedisConnectionError("Connection closed by server."),
            RedisTimeoutError("Timeout reading from socket"),
            BusyLoadingError("Redis is loading the dataset in memory"),
            ReadOnlyError("You can't write against a read only replica."),
            ResponseError("NOREPLICAS Not enough good replicas to write."),
            ResponseError(
                "UNBLOCKED force unblock from blocking operation, instance state changed"
            ),
            RedisUnavailable("127.0.0.1", 6379, "connection failed"),
        ],
    )
    def test_outages_are_transient(self, exc: Exception) -> None:
        """A restart, a load after restart, a demoted master: retrying later may succeed."""
        assert is_transient(exc)

    @pytest.mark.parametrize(
        "exc",
        [
            AuthenticationError("invalid password"),
            RedisUnavailable("127.0.0.1", 6379, "authentication failed (check the user)"),
            ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
            TimeoutError(),  # a caller's own asyncio.timeout, not the server
            ValueError("bad"),
        ],
    )
    def test_bad_calls_are_not(self, exc: Exception) -> None:
        """Wrong credentials, wrong data and the caller's own timeout are not retried."""
        assert not is_transient(exc)


class TestBackoff:
    def test_delays_grow_to_the_cap_and_never_vanish(self) -> None:
        """Each delay lies in [c/2, c] for c = min(cap, base*2^n): jittered, bounded, never 0."""
        backoff = Backoff(base_s=0.05, cap_s=1.0, rng=random.Random(3))
        for attempt in range(1, 20):
            ceiling = min(1.0, 0.05 * 2**attempt)
            assert ceiling / 2 <= backoff.delay_s(attempt) <= ceiling


class TestOutageRetry:
    def make(self, clock: ManualClock, within_s: float = 10.0) -> OutageRetry:
        async def sleep(seconds: float) -> None:
            clock.advance(seconds)

        return OutageRetry("127.0.0.1:6379", within_s, monotonic=clock, sleep=sleep)

    def test_succeeds_once_the_outage_ends(self, clock: ManualClock) -> None:
        """Transient failures are retried until the call goes through."""
        calls = 0

        async def op() -> str:
            nonlocal calls
            calls += 1
            if clock() < 1_800_000_003.0:
                raise RedisConnectionError("Error 111 connecting")
            return "ok"

        assert asyncio.run(self.make(clock).call(op, "submit")) == "ok"
        assert calls > 3

    def test_gives_up_after_the_bound_naming_the_server(self, clock: ManualClock) -> None:
        """Past `within_s` it raises RedisUnavailable with host, port, what and why."""

        async def op() -> None:
            raise RedisConnectionError("Connection closed by server.")

        with pytest.raises(RedisUnavailable) as info:
            asyncio.run(self.make(clock, within_s=10.0).call(op, "submit"))
        message = str(info.value)
        assert "127.0.0.1:6379" in message
        assert "submit failed for" in message
        assert "Connection closed by server." in message
        assert clock() - 1_800_000_000.0 <= 10.0

    def test_zero_bound_fails_at_once(self, clock: ManualClock) -> None:
        """within_s=0 tries once and reports the outage as RedisUnavailable."""
        calls = 0

        async def op() -> None:
            nonlocal calls
            calls += 1
            raise RedisConnectionError("down")

        with pytest.raises(RedisUnavailable):
            asyncio.run(self.make(clock, within_s=0.0).call(op, "read"))
        assert calls == 1

    def test_other_errors_pass_through_untouched(self, clock: ManualClock) -> None:
        """A bad call is the caller's error, raised as is and not retried."""
        calls = 0

        async def op() -> None:
            nonlocal calls
            calls += 1
            raise ResponseError("ERR bad")

        with pytest.raises(ResponseError):
            asyncio.run(self.make(clock).call(op, "read"))
        assert calls == 1

    def test_a_callers_deadline_bounds_the_retries(self, clock: ManualClock) -> None:
        """With a deadline sooner than the bound, the retries stop at the deadline."""

        async def op() -> None:
            raise RedisConnectionError("down")

        with pytest.raises(RedisUnavailable):
            asyncio.run(self.make(clock).call(op, "wait", deadline_s=clock() + 2.0))
        assert clock() - 1_800_000_000.0 <= 2.0
