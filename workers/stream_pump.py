"""Running a streaming handler's generator on the worker's handler thread, and handing its chunks
to the event loop that ships them to Redis.

`pump` pulls chunks from the generator on the handler thread, encodes and checks each (strict JSON,
at most Settings.stream_max_chunk_bytes) and puts it into a `ChunkPipe`; the worker's event loop
takes what has accumulated and appends it in one round trip (ModelWorker._ship). The pipe is
bounded, so a generator faster than Redis waits instead of filling the worker's memory (its
chunks are held until a whole outage is ridden out). `stop()` makes the pump stop pulling and close
the generator: GeneratorExit at its `yield`, so the handler's `finally` runs. A generator that
never yields again cannot be stopped (a Python thread cannot be killed): the worker abandons the
thread, as it does a hung `run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from scheduler import jsonvalue
from scheduler.errors import InvalidJob
from scheduler.logs import get_logger
from workers.registry import Handler, stream_chunks

log = get_logger("workers.stream_pump")


@dataclass(frozen=True, slots=True)
class PumpEnd:
    """How a generator ended: returned `value` (the job's result), raised `error`, or yielded a
    chunk the stream cannot take (`invalid` says why; retrying would yield it again)."""

    value: Any = None
    error: BaseException | None = None
    invalid: str | None = None


class ChunkPipe:
    """Encoded chunks from the handler thread to the event loop, at most `capacity` unsent."""

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int) -> None:
        self._loop = loop
        self._capacity = capacity
        self._cond = threading.Condition()
        self._items: list[str] = []
        self._end: PumpEnd | None = None
        self._stopped = False
        # Set (from the thread, through the loop) when the loop waits and something arrives; the
        # thread only wakes the loop when it waits, not for every chunk.
        self._arrived = asyncio.Event()
        self._loop_waits = False
        # Chunks the generator yielded (and the pump put), for tests and measurements.
        self.yielded = 0

    # -- the handler thread's side ------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        return self._stopped

    def put(self, text: str) -> bool:
        """Queue one chunk, waiting while the pipe is full; False when the pipe was stopped."""
        with self._cond:
            while len(self._items) >= self._capacity and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return False
            self._items.append(text)
            self.yielded += 1
            wake, self._loop_waits = self._loop_waits, False
        if wake:
            self._wake()
        return True

    def end(self, end: PumpEnd) -> None:
        with self._cond:
            self._end = end
            self._loop_waits = False
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody reads any more
            self._loop.call_soon_threadsafe(self._arrived.set)

    # -- the event loop's side ----------------------------------------------------------------

    async def wait(self) -> None:
        """Until there is a chunk to take or the generator ended."""
        with self._cond:
            if self._items or self._end is not None:
                return
            self._loop_waits = True
            self._arrived.clear()
        await self._arrived.wait()

    def take(self, most: int) -> tuple[list[str], PumpEnd | None]:
        """Up to `most` chunks, and the end once every chunk has been taken."""
        with self._cond:
            out = self._items[:most]
            del self._items[:most]
            self._cond.notify_all()
            return out, (self._end if not self._items else None)

    def stop(self) -> None:
        """Stop the pump: it pulls no more chunks and closes the generator."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


def pump(
    handler: Handler[Any], model: Any, payload: Any, pipe: ChunkPipe, max_chunk_bytes: int
) -> None:
    """Run handler's generator to its end (or until the pipe is stopped), on the calling thread.
    Never raises: how it ended goes to the pipe."""
    assert handler.run_stream is not None
    chunks: list[Any] = []
    iterator: Iterator[Any] | None = None
    try:
        produced = handler.run_stream(model, payload)
        try:
            iterator = iter(stream_chunks(produced, handler.job_type))
        except TypeError as exc:
            _close(produced)
            pipe.end(PumpEnd(invalid=str(exc)))
            return
        while not pipe.stopped:
            try:
                chunk = next(iterator)
            except StopIteration as stop:
                # The rule of workers.registry: the return value, or every chunk when None.
                pipe.end(PumpEnd(value=chunks if stop.value is None else stop.value))
                return
            checked = _check(chunk, len(chunks), max_chunk_bytes)
            if isinstance(checked, PumpEnd):
                pipe.end(checked)
                return
            chunks.append(chunk)
            if not pipe.put(checked):
                return
        pipe.end(PumpEnd())  # stopped: nobody reads this end
    except Exception as exc:
        pipe.end(PumpEnd(error=exc))
    finally:
        _close(iterator)


def _check(chunk: Any, index: int, max_bytes: int) -> str | PumpEnd:
    """The chunk's JSON text, or the end of a job that yielded one the stream cannot take."""
    try:
        text = jsonvalue.encode(chunk, f"chunk {index}")
    except InvalidJob as exc:
        return PumpEnd(invalid=f"the handler yielded a chunk that is not JSON: {exc}")
    size = len(text.encode())
    if size > max_bytes:
        return PumpEnd(
            invalid=f"the handler yielded chunk {index} of {size} bytes, over "
            f"stream_max_chunk_bytes ({max_bytes})"
        )
    return text


def _close(iterator: Iterable[Any] | Iterator[Any] | None) -> None:
    """Close a generator (GeneratorExit at its yield; a no-op once it has ended)."""
    close = getattr(iterator, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception:
        log.exception("stream.generator_close_failed")


__all__ = ["ChunkPipe", "PumpEnd", "pump"]
