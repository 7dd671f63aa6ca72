"""Waiting for many job results over one Redis connection.

Each waiting `result()` registers its job with this client's id (watch.lua); when the job finishes,
the finishing script pushes the job id to the client's inbox list. One dispatcher task per client
blocks on that inbox and resolves the futures of the jobs it names. So a client awaiting a thousand
results holds one blocked connection, not a thousand, and nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from scheduler.connection import MAX_BLOCK_S

Watch = Callable[[str, str], Awaitable[str | None]]


class ResultWaiter:
    """Futures for job completions, fed from this client's inbox."""

    def __init__(self, redis: aioredis.Redis, inbox_key: Callable[[str], str]) -> None:
        self.redis = redis
        # Random per client: two clients never share an inbox.
        self.client_id = os.urandom(8).hex()
        self._inbox = inbox_key(self.client_id)
        self._futures: dict[str, list[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def wait(self, job_id: str, watch: Watch, timeout_s: float | None) -> str | None:
        """Block until `job_id` finishes. `watch(job_id, client_id)` registers this client and
        returns the job's status (None: no such job); returns that status when the job is already
        finished or missing, else None once it has finished. TimeoutError after `timeout_s`."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Registered before watch runs, so a finish right after the watch cannot be missed.
        self._futures.setdefault(job_id, []).append(future)
        try:
            status = await watch(job_id, self.client_id)
            if status is not None and not _finished(status):
                self._ensure_dispatcher()
                await asyncio.wait_for(future, timeout_s)
                return None
            return status
        finally:
            self._forget(job_id, future)

    def _forget(self, job_id: str, future: asyncio.Future[None]) -> None:
        waiting = self._futures.get(job_id)
        if waiting is not None:
            with contextlib.suppress(ValueError):
                waiting.remove(future)
            if not waiting:
                del self._futures[job_id]

    def _ensure_dispatcher(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(
                self._dispatch(), name=f"bilevel-inbox-{self.client_id}"
            )

    async def _dispatch(self) -> None:
        # Runs only while somebody waits: an idle client holds no blocked connection.
        while self._futures:
            got = await self.redis.blpop([self._inbox], timeout=MAX_BLOCK_S)
            if got is None:
                continue
            # Drain what else arrived in the same round trip.
            rest = await self.redis.lpop(self._inbox, 1000)
            for job_id in [got[1], *(rest or [])]:
                for future in self._futures.get(job_id, ()):
                    if not future.done():
                        future.set_result(None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None


def _finished(status: Any) -> bool:
    return status in ("succeeded", "dead", "cancelled")
