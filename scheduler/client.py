"""The Python client: submit jobs, wait for results, cancel. `AsyncClient` is the core; `Client`
runs it on a private event loop thread for synchronous code. Both are context managers.

A client talks to one namespace on one Redis: `Client(url, namespace="demo")`, or the URL's
`?namespace=demo`, or BILEVEL_REDIS_URL and BILEVEL_NAMESPACE. With no URL at all it refuses to
start (a private Redis nobody serves would hold jobs forever) unless asked for one with
`embedded=True`, for tests and notebooks that start a service on it too. And when no service
serves the namespace there, submit() and result() raise NoService naming the namespaces that are
served (`require_service=False` queues jobs for a service started later).

Every call rides out a short Redis outage (a restart, a failover): it is retried with backoff for up
to `Settings.outage_retry_s` (10 s) and then raises RedisUnavailable naming host and port. That is
safe because every call repeats cleanly: reads and watches change nothing twice, and a retried
submit resends the same job ids, which the store recognises (a submission never creates a second
job). The same holds for the operator's calls: a retried cancel finds the job cancelled, a retried
replay carries its request's token and the store recognises the jobs it replayed already, and a
retried purge finds gone what it deleted.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any, Self, TypeVar

from pydantic import SecretStr

from scheduler.codes import Code
from scheduler.connection import check_connection, client_from_url, parse_address
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.errors import (
    BilevelError,
    InvalidJob,
    JobCancelled,
    JobFailed,
    JobTimeout,
    Rejected,
)
from scheduler.keys import validate_name
from scheduler.listing import JobPage, JobSummary, ListOptions, ListOrder
from scheduler.logs import configure_logging
from scheduler.models import Job, JobStatus, build_spec, new_job_id
from scheduler.operations import (
    Cancellation,
    CancelOutcome,
    PurgeReport,
    Refusal,
    ReplayReport,
)
from scheduler.retry import OutageRetry
from scheduler.settings import Settings
from scheduler.store import NewJob, Outcome, Store, StoreStats
from scheduler.streaming import AsyncChunkStream, ChunkStream

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class JobRequest:
    """One job for `submit_many`; the options mean what `submit`'s keyword arguments mean."""

    job_type: str
    payload: Any = None
    priority: int = 0
    deadline_s: float | None = None
    delay_s: float = 0.0
    idempotency_key: str | None = None
    tenant: str | None = None
    tags: Sequence[str] = field(default_factory=tuple)
    max_retries: int | None = None
    timeout_s: float | None = None

    def options(self) -> dict[str, Any]:
        return {
            "priority": self.priority,
            "deadline_s": self.deadline_s,
            "delay_s": self.delay_s,
            "idempotency_key": self.idempotency_key,
            "tenant": self.tenant,
            "tags": tuple(self.tags),
            "max_retries": self.max_retries,
            "timeout_s": self.timeout_s,
        }


def _outcome(job: Outcome) -> Any:
    """The result of a finished job, or the exception that stands for its failure."""
    if job.status is JobStatus.SUCCEEDED:
        return job.result
    if job.status is JobStatus.CANCELLED:
        raise JobCancelled(job.job_id)
    error = job.error
    raise JobFailed(
        job.job_id,
        error.type if error else "UnknownError",
        error.message if error else "the job died without an error record",
        error.traceback if error else None,
    )


class AsyncJobHandle:
    """A submitted job. `created` is False when an idempotency key returned an earlier job, or
    when admission control refused it: then `rejected` is the Rejected (naming the cap and when
    to retry), nothing was written, and result() raises it."""

    def __init__(
        self,
        client: AsyncClient,
        job_id: str,
        *,
        created: bool = True,
        rejected: Rejected | None = None,
    ) -> None:
        self.client = client
        self.id = job_id
        self.created = created and rejected is None
        self.rejected = rejected

    def __repr__(self) -> str:
        return f"AsyncJobHandle({self.id!r})"

    async def info(self) -> Job:
        """The job's full record."""
        return await self.client.get(self.id)

    async def status(self) -> JobStatus:
        return (await self.info()).status

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the result. Raises JobFailed, JobCancelled, or JobTimeout after `timeout` s.
        Wakes as soon as the job finishes, without polling; any number of results can be awaited
        at once over one blocked connection (see scheduler.waiter)."""
        if self.rejected is not None:
            raise self.rejected
        [outcome] = await self.client._wait_finished([self.id], timeout)
        return _outcome(outcome)

    async def cancel(self) -> bool:
        """Cancel the job; True if it is cancelled or its worker was told to stop it."""
        return await self.client._cancel(self.id)

    def stream(self, timeout: float | None = None) -> AsyncChunkStream:
        """The job's chunks as they come (`async for chunk in handle.stream()`), then the end:
        the iteration stops when the job succeeded, or raises JobFailed or JobCancelled as
        result() does. A StreamRestart in line says the job started over on another worker (what
        came before it is void); StreamTruncated says chunks were trimmed by the stream's cap
        before this reader got them. A job that does not stream yields nothing and ends when it
        does. JobTimeout after `timeout` s. See scheduler.streaming."""
        return AsyncChunkStream(
            self.id, lambda: self.client.store, lambda: self.client.retry, _outcome, timeout
        )

    def __await__(self) -> Generator[Any, None, Any]:
        """`await handle` is `await handle.result()`."""
        return self.result().__await__()


class NoRedisUrl(BilevelError, ValueError):
    """A client was made with no Redis URL anywhere and without asking for a private one."""

    def __init__(self) -> None:
        super().__init__(
            "no Redis URL: pass one, e.g. Client('redis://127.0.0.1:6379/0', namespace='demo'), "
            "or set BILEVEL_REDIS_URL (and BILEVEL_NAMESPACE); `bilevel serve` prints the URL of "
            "its embedded Redis. Client(embedded=True) starts a private Redis instead, for tests "
            "and notebooks that also start a service on it."
        )


def client_settings(
    url: str | None,
    namespace: str | None,
    settings: Settings | None,
    *,
    require_service: bool | None,
    embedded: bool,
) -> Settings:
    """The settings a client runs with: `settings` (or the environment's) with the URL, namespace
    and require_service given explicitly on top; NoRedisUrl when no URL is known and no private
    server was asked for."""
    base = settings or Settings()
    update: dict[str, Any] = {}
    if url is not None:
        update["redis_url"] = SecretStr(url)
    if namespace is not None:
        update["namespace"] = namespace
    if require_service is not None:
        update["require_service"] = require_service
    # Validated again (not model_copy): a namespace in the URL, or a bad namespace, must count.
    merged = Settings(**{**base.model_dump(), **update}) if update else base
    if merged.url() is None and not embedded:
        raise NoRedisUrl()
    return merged


class AsyncClient:
    """Submits jobs to a bilevel deployment. Use `async with AsyncClient(...) as client:`."""

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        settings: Settings | None = None,
        require_service: bool | None = None,
        embedded: bool = False,
    ) -> None:
        self.settings = client_settings(
            url, namespace, settings, require_service=require_service, embedded=embedded
        )
        self.embedded: EmbeddedRedis | None = None
        self._store: Store | None = None
        self._retry: OutageRetry | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("client is not connected: use `async with` or await connect()")
        return self._store

    @property
    def url(self) -> str:
        """The Redis URL in use (an embedded server's included); contains credentials if any."""
        url = self.settings.url()
        if url is None:
            raise RuntimeError("client is not connected")
        return url

    async def connect(self) -> Self:
        if self._store is not None:
            return self
        configure_logging(self.settings.log_format, self.settings.log_level)
        url = self.settings.url()
        if url is None:
            self.embedded = EmbeddedRedis(appendfsync=self.settings.appendfsync).start()
            url = self.embedded.url
            self.settings = self.settings.model_copy(update={"redis_url": SecretStr(url)})
        redis = client_from_url(url)
        try:
            await check_connection(redis, url)
        except BaseException:
            await redis.aclose()
            self._stop_embedded()
            raise
        self._store = Store(redis, self.settings)
        self._retry = OutageRetry(str(parse_address(url)), self.settings.outage_retry_s)
        return self

    @property
    def retry(self) -> OutageRetry:
        if self._retry is None:
            raise RuntimeError("client is not connected: use `async with` or await connect()")
        return self._retry

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            await self._store.redis.aclose()
            self._store = None
        self._stop_embedded()

    def _stop_embedded(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def submit(
        self,
        job_type: str,
        payload: Any = None,
        *,
        priority: int = 0,
        deadline_s: float | None = None,
        delay_s: float = 0.0,
        idempotency_key: str | None = None,
        tenant: str | None = None,
        tags: Sequence[str] = (),
        max_retries: int | None = None,
        timeout_s: float | None = None,
    ) -> AsyncJobHandle:
        """Submit one job. Raises InvalidJob (naming the field) before anything is written, and
        Rejected (naming the cap, with a retry-after hint) when admission control refuses it."""
        request = JobRequest(
            job_type, payload, priority, deadline_s, delay_s, idempotency_key, tenant, tags,
            max_retries, timeout_s,
        )  # fmt: skip
        [handle] = await self.submit_many([request])
        if handle.rejected is not None:
            raise handle.rejected
        return handle

    async def submit_many(self, requests: Iterable[JobRequest]) -> list[AsyncJobHandle]:
        """Submit many jobs in one round trip. All are validated first: if one is invalid,
        InvalidJob names it (`jobs[i].field`) and none is written. Admission control judges each
        job on its own, in order: a handle per job, and a refused job's handle carries its
        Rejected (`handle.rejected`; nothing was written for it) while the others go ahead."""
        new_jobs: list[NewJob] = []
        for i, request in enumerate(requests):
            try:
                spec, text = build_spec(
                    request.job_type,
                    request.payload,
                    request.options(),
                    max_payload_bytes=self.settings.max_payload_bytes,
                )
            except InvalidJob as exc:
                raise InvalidJob(f"jobs[{i}].{exc.field}", exc.message) from None
            new_jobs.append(NewJob(new_job_id(), spec, text))
        if not new_jobs:
            return []
        # Retried with the same job ids, so a submit whose reply was lost is not made twice.
        results = await self.retry.call(lambda: self.store.submit_jobs(new_jobs), "submit")
        return [
            AsyncJobHandle(self, s.job_id, created=s.code is Code.OK, rejected=s.rejected)
            for s in results
        ]

    def handle(self, job_id: str) -> AsyncJobHandle:
        """A handle for a job submitted earlier (by id)."""
        return AsyncJobHandle(self, job_id, created=False)

    async def gather(
        self,
        handles: Sequence[AsyncJobHandle],
        *,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """The results of many jobs, in order, like asyncio.gather over their result() calls but
        in a few round trips: one registers every wait, one blocked connection delivers the
        completions, one reads the outcomes. The first failure (JobFailed, JobCancelled) is
        raised unless `return_exceptions`; JobTimeout names a job still unfinished at `timeout`."""
        outcomes = await self._wait_finished([h.id for h in handles], timeout)
        results: list[Any] = []
        for outcome in outcomes:
            try:
                results.append(_outcome(outcome))
            except (JobFailed, JobCancelled) as exc:
                if not return_exceptions:
                    raise
                results.append(exc)
        return results

    async def _wait_finished(self, ids: Sequence[str], timeout: float | None) -> list[Outcome]:
        """Outcomes of `ids` once all have finished; JobTimeout names one still unfinished at
        `timeout`. A connection lost meanwhile is waited out (see scheduler.waiter)."""
        if not ids:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        try:
            return await self.retry.call(
                lambda: self.store.wait_finished_many(ids, remaining()),
                "waiting for results",
                deadline_s=deadline,
            )
        except TimeoutError:
            current = await self.retry.call(lambda: self.store.outcomes(ids), "reading results")
            late = next((o.job_id for o in current if not o.status.finished), ids[0])
            raise JobTimeout(late, timeout or 0.0) from None

    async def _cancel(self, job_id: str) -> bool:
        attempts = 0

        async def cancel() -> Code:
            nonlocal attempts
            attempts += 1
            return await self.store.cancel(job_id)

        code = await self.retry.call(cancel, "cancel")
        if code is Code.ALREADY_FINISHED and attempts > 1:
            # An earlier attempt may have cancelled it before its reply was lost.
            outcome = await self.retry.call(lambda: self.store.outcome(job_id), "cancel")
            return outcome.status is JobStatus.CANCELLED
        return code in (Code.OK, Code.CANCEL_PENDING)

    async def get(self, job_id: str) -> Job:
        """The job's record; JobNotFound if there is none."""
        return await self.retry.call(lambda: self.store.get(job_id), "reading a job")

    async def stats(self, queues: Iterable[str] = ()) -> StoreStats:
        names = list(queues)
        return await self.retry.call(lambda: self.store.stats(names), "reading stats")

    # -- inspecting and repairing: listings, cancel, the dead-letter set ------------------------

    async def jobs(
        self,
        *,
        status: JobStatus | str | None = None,
        queue: str | None = None,
        tenant: str | None = None,
        order: ListOrder | str = ListOrder.NEWEST,
        limit: int = 100,
        cursor: str | None = None,
    ) -> JobPage:
        """One page of jobs, read from the store's indexes (scheduler.listing): by section
        (pending, queued, running, delayed, dead, finished), each newest first by its own time
        (`order="oldest"` for the other end); pass the page's `cursor` back for the next. A page
        reads at most `limit` rows and max(4 x limit, 500) index entries. Finished jobs are the succeeded
        and cancelled ones of the last result TTL, the newest keys.FINISHED_INDEX_LEN per queue.
        ValueError names a bad option; UnknownQueue a queue no job was routed to;
        InvalidCursor a cursor from elsewhere."""
        options = ListOptions.checked(status=status, queue=queue, tenant=tenant, order=order)
        return await self.retry.call(
            lambda: self.store.list_jobs(options, limit=limit, cursor=cursor), "listing jobs"
        )

    async def iter_jobs(
        self,
        *,
        status: JobStatus | str | None = None,
        queue: str | None = None,
        tenant: str | None = None,
        order: ListOrder | str = ListOrder.NEWEST,
        page_size: int = 500,
    ) -> AsyncIterator[JobSummary]:
        """Every job `jobs()` lists, page by page (one bounded read per page)."""
        cursor: str | None = None
        while True:
            page = await self.jobs(
                status=status, queue=queue, tenant=tenant, order=order, limit=page_size,
                cursor=cursor,
            )  # fmt: skip
            for job in page.jobs:
                yield job
            if page.cursor is None:
                return
            cursor = page.cursor

    async def dead_letters(
        self,
        *,
        queue: str | None = None,
        order: ListOrder | str = ListOrder.NEWEST,
        limit: int = 100,
        cursor: str | None = None,
    ) -> JobPage:
        """One page of the dead-letter sets (of `queue`, or all), newest death first; records
        that cannot be read are listed too (`unreadable` says why), so they can be purged."""
        return await self.jobs(
            status=JobStatus.DEAD, queue=queue, order=order, limit=limit, cursor=cursor
        )

    async def cancel(self, job_ids: Sequence[str]) -> list[Cancellation]:
        """Cancel jobs by id: what happened to each (see CancelOutcome). Safe to repeat: a
        cancel that lands twice finds the job cancelled already."""
        out: list[Cancellation] = []
        for job_id in job_ids:
            attempts = 0

            async def cancel(job_id: str = job_id) -> Code:
                nonlocal attempts
                attempts += 1
                return await self.store.cancel(job_id)

            code = await self.retry.call(cancel, "cancel")
            if code is Code.ALREADY_FINISHED and attempts > 1:
                # An earlier attempt may have cancelled it before its reply was lost.
                outcome = await self.retry.call(partial(self.store.outcome, job_id), "cancel")
                if outcome.status is JobStatus.CANCELLED:
                    code = Code.OK
            out.append(Cancellation(job_id, _CANCEL_OUTCOMES.get(code, CancelOutcome.CORRUPT)))
        return out

    async def replay(
        self,
        job_ids: Sequence[str],
        *,
        to: str | None = None,
        reset_retries: bool = True,
    ) -> ReplayReport:
        """Send dead-lettered jobs back to work: each leaves the dead-letter set and is queued in
        the queue it died in (at its old place in the order), or the ingress when it died before
        routing, or queue `to`; atomically per chunk of REPLAY_CHUNK ids. It keeps its attempts,
        latest error and history (a 'replayed' event is added). `reset_retries` gives it its
        full max_retries again; False leaves the budget spent, so one more failure dead-letters
        it. Refused, with the reason: unknown ids, jobs not dead, records that cannot run again.
        Retried through an outage: each request carries a token, and a repeat recognises the
        jobs it replayed already."""
        await self._check_destination(to)
        return await self._replay(job_ids, os.urandom(8).hex(), to, reset_retries)

    async def _check_destination(self, to: str | None) -> None:
        if to is not None:
            validate_name("queue", to)
            await self.retry.call(lambda: self.store.check_queue(to), "replay")

    async def _replay(
        self, job_ids: Sequence[str], token: str, to: str | None, reset_retries: bool
    ) -> ReplayReport:
        replayed: list[str] = []
        refused: list[Refusal] = []
        ids = list(dict.fromkeys(job_ids))
        for i in range(0, len(ids), REPLAY_CHUNK):
            chunk = ids[i : i + REPLAY_CHUNK]
            results = await self.retry.call(
                partial(
                    self.store.replay, chunk, token=token, to_queue=to, reset_retries=reset_retries
                ),
                "replay",
            )
            for job_id, (code, reason) in zip(chunk, results, strict=True):
                if code is Code.OK:
                    replayed.append(job_id)
                elif code is Code.CORRUPT:
                    why = f"cannot be replayed: {reason} (purge it instead)"
                    refused.append(Refusal(job_id, code, why))
                else:
                    refused.append(Refusal(job_id, code, reason))
        return ReplayReport(tuple(replayed), tuple(refused))

    async def replay_all(
        self,
        *,
        queue: str | None = None,
        to: str | None = None,
        reset_retries: bool = True,
    ) -> ReplayReport:
        """`replay` every job in the dead-letter sets (of `queue`, or all) that died before this
        call: oldest first, a page at a time, so a job that dies again meanwhile is not replayed
        twice. Records that cannot run again are refused and stay."""
        if queue is not None:
            await self.retry.call(lambda: self.store.check_queue(queue), "replay")
        await self._check_destination(to)
        token = os.urandom(8).hex()
        started_s = self.store.clock()
        replayed: list[str] = []
        refused: list[Refusal] = []
        cursor: str | None = None
        while True:
            page = await self.dead_letters(
                queue=queue, order=ListOrder.OLDEST, limit=REPLAY_CHUNK, cursor=cursor
            )
            ids = [j.id for j in page.jobs if j.index_time_s is None or j.index_time_s <= started_s]
            report = await self._replay(ids, token, to, reset_retries)
            replayed += report.replayed
            refused += report.refused
            if page.cursor is None or len(ids) < len(page.jobs):
                break
            cursor = page.cursor
        return ReplayReport(tuple(replayed), tuple(refused))

    async def purge(self, job_ids: Sequence[str]) -> PurgeReport:
        """Delete dead-lettered jobs by id: each record with its dead-letter entries, atomically
        per chunk of PURGE_CHUNK ids; unreadable records in a dead-letter set included. A job
        that is not dead is refused and left alone, as is an unknown id. Retried through an
        outage: deleting twice leaves the same state, and an id not found on a repeated
        attempt counts as purged (the first attempt may have deleted it)."""
        purged = 0
        refused: list[Refusal] = []
        ids = list(dict.fromkeys(job_ids))
        for i in range(0, len(ids), PURGE_CHUNK):
            chunk = ids[i : i + PURGE_CHUNK]
            attempts = 0

            async def purge(chunk: list[str] = chunk) -> list[tuple[Code, str]]:
                nonlocal attempts
                attempts += 1
                return await self.store.purge(chunk)

            results = await self.retry.call(purge, "purge")
            for job_id, (code, reason) in zip(chunk, results, strict=True):
                if code is Code.OK or (code is Code.NOT_FOUND and attempts > 1):
                    purged += 1
                else:
                    refused.append(Refusal(job_id, code, reason))
        return PurgeReport(purged, tuple(refused))

    async def purge_all(
        self, *, queue: str | None = None, older_than_s: float | None = None
    ) -> PurgeReport:
        """Delete every dead-lettered job (of `queue`, or all) that died before this call, or
        more than `older_than_s` seconds before it: oldest first, PURGE_CHUNK at a time, each
        chunk atomic; jobs dying meanwhile are kept. Retried through an outage (a repeated chunk
        deletes the next ones that match)."""
        if older_than_s is not None and not older_than_s >= 0:
            raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
        if queue is not None:
            await self.retry.call(lambda: self.store.check_queue(queue), "purge")
        cutoff_ms = self.store.now_ms() - round((older_than_s or 0.0) * 1000)
        purged = dropped = 0
        more = True
        while more:
            deleted, stale, more = await self.retry.call(
                lambda: self.store.purge_dead(queue=queue, cutoff_ms=cutoff_ms, limit=PURGE_CHUNK),
                "purge",
            )
            purged += deleted
            dropped += stale
        return PurgeReport(purged, (), dropped)


# Jobs per replay or purge script call: each call is atomic, and short enough for the server
# (a few ms) that other clients are not held up behind it.
REPLAY_CHUNK = 100
PURGE_CHUNK = 100

_CANCEL_OUTCOMES = {
    Code.OK: CancelOutcome.CANCELLED,
    Code.CANCEL_PENDING: CancelOutcome.STOPPING,
    Code.ALREADY_FINISHED: CancelOutcome.ALREADY_FINISHED,
    Code.NOT_FOUND: CancelOutcome.NOT_FOUND,
    Code.CORRUPT: CancelOutcome.CORRUPT,
}


class _LoopThread:
    """An event loop running in a daemon thread, for calling async code from sync code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="bilevel-client", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class JobHandle:
    """The synchronous face of AsyncJobHandle."""

    def __init__(self, inner: AsyncJobHandle, runner: _LoopThread) -> None:
        self._inner = inner
        self._runner = runner

    @property
    def id(self) -> str:
        return self._inner.id

    @property
    def created(self) -> bool:
        return self._inner.created

    @property
    def rejected(self) -> Rejected | None:
        """Why admission control refused the job (nothing was written), or None."""
        return self._inner.rejected

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"

    def _run(self, awaitable: Awaitable[T]) -> T:
        async def wrap() -> T:
            return await awaitable

        return self._runner.run(wrap())

    def info(self) -> Job:
        return self._run(self._inner.info())

    def status(self) -> JobStatus:
        return self._run(self._inner.status())

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the result; see AsyncJobHandle.result."""
        return self._run(self._inner.result(timeout))

    def cancel(self) -> bool:
        return self._run(self._inner.cancel())

    def stream(self, timeout: float | None = None) -> ChunkStream:
        """The job's chunks as they come (`for chunk in handle.stream()`); see
        AsyncJobHandle.stream."""
        return ChunkStream(self._inner.stream(timeout), self._run)


class Client:
    """Synchronous client: the same API as AsyncClient, for code without an event loop."""

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        settings: Settings | None = None,
        require_service: bool | None = None,
        embedded: bool = False,
    ) -> None:
        self._async = AsyncClient(
            url,
            namespace=namespace,
            settings=settings,
            require_service=require_service,
            embedded=embedded,
        )
        self._runner: _LoopThread | None = None

    @property
    def settings(self) -> Settings:
        return self._async.settings

    @property
    def url(self) -> str:
        return self._async.url

    @property
    def async_client(self) -> AsyncClient:
        return self._async

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._runner is None:
            raise RuntimeError("client is not connected: use `with Client(...)` or connect()")
        return self._runner.run(coro)

    def connect(self) -> Self:
        if self._runner is None:
            self._runner = _LoopThread()
            try:
                self._runner.run(self._async.connect())
            except BaseException:
                self._runner.stop()
                self._runner = None
                raise
        return self

    def close(self) -> None:
        if self._runner is not None:
            self._runner.run(self._async.close())
            self._runner.stop()
            self._runner = None

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _wrap(self, handle: AsyncJobHandle) -> JobHandle:
        assert self._runner is not None
        return JobHandle(handle, self._runner)

    def submit(
        self,
        job_type: str,
        payload: Any = None,
        *,
        priority: int = 0,
        deadline_s: float | None = None,
        delay_s: float = 0.0,
        idempotency_key: str | None = None,
        tenant: str | None = None,
        tags: Sequence[str] = (),
        max_retries: int | None = None,
        timeout_s: float | None = None,
    ) -> JobHandle:
        """Submit one job; see AsyncClient.submit."""
        request = JobRequest(
            job_type, payload, priority, deadline_s, delay_s, idempotency_key, tenant, tags,
            max_retries, timeout_s,
        )  # fmt: skip
        [handle] = self.submit_many([request])
        if handle.rejected is not None:
            raise handle.rejected
        return handle

    def submit_many(self, requests: Iterable[JobRequest]) -> list[JobHandle]:
        return [self._wrap(h) for h in self._run(self._async.submit_many(list(requests)))]

    def handle(self, job_id: str) -> JobHandle:
        return self._wrap(self._async.handle(job_id))

    def gather(
        self,
        handles: Sequence[JobHandle],
        *,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """The results of many jobs, in order; see AsyncClient.gather."""
        inner = [h._inner for h in handles]
        return self._run(
            self._async.gather(inner, timeout=timeout, return_exceptions=return_exceptions)
        )

    def get(self, job_id: str) -> Job:
        return self._run(self._async.get(job_id))

    def stats(self, queues: Iterable[str] = ()) -> StoreStats:
        return self._run(self._async.stats(list(queues)))

    def jobs(
        self,
        *,
        status: JobStatus | str | None = None,
        queue: str | None = None,
        tenant: str | None = None,
        order: ListOrder | str = ListOrder.NEWEST,
        limit: int = 100,
        cursor: str | None = None,
    ) -> JobPage:
        """One page of jobs; see AsyncClient.jobs."""
        return self._run(
            self._async.jobs(
                status=status, queue=queue, tenant=tenant, order=order, limit=limit,
                cursor=cursor,
            )
        )  # fmt: skip

    def iter_jobs(
        self,
        *,
        status: JobStatus | str | None = None,
        queue: str | None = None,
        tenant: str | None = None,
        order: ListOrder | str = ListOrder.NEWEST,
        page_size: int = 500,
    ) -> Iterator[JobSummary]:
        """Every job `jobs()` lists, page by page; see AsyncClient.iter_jobs."""
        cursor: str | None = None
        while True:
            page = self.jobs(
                status=status, queue=queue, tenant=tenant, order=order, limit=page_size,
                cursor=cursor,
            )  # fmt: skip
            yield from page.jobs
            if page.cursor is None:
                return
            cursor = page.cursor

    def dead_letters(
        self,
        *,
        queue: str | None = None,
        order: ListOrder | str = ListOrder.NEWEST,
        limit: int = 100,
        cursor: str | None = None,
    ) -> JobPage:
        """One page of the dead-letter sets; see AsyncClient.dead_letters."""
        return self._run(
            self._async.dead_letters(queue=queue, order=order, limit=limit, cursor=cursor)
        )

    def cancel(self, job_ids: Sequence[str]) -> list[Cancellation]:
        """Cancel jobs by id; see AsyncClient.cancel."""
        return self._run(self._async.cancel(list(job_ids)))

    def replay(
        self, job_ids: Sequence[str], *, to: str | None = None, reset_retries: bool = True
    ) -> ReplayReport:
        """Send dead-lettered jobs back to work; see AsyncClient.replay."""
        return self._run(self._async.replay(list(job_ids), to=to, reset_retries=reset_retries))

    def replay_all(
        self, *, queue: str | None = None, to: str | None = None, reset_retries: bool = True
    ) -> ReplayReport:
        """Replay the whole dead-letter set (of `queue`); see AsyncClient.replay_all."""
        return self._run(self._async.replay_all(queue=queue, to=to, reset_retries=reset_retries))

    def purge(self, job_ids: Sequence[str]) -> PurgeReport:
        """Delete dead-lettered jobs by id; see AsyncClient.purge."""
        return self._run(self._async.purge(list(job_ids)))

    def purge_all(
        self, *, queue: str | None = None, older_than_s: float | None = None
    ) -> PurgeReport:
        """Delete the dead-letter set (of `queue`, older than `older_than_s`); see
        AsyncClient.purge_all."""
        return self._run(self._async.purge_all(queue=queue, older_than_s=older_than_s))
