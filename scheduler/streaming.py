"""The client's iterators over a streaming job's chunks: `handle.stream()`.

    async for chunk in handle.stream():        # AsyncJobHandle
        if isinstance(chunk, StreamRestart):   # the job started over on another worker
            text = ""                          # what it had streamed is void
            continue
        text += chunk
    result = await handle                      # the final result, as handle.result()

    for chunk in client.submit("generate", {...}).stream(): ...   # JobHandle, the same

Each read is one XREAD BLOCK on the job's stream, in blocks of at most MAX_BLOCK_S: the append
wakes the reader, nothing polls. A reader holds one connection of its client's pool while it waits
(results share one; streams do not). A lost connection is retried like every client call (up to
Settings.outage_retry_s) and the read resumes after the last entry id it saw: no chunk is skipped,
and none is given twice. After a connection error, and after every block that brought nothing, the
reader checks the job's record again (stream_watch), so a job that finished without a terminal
entry (a Redis that restarted without its data) still ends its stream.

At the end the iterator stops when the job succeeded, or raises what result() would: JobFailed,
JobCancelled. StreamTruncated says the reader missed chunks (trimmed by the cap); StreamRestart
comes in line; JobTimeout when `timeout` passes first (the job goes on). See scheduler.streams for
the semantics of worker death, cancellation and the cap.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

from scheduler.connection import MAX_BLOCK_S
from scheduler.errors import JobNotFound, JobTimeout, StreamTruncated
from scheduler.models import JobStatus
from scheduler.retry import OutageRetry
from scheduler.store import Outcome, Store
from scheduler.streams import End, Gap, StreamCursor, StreamRestart

# Entries per XREAD: a reader that is behind catches up in few round trips.
READ_COUNT = 1000


class AsyncChunkStream:
    """Async iterator over one job's chunks (values of any JSON type, and StreamRestart markers).
    `attempt` is the attempt whose chunks it is giving (None before the first)."""

    def __init__(
        self,
        job_id: str,
        store: Callable[[], Store],
        retry: Callable[[], OutageRetry],
        outcome_of: Callable[[Outcome], Any],
        timeout: float | None = None,
    ) -> None:
        self.job_id = job_id
        self._store = store
        self._retry = retry
        self._outcome_of = outcome_of
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._cursor = StreamCursor()
        self._events: deque[Any] = deque()
        # Whether the record must be checked (again) before the next read: at the start, after a
        # connection error, after a block that brought nothing.
        self._check = True
        self._job_finished = False
        self._done = False
        # Round trips made (reads and checks), for tests and measurements.
        self.round_trips = 0

    @property
    def attempt(self) -> int | None:
        return self._cursor.attempt

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        while not self._events:
            if self._done:
                raise StopAsyncIteration
            await self._fill()
        return self._deliver(self._events.popleft())

    async def take(self) -> list[Any]:
        """Every event buffered now (reading when none is), undelivered: for the sync iterator,
        which delivers them with `deliver` on its own thread. [] once the stream has ended."""
        while not self._events and not self._done:
            await self._fill()
        out = list(self._events)
        self._events.clear()
        return out

    def deliver(self, event: Any) -> Any:
        """An event as the iterator gives it: a chunk value or StreamRestart; raises for a gap, an
        end (StopIteration-like `_Ended`, or the job's failure)."""
        return self._deliver(event)

    def _deliver(self, event: Any) -> Any:
        if isinstance(event, Gap):
            raise StreamTruncated(self.job_id, event.missed, event.reason)
        if isinstance(event, _Ended):
            self._done = True
            if event.error is not None:
                raise event.error
            raise StopAsyncIteration
        return event

    async def _fill(self) -> None:
        events = await self._retry().call(self._read, "reading a stream", deadline_s=self._deadline)
        for event in events:
            if isinstance(event, End):
                self._events.append(await self._ended(event.status))
                self._done_reading()
                return
            self._events.append(event)

    def _done_reading(self) -> None:
        # Nothing is read after the end; buffered events are still delivered.
        self._check = False
        self._job_finished = True
        self._cursor.ended = True

    async def _read(self) -> list[Any]:
        """One round trip or two: the record's check when due, then one read of the stream."""
        store = self._store()
        try:
            if self._check:
                self.round_trips += 1
                status = await store.stream_watch(self.job_id)
                if status is None:
                    raise JobNotFound(self.job_id)
                self._check = False
                self._job_finished = status.finished
            block_s = None if self._job_finished else self._block_s()
            self.round_trips += 1
            entries = await store.stream_read(
                self.job_id, self._cursor.last_id, block_s=block_s, count=READ_COUNT
            )
        except Exception:
            self._check = True
            raise
        events = self._cursor.feed(entries)
        if not entries:
            if self._job_finished:
                # Finished, and the stream holds no end (it never streamed and nobody waited
                # before it finished, or its stream is gone): end by the record's outcome.
                outcome = await store.outcome(self.job_id)
                return [End(outcome.status, self._cursor.attempt or 0)]
            self._check = True
        return events

    def _block_s(self) -> float:
        if self._deadline is None:
            return MAX_BLOCK_S
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise JobTimeout(self.job_id, self._timeout or 0.0)
        return min(MAX_BLOCK_S, left)

    async def _ended(self, status: JobStatus) -> _Ended:
        if status is JobStatus.SUCCEEDED:
            return _Ended(None)
        outcome = await self._retry().call(
            lambda: self._store().outcome(self.job_id), "reading a result"
        )
        try:
            self._outcome_of(outcome)
        except Exception as exc:
            return _Ended(exc)
        return _Ended(None)


class _Ended:
    """The end of the iteration: stop, or raise `error`."""

    __slots__ = ("error",)

    def __init__(self, error: Exception | None) -> None:
        self.error = error


class ChunkStream:
    """The synchronous face of AsyncChunkStream: each read runs on the client's loop thread, and
    fetches every event buffered then, so a fast stream costs one thread hop per batch."""

    def __init__(
        self, inner: AsyncChunkStream, run: Callable[[Coroutine[Any, Any, Any]], Any]
    ) -> None:
        self._inner = inner
        self._run = run
        self._events: deque[Any] = deque()

    @property
    def job_id(self) -> str:
        return self._inner.job_id

    @property
    def attempt(self) -> int | None:
        return self._inner.attempt

    @property
    def round_trips(self) -> int:
        return self._inner.round_trips

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if not self._events:
            self._events.extend(self._run(self._inner.take()))
            if not self._events:
                raise StopIteration
        try:
            return self._inner.deliver(self._events.popleft())
        except StopAsyncIteration:
            raise StopIteration from None


__all__ = ["AsyncChunkStream", "ChunkStream", "StreamRestart"]
