"""ModelWorker: serves one task queue with its handlers' models loaded. A plain asyncio class; the
Ray actor in workers/actor.py is a thin shell around it, and tests drive it without Ray.

Life of a worker: `assign(queue, job_types)` loads the models (in a thread, timed: that is the
queue's model-load cost) and starts two tasks on the event loop:

- the serve loop leases up to a batch of jobs, runs them, and reports results in one round trip.
  When the queue is empty it blocks on the queue's signal list (BLPOP), so an idle worker costs
  nothing and wakes within a millisecond of a job arriving;
- the heartbeat loop renews the leases of jobs in flight every `heartbeat_s`, and stops waiting on a
  job the store says was cancelled (reported as cancelled) or is no longer ours (dropped).

A Redis outage (a restart, a failover) stops neither loop: leasing and heartbeats are retried with
short backoff, and results already computed are held and re-sent (completion is idempotent per
lease token) for up to the lease's length, so a job finished during an outage is reported when
Redis is back instead of running again.

Handlers run on a dedicated daemon thread, off the event loop (torch releases the GIL), so
heartbeats and state queries keep flowing while a model computes. A Python thread cannot be killed:
when a job passes its `timeout_s` (or is cancelled) the worker stops waiting, reports the job, and
serves the next jobs on a fresh thread, leaving the old one behind. Past `max_abandoned_threads`
still-running abandoned threads the worker reports itself unhealthy, and the pool replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import queue as queue_mod
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import structlog

from scheduler import jsonvalue
from scheduler.codes import Code
from scheduler.config import WorkerConfig
from scheduler.errors import InvalidJob
from scheduler.logs import bound_job, get_logger
from scheduler.models import ErrorInfo
from scheduler.retry import Backoff, OutageRetry, describe, is_transient
from scheduler.store import Lease, RunReport, Store
from scheduler.timings import record_model_load
from workers.registry import REGISTRY, Handler, HandlerRegistry, RetryPolicy
from workers.stream_pump import ChunkPipe, PumpEnd, pump
from workers.usage import token_counts

T = TypeVar("T")

log = get_logger("workers.model_worker")

# Weight of the newest sample in the moving average of service seconds per job.
SERVICE_EWMA_ALPHA = 0.2


class Phase(StrEnum):
    """What a worker is doing."""

    # No queue assigned (fresh, or drained).
    IDLE = "idle"
    # Assigned a queue, loading its models.
    LOADING = "loading"
    # Serving its queue, no job in hand (blocked on the queue when it is empty).
    READY = "ready"
    # Serving its queue, running jobs.
    BUSY = "busy"
    # Leaving its queue: no new leases; finishing or releasing the jobs in hand.
    DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class WorkerState:
    """A snapshot of one worker, for the pool's view."""

    name: str
    queue: str | None
    phase: Phase
    # Seconds a full load of the current queue's models took here (measured); 0.0 before any.
    load_s: float
    # Attempts completed with a result, and attempts that failed (timeouts included).
    jobs_done: int
    jobs_failed: int
    # Moving average of wall seconds per job (a batch's time split over its jobs); 0.0 before any.
    service_time_s: float
    healthy: bool
    in_flight: int
    abandoned_threads: int


@dataclass(frozen=True, slots=True)
class DrainReport:
    """What a drain did with the jobs the worker held."""

    # Jobs reported (completed or failed) while draining.
    finished: int
    # Leases given back unfinished (queued again, the attempt not charged).
    released: int


@dataclass(frozen=True, slots=True)
class _Ok:
    value: Any


@dataclass(frozen=True, slots=True)
class _Err:
    error: ErrorInfo
    retryable: bool


_Outcome = _Ok | _Err


def _error_of(exc: BaseException, retry: RetryPolicy) -> _Err:
    return _Err(
        ErrorInfo(
            type=type(exc).__name__,
            message=str(exc),
            traceback="".join(traceback.format_exception(exc)),
        ),
        retryable=retry.retries(exc),
    )


@dataclass(frozen=True, slots=True)
class _Refused:
    """A stream append the store refused (the code), or None: Redis stayed away."""

    code: Code | None


def _stream_outcome(end: PumpEnd, retry: RetryPolicy) -> _Outcome:
    if end.invalid is not None:
        # Retrying would yield the same chunk: dead-letter at once, saying why.
        return _Err(ErrorInfo(type="InvalidChunk", message=end.invalid), retryable=False)
    if end.error is not None:
        return _error_of(end.error, retry)
    return _Ok(end.value)


def _run_handler(handler: Handler[Any], model: Any, payloads: list[Any]) -> list[_Outcome]:
    """Run one batch; never raises. When a batch of several fails, each payload is run alone so
    one bad payload fails only its own job."""
    try:
        results = handler.run_batch(model, payloads)
        if not isinstance(results, list) or len(results) != len(payloads):
            got = len(results) if isinstance(results, list) else type(results).__name__
            raise TypeError(f"{handler.job_type}: run_batch returned {got} for {len(payloads)}")
        return [_Ok(r) for r in results]
    except Exception as exc:
        if len(payloads) == 1:
            return [_error_of(exc, handler.retry)]
    return [_run_handler(handler, model, [p])[0] for p in payloads]


class _HandlerThread:
    """One daemon thread running calls in order. Daemon, and never joined: an abandoned thread
    stuck in a handler must not hold up the process's exit."""

    def __init__(self, name: str) -> None:
        self._calls: queue_mod.SimpleQueue[
            tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[[], Any]] | None
        ] = queue_mod.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((loop, future, fn))
        return future

    def close(self) -> None:
        """Let the thread exit after its current call (if that ever returns)."""
        self._calls.put(None)

    def _loop(self) -> None:
        while (item := self._calls.get()) is not None:
            loop, future, fn = item
            try:
                result, error = fn(), None
            except BaseException as exc:
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop closed while we ran
                loop.call_soon_threadsafe(_settle, future, result, error)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: it belongs to a wait we gave up on."""
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


@dataclass(eq=False, slots=True)
class _Flight:
    """A leased job this worker answers for until it reports it (or learns it is not its own)."""

    lease: Lease


class ModelWorker:
    """Serves one queue at a time. Methods are called from one event loop."""

    def __init__(
        self,
        store: Store,
        *,
        registry: HandlerRegistry = REGISTRY,
        config: WorkerConfig | None = None,
        name: str = "worker",
        drain_timeout_s: float = 30.0,
        idle_wait_s: float = 5.0,
        max_abandoned_threads: int = 4,
    ) -> None:
        self.store = store
        self.registry = registry
        self.config = config or WorkerConfig()
        self.name = name
        self.drain_timeout_s = drain_timeout_s
        # An idle BLPOP returns after this long even without a signal, so a lost wake-up token
        # (e.g. one popped by a wait that was then cancelled) delays a job by at most this much.
        self.idle_wait_s = idle_wait_s
        self.max_abandoned_threads = max_abandoned_threads
        self._queue: str | None = None
        self._phase = Phase.IDLE
        self._handlers: dict[str, Handler[Any]] = {}
        self._models: dict[str, Any] = {}
        self._load_s_by_type: dict[str, float] = {}
        self._in_flight: dict[str, _Flight] = {}
        self._wake = asyncio.Event()
        self._stop_leasing = False
        self._drain_deadline: float | None = None
        self._serve_task: asyncio.Task[None] | None = None
        # Set when a drain begins: wakes the serve loop from its idle wait.
        self._stopping = asyncio.Event()
        self._heartbeat_task: asyncio.Task[None] | None = None
        # Set when leases are taken: the heartbeat loop sleeps on it while none are in hand, so an
        # idle worker does not wake every heartbeat interval for nothing.
        self._leased = asyncio.Event()
        self._lock = asyncio.Lock()
        self._runner = _HandlerThread(f"{name}-handler")
        self._abandoned: list[_HandlerThread] = []
        self._jobs_done = 0
        self._jobs_failed = 0
        self._released = 0
        # Per queue: a queue's jobs cost what they cost, whichever queue the worker served before.
        self._service_s: dict[str, float] = {}
        self._backoff = Backoff()
        # Reports (results, failures) are re-sent through an outage for up to a lease's length:
        # past it the job has been leased again and the report would be refused anyway.
        self._reports = OutageRetry(f"worker {name}", store.settings.lease_s)
        # Consecutive failed steps of the serve loop (0 while it works).
        self.serve_failures = 0
        # Stream appends made (round trips carrying chunks), for tests and measurements.
        self.stream_appends = 0

    # -- control ----------------------------------------------------------------------------

    async def assign(self, queue: str, job_types: Sequence[str]) -> float:
        """Serve `queue`, whose jobs have these types: drain the current queue if any, load the
        models not already loaded (in a thread), start serving. Returns the seconds spent loading
        now (0.0 when every model was loaded already). KeyError for an unregistered job type."""
        async with self._lock:
            await self._drain_locked(self.drain_timeout_s)
            handlers = {t: self.registry.get(t) for t in job_types}
            if not handlers:
                raise ValueError(f"queue {queue!r}: no job types to serve")
            self._queue, self._phase = queue, Phase.LOADING
            # Keep what this queue also uses; drop the rest so memory holds one queue's models.
            self._models = {t: m for t, m in self._models.items() if t in handlers}
            loaded: dict[str, float] = {}
            try:
                for job_type, handler in handlers.items():
                    if job_type not in self._models:
                        t0 = time.monotonic()
                        self._models[job_type] = await asyncio.to_thread(handler.loader)
                        loaded[job_type] = self._load_s_by_type[job_type] = time.monotonic() - t0
            except BaseException:
                self._queue, self._phase = None, Phase.IDLE
                raise
            load_s = sum(loaded.values())
            if loaded:
                await self._count_load(queue, load_s)
            await self._record_loads(queue, loaded)
            self._handlers = handlers
            self._stop_leasing = False
            self._stopping.clear()
            self._drain_deadline = None
            self._phase = Phase.READY
            self._serve_task = asyncio.create_task(self._serve(queue), name=f"{self.name}-serve")
            if self._heartbeat_task is None:
                self._heartbeat_task = asyncio.create_task(
                    self._heartbeat_loop(), name=f"{self.name}-heartbeat"
                )
            log.info("worker.assigned", worker=self.name, queue=queue, load_s=round(load_s, 3))
            return load_s

    async def _count_load(self, queue: str, load_s: float) -> None:
        """Count the load in the queue's model-load histogram (scheduler.timings); best effort:
        a metric never fails an assignment."""
        try:
            await record_model_load(self.store.redis, self.store.keys, queue, load_s)
        except Exception as exc:
            log.warning("worker.load_not_counted", worker=self.name, error=describe(exc))

    async def _record_loads(self, queue: str, loaded: dict[str, float]) -> None:
        """Report the loads just made to the recording; a failure costs the entry, never the
        assignment (the models are loaded either way)."""
        try:
            await self.store.record_model_load(queue, loaded)
        except Exception as exc:
            log.warning("worker.load_not_recorded", worker=self.name, error=describe(exc))

    async def drain(self, timeout_s: float | None = None) -> DrainReport:
        """Stop leasing and finish the jobs in hand, waiting at most `timeout_s` (default
        `drain_timeout_s`); jobs still unfinished then are released to run again. The worker
        keeps its models and becomes idle (no queue)."""
        async with self._lock:
            return await self._drain_locked(
                self.drain_timeout_s if timeout_s is None else timeout_s
            )

    async def stop(self, timeout_s: float | None = None) -> DrainReport:
        """Drain, stop the heartbeat, and free the models and the handler thread."""
        report = await self.drain(timeout_s)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
            self._heartbeat_task = None
        self._models.clear()
        self._runner.close()
        return report

    def state(self) -> WorkerState:
        return WorkerState(
            name=self.name,
            queue=self._queue,
            phase=self._phase,
            load_s=sum(self._load_s_by_type.get(t, 0.0) for t in self._handlers)
            if self._queue is not None
            else 0.0,
            jobs_done=self._jobs_done,
            jobs_failed=self._jobs_failed,
            service_time_s=self._service_s.get(self._queue or "", 0.0),
            healthy=self._healthy(),
            in_flight=len(self._in_flight),
            abandoned_threads=self._abandoned_alive(),
        )

    def _abandoned_alive(self) -> int:
        self._abandoned = [t for t in self._abandoned if t.thread.is_alive()]
        return len(self._abandoned)

    def _healthy(self) -> bool:
        if self._abandoned_alive() > self.max_abandoned_threads:
            return False
        # A serve loop that ended on its own (not by a drain) is a bug; do not hide it.
        task = self._serve_task
        return not (task is not None and task.done() and not self._stop_leasing)

    async def _drain_locked(self, timeout_s: float) -> DrainReport:
        task = self._serve_task
        if task is None:
            return DrainReport(0, 0)
        before = self._jobs_done + self._jobs_failed
        released_before = self._released
        self._phase = Phase.DRAINING
        self._stop_leasing = True
        self._drain_deadline = time.monotonic() + timeout_s
        self._stopping.set()
        self._wake.set()
        try:
            await task
        except Exception:
            log.exception("worker.serve_loop_failed", worker=self.name, queue=self._queue)
        # Whatever the loop left behind (it only does on a crash) is released, never dropped.
        await self._release(list(self._in_flight.values()))
        self._serve_task = None
        self._queue, self._phase = None, Phase.IDLE
        report = DrainReport(
            finished=self._jobs_done + self._jobs_failed - before,
            released=self._released - released_before,
        )
        log.info(
            "worker.drained", worker=self.name, finished=report.finished, released=report.released
        )
        return report

    # -- serving ----------------------------------------------------------------------------

    async def _serve(self, queue: str) -> None:
        handlers = list(self._handlers.values())
        # A queue of several job types leases for its most batch-friendly one; the others run in
        # their own chunks of the lease.
        batch = min(self.config.max_batch, max(h.max_batch for h in handlers))
        batch_wait_s = max(h.batch_wait_ms for h in handlers) / 1000.0
        while not self._stop_leasing:
            try:
                leases = await self.store.lease(queue, batch)
                if self.serve_failures:
                    log.info("worker.resumed", worker=self.name, after_failures=self.serve_failures)
                    self.serve_failures = 0
                if not leases:
                    await self._wait_idle(queue, self.idle_wait_s)
                    continue
                if len(leases) < batch and batch_wait_s > 0:
                    leases += await self._top_up(queue, batch - len(leases), batch_wait_s)
                await self._run_leases(leases)
            except Exception as exc:
                # Redis unreachable, most likely: wait it out. Leases in hand are renewed by the
                # heartbeat once it is back, or expire and their jobs run again.
                self.serve_failures += 1
                if not is_transient(exc):
                    log.exception("worker.serve_error", worker=self.name, queue=queue)
                elif self.serve_failures == 1:
                    log.warning("worker.redis_unavailable", worker=self.name, error=describe(exc))
                await asyncio.sleep(self._backoff.delay_s(self.serve_failures))

    async def _wait_idle(self, queue: str, timeout_s: float) -> bool:
        """BLPOP on the queue's signal list until a job arrives, the timeout passes or a drain
        begins. A drain does not wait for the BLPOP to end: cancelling a command in flight is not
        always prompt in redis-py, so the wait is left to finish on its own."""
        if self._stop_leasing:
            return False
        blpop = asyncio.ensure_future(self.store.wait_for_queue(queue, timeout_s))
        stopping = asyncio.ensure_future(self._stopping.wait())
        waiting: set[asyncio.Future[Any]] = {blpop, stopping}
        try:
            await asyncio.wait(waiting, return_when="FIRST_COMPLETED")
        finally:
            stopping.cancel()
            if not blpop.done():
                blpop.cancel()
                blpop.add_done_callback(_retrieve)
        return blpop.done() and not blpop.cancelled() and blpop.result()

    async def _top_up(self, queue: str, want: int, wait_s: float) -> list[Lease]:
        """Wait up to `wait_s` for more jobs to fill a batch (woken by the queue's signal)."""
        more: list[Lease] = []
        deadline = time.monotonic() + wait_s
        while len(more) < want and not self._stop_leasing:
            remaining = deadline - time.monotonic()
            # BLPOP's timeout 0 means forever: never pass a value that rounds to it.
            if remaining < 0.001 or not await self._wait_idle(queue, remaining):
                break
            more += await self.store.lease(queue, want - len(more))
        return more

    async def _run_leases(self, leases: list[Lease]) -> None:
        for lease in leases:
            self._in_flight[lease.job_id] = _Flight(lease)
        self._leased.set()
        self._phase = Phase.BUSY
        try:
            # Jobs batch with jobs of the same type and the same time limit.
            groups: dict[tuple[str, float | None], list[Lease]] = {}
            for lease in leases:
                key = (lease.spec.job_type, lease.spec.options.timeout_s)
                groups.setdefault(key, []).append(lease)
            for (job_type, timeout_s), group in groups.items():
                handler = self._handlers.get(job_type)
                if handler is None:
                    await self._fail_unservable(group)
                    continue
                for i in range(0, len(group), handler.max_batch):
                    if self._past_drain_deadline():
                        await self._release(self._flights(group[i:]))
                        break
                    await self._run_chunk(handler, group[i : i + handler.max_batch], timeout_s)
        finally:
            if self._phase is Phase.BUSY:
                self._phase = Phase.READY

    def _past_drain_deadline(self) -> bool:
        return self._drain_deadline is not None and time.monotonic() >= self._drain_deadline

    def _flights(self, leases: Sequence[Lease]) -> list[_Flight]:
        return [f for lease in leases if (f := self._in_flight.get(lease.job_id)) is not None]

    async def _run_chunk(
        self, handler: Handler[Any], chunk: list[Lease], timeout_s: float | None
    ) -> None:
        if handler.streaming:
            for lease in chunk:  # one: streaming handlers run one job per call
                await self._run_stream(handler, lease, timeout_s)
            return
        model = self._models[handler.job_type]
        payloads = [lease.spec.payload for lease in chunk]
        with self._bind(chunk):
            # The handler thread sees this task's log context (job id, queue).
            context = contextvars.copy_context()
            started = time.monotonic()
            future = self._runner.submit(
                lambda: context.run(_run_handler, handler, model, payloads)
            )
            job_deadline = None if timeout_s is None else started + timeout_s
            while True:
                self._wake.clear()
                if not self._flights(chunk):
                    # Every job of the call was cancelled or taken from us: stop waiting for it.
                    self._abandon(future)
                    return
                if future.done():
                    break
                now = time.monotonic()
                deadlines = [d for d in (job_deadline, self._drain_deadline) if d is not None]
                limit = min(deadlines) - now if deadlines else None
                if limit is not None and limit <= 0:
                    self._abandon(future)
                    if job_deadline is not None and now >= job_deadline:
                        await self._fail_timeout(self._flights(chunk), timeout_s or 0.0)
                    else:
                        await self._release(self._flights(chunk))
                    return
                woken: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
                waiting: set[asyncio.Future[Any]] = {future, woken}
                try:
                    await asyncio.wait(waiting, timeout=limit, return_when="FIRST_COMPLETED")
                finally:
                    woken.cancel()
            per_job_s = (time.monotonic() - started) / len(chunk)
            self._note_service_s(chunk[0].queue, per_job_s)
            await self._report(chunk, future.result(), per_job_s)

    async def _run_stream(
        self, handler: Handler[Any], lease: Lease, timeout_s: float | None
    ) -> None:
        """Run a streaming job: its generator on the handler thread, its chunks shipped as they
        come (`_ship`), its result reported at the end. When the job is cancelled, times out, is
        no longer ours, or the drain deadline passes, the generator is stopped and closed, and
        the job reported as for any other (cancelled, JobTimeout, released) or dropped."""
        flight = self._in_flight.get(lease.job_id)
        if flight is None:
            return
        model = self._models[handler.job_type]
        pipe = ChunkPipe(asyncio.get_running_loop(), 4 * self.config.stream_batch_max)
        max_bytes = self.store.settings.stream_max_chunk_bytes
        payload = lease.spec.payload
        with self._bind([lease]):
            context = contextvars.copy_context()
            started = time.monotonic()
            future = self._runner.submit(
                lambda: context.run(pump, handler, model, payload, pipe, max_bytes)
            )
            shipper = asyncio.ensure_future(self._ship(lease, pipe, handler.retry))
            try:
                stop = await self._watch_stream(flight, shipper, started, timeout_s)
            except BaseException:
                # This task was cancelled (the worker is going away): nothing more may be sent.
                pipe.stop()
                shipper.cancel()
                raise
            shipped = None if stop else shipper.result()
            if stop or isinstance(shipped, _Refused):
                # Stop pulling from the generator (it is closed at its next yield) and serve the
                # next job on a fresh thread if this one is still inside the handler.
                pipe.stop()
                if not shipper.done():
                    shipper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await shipper
                if not future.done():
                    self._abandon(future)
            if stop == "timeout":
                await self._fail_timeout([flight], timeout_s or 0.0)
            elif stop == "drain":
                await self._release([flight])
            elif isinstance(shipped, _Refused):
                await self._stream_refused(flight, shipped.code)
            elif shipped is not None and self._in_flight.get(lease.job_id) is flight:
                run_s = time.monotonic() - started
                self._note_service_s(lease.queue, run_s)
                await self._report([lease], [shipped], run_s)

    async def _watch_stream(
        self,
        flight: _Flight,
        shipper: asyncio.Future[Any],
        started: float,
        timeout_s: float | None,
    ) -> str | None:
        """Wait for the shipper to finish; or say why the stream must stop first: 'settled' (the
        heartbeat found the job cancelled or not ours, and reported it), 'timeout', 'drain'."""
        job_id = flight.lease.job_id
        job_deadline = None if timeout_s is None else started + timeout_s
        while not shipper.done():
            self._wake.clear()
            if self._in_flight.get(job_id) is not flight:
                return "settled"
            now = time.monotonic()
            deadlines = [d for d in (job_deadline, self._drain_deadline) if d is not None]
            limit = min(deadlines) - now if deadlines else None
            if limit is not None and limit <= 0:
                return "timeout" if job_deadline is not None and now >= job_deadline else "drain"
            woken: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
            waiting: set[asyncio.Future[Any]] = {shipper, woken}
            try:
                await asyncio.wait(waiting, timeout=limit, return_when="FIRST_COMPLETED")
            finally:
                woken.cancel()
        return None

    async def _ship(self, lease: Lease, pipe: ChunkPipe, retry: RetryPolicy) -> _Outcome | _Refused:
        """Append the generator's chunks under the job's lease as they come: at most one append
        per `stream_flush_ms`, each carrying every chunk yielded since the last (up to
        `stream_batch_max`), so a chunk of a slow stream leaves at once and a fast stream costs
        one round trip per interval. Returns the generator's outcome once every chunk is in the
        stream, or _Refused when the store refused an append (or Redis stayed away)."""
        flush_s = self.config.stream_flush_ms / 1000.0
        most = self.config.stream_batch_max
        sent = 0
        next_at = 0.0
        while True:
            await pipe.wait()
            pause_s = next_at - time.monotonic()
            if pause_s > 0:
                await asyncio.sleep(pause_s)
            texts, end = pipe.take(most)
            if texts:
                next_at = time.monotonic() + flush_s
                try:
                    code = await self._reports.call(
                        functools.partial(
                            self.store.stream_append, lease.job_id, lease.token, sent, texts
                        ),
                        "stream",
                    )
                except Exception as exc:
                    # Redis away for a whole lease (or a bug): the lease lapses and the job runs
                    # again elsewhere; this attempt's stream is void.
                    log.warning("worker.stream_append_failed", error=describe(exc))
                    return _Refused(None)
                self.stream_appends += 1
                sent += len(texts)
                if code is not Code.OK:
                    return _Refused(code)
            if end is not None:
                return _stream_outcome(end, retry)

    async def _stream_refused(self, flight: _Flight, code: Code | None) -> None:
        """An append was refused: report a cancelled job as cancelled; drop one that is no
        longer ours (its new lease, or its finish, stands)."""
        lease = flight.lease
        if self._in_flight.get(lease.job_id) is not flight:
            return  # the heartbeat settled it meanwhile
        del self._in_flight[lease.job_id]
        if code is Code.CANCEL_REQUESTED:
            err = ErrorInfo(type="Cancelled", message="cancelled while running")
            await self._fail_all([(lease, err, False)])
        else:
            with bound_job(lease.job_id, lease.queue):
                log.info("worker.lease_lost", code=code.name if code else "redis_unavailable")

    def _note_service_s(self, queue: str, per_job_s: float) -> None:
        old_s = self._service_s.get(queue)
        self._service_s[queue] = (
            per_job_s if old_s is None else old_s + SERVICE_EWMA_ALPHA * (per_job_s - old_s)
        )

    @contextlib.contextmanager
    def _bind(self, chunk: list[Lease]) -> Iterator[None]:
        if len(chunk) == 1:
            with bound_job(chunk[0].job_id, chunk[0].queue):
                yield
        else:
            ids = [lease.job_id for lease in chunk]
            with structlog.contextvars.bound_contextvars(job_ids=ids, queue=chunk[0].queue):
                yield

    def _abandon(self, future: asyncio.Future[Any]) -> None:
        """Leave the handler thread to finish (or hang) on its own; serve on a fresh one."""
        future.cancel()
        self._runner.close()
        self._abandoned.append(self._runner)
        self._runner = _HandlerThread(f"{self.name}-handler")
        alive = self._abandoned_alive()
        if alive > self.max_abandoned_threads:
            log.error("worker.unhealthy", worker=self.name, abandoned_threads=alive)

    # -- reporting --------------------------------------------------------------------------

    async def _report(self, chunk: list[Lease], outcomes: list[_Outcome], run_s: float) -> None:
        """Report a call's outcomes; `run_s` is each job's share of the call's time."""
        done: list[tuple[str, int, str]] = []
        reports: list[RunReport] = []
        failed: list[tuple[Lease, ErrorInfo, bool]] = []
        for lease, outcome in zip(chunk, outcomes, strict=True):
            if self._in_flight.pop(lease.job_id, None) is None:
                continue  # cancelled or lost while it ran: already accounted for
            if isinstance(outcome, _Err):
                failed.append((lease, outcome.error, outcome.retryable))
                continue
            try:
                text = jsonvalue.encode(outcome.value, "result")
            except InvalidJob as exc:
                # Retrying would produce the same value: dead-letter at once, saying why.
                message = f"the handler returned a value that is not JSON: {exc}"
                failed.append((lease, ErrorInfo(type="InvalidResult", message=message), False))
                continue
            done.append((lease.job_id, lease.token, text))
            tokens_in, tokens_out = token_counts(outcome.value)
            reports.append(RunReport(run_s, tokens_in, tokens_out))
        if done:
            codes = await self._reports.call(
                lambda: self.store.complete_encoded(done, reports=reports), "complete"
            )
            self._jobs_done += sum(code is Code.OK for code in codes)
            for (job_id, _, _), code in zip(done, codes, strict=True):
                if code is not Code.OK:
                    log.info("worker.result_refused", job_id=job_id, code=code.name)
        await self._fail_all(failed, run_s)

    async def _fail_all(
        self, failed: Sequence[tuple[Lease, ErrorInfo, bool]], run_s: float | None = None
    ) -> None:
        # A retried fail under the same token is refused (STALE_LEASE), never counted twice.
        codes = await asyncio.gather(
            *(self._fail_one(lease, err, r, run_s) for lease, err, r in failed)
        )
        for (lease, err, _), code in zip(failed, codes, strict=True):
            if code in (Code.RETRY_SCHEDULED, Code.DEAD_LETTERED):
                self._jobs_failed += 1
            with bound_job(lease.job_id, lease.queue):
                log.info("worker.job_failed", error_type=err.type, code=code.name)

    async def _fail_one(
        self, lease: Lease, error: ErrorInfo, retryable: bool, run_s: float | None
    ) -> Code:
        # The job type's retry policy: its budget unless the job set its own, and its backoff.
        handler = self._handlers.get(lease.spec.job_type)
        retry = handler.retry if handler is not None else RetryPolicy()
        return await self._reports.call(
            lambda: self.store.fail(
                lease.job_id,
                lease.token,
                error,
                retryable=retryable,
                max_retries=retry.max_retries_for(lease.spec.options.max_retries),
                backoff_s=retry.backoff_s,
                backoff_max_s=retry.backoff_max_s,
                run_s=run_s,
            ),
            "fail",
        )

    async def _fail_timeout(self, flights: list[_Flight], timeout_s: float) -> None:
        for f in flights:
            self._in_flight.pop(f.lease.job_id, None)
        message = f"the job ran longer than its timeout_s of {timeout_s:g} s and was abandoned"
        # Not retried: a job over its time limit would most likely be over it again, and every
        # attempt may leave a hung thread behind.
        err = ErrorInfo(type="JobTimeout", message=message)
        await self._fail_all([(f.lease, err, False) for f in flights], timeout_s)

    async def _fail_unservable(self, leases: list[Lease]) -> None:
        flights = self._flights(leases)
        for f in flights:
            self._in_flight.pop(f.lease.job_id, None)
        served = ", ".join(sorted(self._handlers))
        failed = [
            (
                f.lease,
                ErrorInfo(
                    type="UnknownJobType",
                    message=f"queue {f.lease.queue!r} serves {served}, not {f.lease.spec.job_type!r}",
                ),
                False,
            )
            for f in flights
        ]
        await self._fail_all(failed)

    async def _release(self, flights: list[_Flight]) -> None:
        """Give leases back to the queue at their old place, without charging the attempt: the
        worker is leaving, the job did nothing wrong."""
        if not flights:
            return
        for f in flights:
            self._in_flight.pop(f.lease.job_id, None)
        try:
            await self.store.release([(f.lease.job_id, f.lease.token) for f in flights])
        except Exception as exc:
            # Redis trouble: the leases will expire and the jobs run again all the same.
            log.warning("worker.release_failed", jobs=len(flights), error=str(exc))
        self._released += len(flights)

    # -- heartbeats -------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        failures = 0
        while True:
            if not self._in_flight:
                self._leased.clear()
                await self._leased.wait()
            # While Redis is away, retry sooner than the period so leases are renewed as soon as
            # it is back (a restart may have cost a renewal already).
            await asyncio.sleep(
                self.config.heartbeat_s if not failures else self._backoff.delay_s(failures)
            )
            try:
                await self.heartbeat_once()
                failures = 0
            except Exception as exc:
                failures += 1
                if not is_transient(exc):
                    log.exception("worker.heartbeat_failed", worker=self.name)
                elif failures == 1:
                    log.warning("worker.heartbeat_failed", worker=self.name, error=describe(exc))

    async def heartbeat_once(self) -> None:
        """Renew every lease in hand; act on cancellations and leases that are no longer ours."""
        flights = list(self._in_flight.values())
        if not flights:
            return
        codes = await self.store.heartbeat([(f.lease.job_id, f.lease.token) for f in flights])
        cancelled: list[tuple[Lease, ErrorInfo, bool]] = []
        for f, code in zip(flights, codes, strict=True):
            if self._in_flight.get(f.lease.job_id) is not f or code is Code.OK:
                continue
            del self._in_flight[f.lease.job_id]
            self._wake.set()
            if code is Code.CANCEL_REQUESTED:
                err = ErrorInfo(type="Cancelled", message="cancelled while running")
                cancelled.append((f.lease, err, False))
            else:
                with bound_job(f.lease.job_id, f.lease.queue):
                    log.info("worker.lease_lost", code=code.name)
        if cancelled:
            # The store records these as cancelled (the job's cancel flag is set).
            await asyncio.gather(
                *(
                    self.store.fail(lease.job_id, lease.token, e, retryable=r)
                    for lease, e, r in cancelled
                )
            )


__all__ = ["DrainReport", "ModelWorker", "Phase", "WorkerState"]
