"""Waiting for many job results over one Redis connection.

Each waiting client registers its jobs with its client id (watch.lua); when a job finishes, the
finishing script pushes the job id to the inbox list of every client waiting on it. One dispatcher
task per client blocks on that inbox and resolves the futures of the jobs it names. So a client
awaiting a thousand results holds one blocked connection, not a thousand, and nothing polls.

A lost connection can lose a notice: one the server popped for a reply that never arrived, or an
inbox a restarted server no longer holds. So after any connection error the dispatcher, once it
gets through again, watches every job it still waits for anew (which also re-registers them) and
resolves those that finished meanwhile; nothing that finished while it was cut off is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Sequence

import redis.asyncio as aioredis

from scheduler.connection import MAX_BLOCK_S
from scheduler.logs import get_logger
from scheduler.retry import Backoff, describe, is_transient

log = get_logger("bilevel.waiter")

# watch(job_ids, client_id) -> status per job (None: no such job).
Watch = Callable[[Sequence[str], str], Awaitable[list[str | None]]]

_FINISHED = frozenset({"succeeded", "dead", "cancelled"})

# (status, result JSON) carried by a finish notice.
Delivered = tuple[str, str]


def _parse_notice(notice: str) -> tuple[str, Delivered | None]:
    """A notice is a job id, or "id\nstatus\nresult JSON" when the result was small."""
    job_id, sep, rest = notice.partition("\n")
    if not sep:
        return job_id, None
    status, _, result = rest.partition("\n")
    return job_id, (status, result)


class ResultWaiter:
    """Futures for job completions, fed from this client's inbox."""

    def __init__(
        self,
        redis: aioredis.Redis,
        inbox_key: Callable[[str], str],
        watch: Watch,
        *,
        backoff: Backoff | None = None,
    ) -> None:
        self.redis = redis
        # Random per client: two clients never share an inbox.
        self.client_id = os.urandom(8).hex()
        self._inbox = inbox_key(self.client_id)
        self._watch = watch
        self._backoff = backoff or Backoff()
        self._futures: dict[str, list[asyncio.Future[Delivered | None]]] = {}
        self._task: asyncio.Task[None] | None = None
        # Times the dispatcher got through again after a connection error (for tests and status).
        self.recoveries = 0

    async def wait(
        self, job_ids: Sequence[str], timeout_s: float | None
    ) -> list[str | Delivered | None]:
        """Block until every job of `job_ids` has finished; TimeoutError after `timeout_s`.
        Returns, per job: the status `watch` saw when it was already finished (None for no such
        job); or, for a job this call waited on, the (status, result JSON) its notice carried,
        or "" when the notice carried no result (read it from the record)."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Delivered | None]] = [loop.create_future() for _ in job_ids]
        # Registered before watch runs, so a finish right after the watch cannot be missed.
        for job_id, future in zip(job_ids, futures, strict=True):
            self._futures.setdefault(job_id, []).append(future)
        try:
            statuses = await self._watch(job_ids, self.client_id)
            pending = [
                f
                for f, s in zip(futures, statuses, strict=True)
                if s is not None and s not in _FINISHED
            ]
            if pending:
                self._ensure_dispatcher()
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation
                # of the caller that arrives as the results do.
                async with asyncio.timeout(timeout_s):
                    await asyncio.gather(*pending)
            out: list[str | Delivered | None] = []
            for status, future in zip(statuses, futures, strict=True):
                if status is None or status in _FINISHED:
                    out.append(status)
                else:
                    out.append(future.result() or "")
            return out
        finally:
            for job_id, future in zip(job_ids, futures, strict=True):
                self._forget(job_id, future)

    def _forget(self, job_id: str, future: asyncio.Future[Delivered | None]) -> None:
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
        failures = 0
        while self._futures:
            try:
                if failures:
                    await self._recheck()
                    failures = 0
                    self.recoveries += 1
                await self._deliver_next()
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.warning("result_wait_interrupted", error=describe(exc))
                if not is_transient(exc):
                    log.exception("result_wait_failed")
                await asyncio.sleep(self._backoff.delay_s(failures))

    async def _deliver_next(self) -> None:
        got = await self.redis.blpop([self._inbox], timeout=MAX_BLOCK_S)
        if got is None:
            return
        # With other waits pending, collect what else arrived in one more round trip; a lone
        # wait skips it (it would only add latency).
        rest = await self.redis.lpop(self._inbox, 1000) if len(self._futures) > 1 else None
        for notice in [got[1], *(rest or [])]:
            job_id, delivered = _parse_notice(notice)
            self._resolve(job_id, delivered)

    async def _recheck(self) -> None:
        """Watch every awaited job again: re-registers them (a restarted server may have lost the
        registrations) and resolves those already finished (their notices may be lost)."""
        job_ids = list(self._futures)
        statuses = await self._watch(job_ids, self.client_id)
        for job_id, status in zip(job_ids, statuses, strict=True):
            if status is None or status in _FINISHED:
                # No notice payload: the waiter reads the outcome from the record (or finds the
                # job gone and says so).
                self._resolve(job_id, None)

    def _resolve(self, job_id: str, delivered: Delivered | None) -> None:
        for future in self._futures.get(job_id, ()):
            if not future.done():
                future.set_result(delivered)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
