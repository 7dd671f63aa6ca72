"""Leader locks in Redis: one holder per role (router, controller) per namespace.

A lock is a key holding the holder's random token with a TTL. `acquire` is SET NX PX; `renew` and
`release` run scheduler/lua/leader.lua, which compares the token before it extends or deletes, so a
process whose lock lapsed can never touch the lock another process took since. A standby polls
`acquire` every `renew_interval_s` and takes over at most that long after the holder's TTL lapses.

Why the loops stay safe without fencing tokens: the router's only write (enqueue) is refused by the
store for a job that is no longer pending, and the controller acts on its own worker pool, so two
processes that both believe they lead for a moment cannot lose or duplicate a job.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from scheduler.codes import Code
from scheduler.keys import Keys
from scheduler.logs import get_logger
from scheduler.scripts import script_source
from scheduler.service.health import Progress

log = get_logger("bilevel.leader")

# A renewal every third of the TTL survives two lost renewals in a row before the lock lapses.
_RENEWALS_PER_TTL = 3


class LeaderLock:
    """One process's claim on the leader lock of `role` in a namespace.

    `held` is this process's belief, updated by every acquire, renew and release; it turns False
    as soon as a renewal finds the lock gone or taken, and also (without a round trip) once the
    TTL has passed since the last successful renewal, so a holder cut off from Redis stops acting
    before anyone else can take over.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        role: str,
        *,
        ttl_s: float = 10.0,
        token: str | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.redis = redis
        self.keys = keys
        self.role = role
        self.key = keys.leader(role)
        self.ttl_s = ttl_s
        self.token = token or secrets.token_hex(16)
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._script = redis.register_script(script_source("leader"))
        self._monotonic = monotonic or time.monotonic
        # When our claim lapses by our own clock (started before the round trip, so it errs early).
        self._valid_until = 0.0
        # Marked by every election step that reached Redis, so a keeper that is stuck shows.
        self.progress = Progress()

    @property
    def renew_interval_s(self) -> float:
        """How often the holder renews and a standby retries: well inside the TTL."""
        return self.ttl_s / _RENEWALS_PER_TTL

    @property
    def held(self) -> bool:
        return self._monotonic() < self._valid_until

    async def acquire(self) -> bool:
        """Take the lock if it is free (or already ours); True when this process now holds it."""
        started = self._monotonic()
        if await self.redis.set(self.key, self.token, nx=True, px=self._ttl_ms):
            self._valid_until = started + self.ttl_s
            log.info("leader_acquired", role=self.role, token=self.token[:8])
            return True
        # Ours already (e.g. acquire called twice): a renewal confirms and extends it.
        return await self.renew()

    async def renew(self) -> bool:
        """Extend our lock by the TTL; False (and `held` False) when it is no longer ours."""
        started = self._monotonic()
        code = Code(
            int(
                await self._script(
                    keys=[self.keys.prefix], args=[self.role, "renew", self.token, self._ttl_ms]
                )
            )
        )
        if code is Code.OK:
            self._valid_until = started + self.ttl_s
            return True
        if self._valid_until > 0.0:
            log.warning("leader_lost", role=self.role, token=self.token[:8])
        self._valid_until = 0.0
        return False

    async def release(self) -> bool:
        """Delete the lock if it is ours, so a standby takes over at once; True if it was."""
        self._valid_until = 0.0
        code = Code(
            int(
                await self._script(
                    keys=[self.keys.prefix], args=[self.role, "release", self.token, 0]
                )
            )
        )
        if code is Code.OK:
            log.info("leader_released", role=self.role, token=self.token[:8])
        return code is Code.OK

    async def holder(self) -> str | None:
        """The token of the current holder, if any (for status and tests)."""
        value = await self.redis.get(self.key)
        return None if value is None else str(value)

    async def step(self) -> bool:
        """One election step: renew when holding, try to acquire when not; returns `held`.
        An error counts as a failed step (the claim then lapses by the clock); it never raises."""
        try:
            if self._valid_until > 0.0:
                await self.renew()
            if self._valid_until <= 0.0:
                await self.acquire()
            self.progress.mark()
        except Exception as exc:
            # Never raised: a keeper that dies leaves its role unable to lead again.
            if not isinstance(exc, RedisError | OSError):
                log.exception("leader_step_error", role=self.role)
            elif self.progress.failures == 0:
                log.warning("leader_step_failed", role=self.role, error=str(exc))
            self.progress.failed(exc)
        return self.held

    async def keep(
        self, stop: asyncio.Event, on_change: Callable[[bool], None] | None = None
    ) -> None:
        """Campaign and renew every `renew_interval_s` until `stop` is set, then release.

        `on_change(held)` is called whenever leadership is gained or lost, so a loop can start or
        stop its work at once instead of discovering it on its next step. Cancelled without
        `stop` (a watchdog replacing a stuck keeper), it neither releases nor reports a loss: the
        next keeper of this lock renews the same claim.
        """
        was_held = False
        try:
            while not stop.is_set():
                now_held = await self.step()
                if now_held != was_held and on_change is not None:
                    on_change(now_held)
                was_held = now_held
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.renew_interval_s)
        finally:
            if stop.is_set():
                if self._valid_until > 0.0:
                    with contextlib.suppress(RedisError, OSError):
                        await self.release()
                if was_held and on_change is not None:
                    on_change(False)


__all__ = ["LeaderLock"]
