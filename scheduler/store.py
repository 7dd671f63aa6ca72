"""The Redis job store: every job state change is one atomic Lua script (scheduler/lua/*.lua).

`Store` is asyncio-native. Times come from an injected clock (seconds), so tests can move time without
sleeping; the scripts receive `now` in ms as an argument instead of reading the server's clock.

Corrupt data never stops serving. What Redis holds may have been overwritten by hand or by another
program, so every reader checks what it reads: the scripts settle what they can judge themselves
(keys of the wrong type, missing or garbled fields, entries pointing nowhere; see _common.lua) and
report it, and this module judges the JSON the scripts hand back (scheduler/records.py). Either
way the victim is dead-lettered as CorruptJob with the reason, or a stale entry is dropped, and
every other job of the batch is served. Replies that carry stored text are read as bytes and
decoded here, so a value that is not UTF-8 is one corrupt field, not a failed call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from scheduler import jsonvalue
from scheduler.codes import Code, codes
from scheduler.connection import MAX_BLOCK_S, parse_address
from scheduler.errors import JobNotFound, NoService, RedisUnavailable, Rejected, UnknownQueue
from scheduler.keys import INGRESS_QUEUE, RECORD_LOADS_LEN, Keys
from scheduler.listing import (
    DEFAULT_BUDGET_PER_ROW,
    MAX_BUDGET,
    MAX_LIMIT,
    MIN_DEFAULT_BUDGET,
    JobPage,
    ListOptions,
    Position,
    decode_cursor,
    encode_cursor,
    parse_history,
    parse_rows,
)
from scheduler.logs import get_logger
from scheduler.models import ErrorInfo, Job, JobSpec, JobStatus
from scheduler.records import (
    PARSE_ERRORS,
    CorruptRecord,
    decode_text,
    parse_ms,
    parse_route_view,
    parse_stored_spec,
    route_view_of,
)
from scheduler.retry import Backoff
from scheduler.scripts import Scripts, run_raw
from scheduler.settings import Settings
from scheduler.streams import Entry, parse_entries
from scheduler.waiter import ResultWaiter

Clock = Callable[[], float]

log = get_logger("bilevel.store")


@dataclass(frozen=True, slots=True)
class NewJob:
    """A validated submission ready for the store (see models.build_spec)."""

    id: str
    spec: JobSpec
    spec_json: str


@dataclass(frozen=True, slots=True)
class Submitted:
    """What submit did with one job: created (OK), an earlier job's id (DUPLICATE), or refused by
    admission control (REJECTED, with the refusal; nothing was written)."""

    code: Code
    job_id: str
    rejected: Rejected | None = None


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """What level 1 needs of a pending job: no payload. Built only from a validated routing view
    (records.RouteView): tags are strings, the priority an int in 0..MAX_PRIORITY, the deadline
    (seconds after submission) finite and positive, `created_s` finite."""

    id: str
    job_type: str
    priority: int
    deadline_s: float | None
    tenant: str | None
    tags: tuple[str, ...]
    created_s: float


@dataclass(frozen=True, slots=True)
class Lease:
    """A job leased to a worker. `token` identifies this attempt in heartbeat, complete and fail."""

    job_id: str
    token: int
    spec: JobSpec
    queue: str


@dataclass(frozen=True, slots=True)
class RunReport:
    """What a worker measured of one attempt, for the recording (Keys.record): the seconds its
    handler ran (a batch's time split over its jobs) and the tokens the handler reported (see
    workers.usage). None: not known."""

    run_s: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None


def _opt_us(seconds: float | None) -> str | int:
    # Microseconds: a fast handler's run would round to 0 ms.
    return "" if seconds is None else max(0, round(seconds * 1_000_000))


def _opt_count(count: int | None) -> str | int:
    return "" if count is None else count


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a job ended (or that it has not yet): what a waiting client needs."""

    job_id: str
    status: JobStatus
    result: Any
    error: ErrorInfo | None


@dataclass(frozen=True, slots=True)
class QueueStats:
    name: str
    depth: int
    oldest_wait_s: float
    in_flight: int
    dead: int
    # Running totals since the namespace was created; rates are their deltas over time.
    enqueued_total: int = 0
    completed_total: int = 0
    failed_total: int = 0
    # Submits refused by admission control for this queue (see scheduler.admission).
    rejected_total: int = 0
    # Queued jobs per tenant ('' for jobs without one): the demand each tenant puts on the queue.
    tenants: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoreStats:
    ingress: int
    delayed: int
    queues: dict[str, QueueStats] = field(default_factory=dict)
    # Since the namespace was created: job records readers found corrupt (and dead-lettered), and
    # keys of the wrong Redis type they moved aside (see Keys.moved_aside).
    corrupt_records: int = 0
    keys_moved_aside: int = 0
    # Jobs per tenant waiting in the ingress ('' for jobs without one).
    ingress_tenants: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RequeueReport:
    requeued: int
    dead_lettered: int
    cancelled: int
    # Records in a lease set found corrupt and dead-lettered (CorruptJob).
    corrupt: int = 0


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


# Caps whose current value and limit the submit script reports in ms (the others count jobs).
_MS_CAPS = frozenset({"queue_max_wait_s"})


def _rejection(job_id: str, detail: str, tenant: str | None) -> Rejected:
    """The Rejected of submit.lua's refusal detail "cap, current, limit, retry_after_ms, queue"."""
    cap, current, limit, retry_ms, queue = detail.split("\t")
    scale = 1000.0 if cap in _MS_CAPS else 1.0
    return Rejected(
        job_id,
        cap,
        int(current) / scale,
        int(limit) / scale,
        int(retry_ms) / 1000,
        queue=queue or None,
        tenant=tenant,
    )


def _tenant_counts(flat: Sequence[Any]) -> dict[str, int]:
    """A flat HGETALL reply of tenant -> count as a dict; a count that is not a whole number
    (written by someone else) is left out rather than fail the whole stats call."""
    out: dict[str, int] = {}
    for i in range(0, len(flat), 2):
        text = str(flat[i + 1])
        if text.isdigit() and len(text) <= 15:
            out[str(flat[i])] = int(text)
    return out


_NO_REPORT: Final = RunReport()


def _routing_json(spec: JobSpec) -> str:
    o = spec.options
    return _routing_text(spec.job_type, o.priority, o.tags, o.tenant, o.deadline_s)


@functools.lru_cache(maxsize=4096)
def _routing_text(
    job_type: str,
    priority: int,
    tags: tuple[str, ...],
    tenant: str | None,
    deadline_s: float | None,
) -> str:
    # Jobs of one type mostly share options, so their routing views are the same few strings.
    return jsonvalue.dumps(
        {"t": job_type, "p": priority, "g": list(tags), "n": tenant, "d": deadline_s}
    )


class Store:
    """Job-store operations over one Redis connection pool, under one namespace."""

    def __init__(
        self,
        redis: aioredis.Redis,
        settings: Settings | None = None,
        *,
        clock: Clock = time.time,
        rng: random.Random | None = None,
        waiter_backoff: Backoff | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings or Settings()
        self.keys = Keys(self.settings.namespace)
        self.clock = clock
        # Only for retry jitter; injectable so tests are reproducible.
        self.rng = rng or random.Random()
        self._scripts = Scripts.register(redis)
        self._prefix = [self.keys.prefix]
        self._result_ttl_ms = _ms(self.settings.result_ttl_s)
        self._dead_ttl_ms = _ms(self.settings.dead_ttl_s)
        # The recording's cap as the scripts take it: 0 when recording is off.
        self._record_len = self.settings.record_max_len if self.settings.record else 0
        # How the result waiter paces its reconnects after a lost connection (tests slow it).
        self._waiter = ResultWaiter(redis, self.keys.inbox, self._watch, backoff=waiter_backoff)

    def now_ms(self) -> int:
        return _ms(self.clock())

    async def _run(self, script: AsyncScript, args: Sequence[Any]) -> Any:
        """Run a script that answers {reply, notices}; log the notices, return the reply."""
        reply, notices = await script(keys=self._prefix, args=args)
        _log_notices(notices)
        return reply

    async def _read_raw(self, *command: Any) -> Any:
        """A read command whose reply is left as bytes (see scripts.run_raw)."""
        client: Any = self.redis  # redis-py's execute_command is untyped
        return await client.execute_command(*command, **{NEVER_DECODE: True})

    async def _run_raw(self, script: AsyncScript, args: Sequence[Any]) -> Any:
        """`_run` with the reply left as bytes, for replies that carry stored text."""
        reply, notices = await run_raw(self.redis, script, self._prefix, args)
        _log_notices([n.decode() for n in notices])
        return reply

    # -- submit and route -------------------------------------------------------------------

    async def submit(self, jobs: Sequence[NewJob]) -> list[tuple[Code, str]]:
        """Put jobs into the ingress in one round trip; per job (OK, DUPLICATE or REJECTED, job
        id). See `submit_jobs`."""
        return [(s.code, s.job_id) for s in await self.submit_jobs(jobs)]

    async def submit_jobs(self, jobs: Sequence[NewJob]) -> list[Submitted]:
        """Put jobs into the ingress in one round trip, each admitted or refused (REJECTED, with
        the Rejected naming the cap; nothing written for it) by the admission caps the service
        published (scheduler.admission). With `settings.require_service`, NoService (nothing
        written) when no router serves the namespace."""
        if not jobs:
            return []
        now = self.now_ms()
        args: list[Any] = [
            now,
            _ms(self.settings.idempotency_ttl_s),
            "1" if self.settings.require_service else "0",
            len(jobs),
        ]
        for job in jobs:
            o = job.spec.options
            args += [
                job.id,
                job.spec_json,
                o.idempotency_key or "",
                o.priority,
                _ms(o.deadline_s) + now if o.deadline_s is not None else "",
                now + _ms(o.delay_s),
                o.max_retries if o.max_retries is not None else self.settings.max_retries,
                _routing_json(job.spec),
                job.spec.job_type,
                o.tenant or "",
            ]
        if self.settings.replica_acks:
            raw = await self._submit_replicated(args)
        else:
            raw = await self._run(self._scripts.submit, args)
        if len(raw) == 1 and int(raw[0]) == Code.NO_SERVICE:
            raise await self._no_service()
        out: list[Submitted] = []
        for i in range(0, len(raw), 3):
            code, job_id = Code(int(raw[i])), str(raw[i + 1])
            refusal = None
            if code is Code.REJECTED:
                refusal = _rejection(job_id, str(raw[i + 2]), jobs[i // 3].spec.options.tenant)
            out.append(Submitted(code, job_id, refusal))
        return out

    async def _submit_replicated(self, args: list[Any]) -> Any:
        """The submit script, then WAIT on the same connection (WAIT counts that connection's own
        writes). Too few replicas in time raise RedisUnavailable, which a client retries: the
        resent jobs are recognised by their ids, and the retry waits for the replicas again."""
        wanted = self.settings.replica_acks
        conn = self.redis.client()
        try:
            raw, notices = await self._scripts.submit(keys=self._prefix, args=args, client=conn)
            acked = int(await conn.wait(wanted, _ms(self.settings.replica_ack_timeout_s)))
        finally:
            await conn.aclose()
        _log_notices(notices)
        if acked < wanted:
            raise RedisUnavailable(
                self.where,
                None,
                f"NOREPLICAS: {acked} of {wanted} replicas confirmed the submit within "
                f"{self.settings.replica_ack_timeout_s:g} s",
            )
        return raw

    async def _no_service(self) -> NoService:
        return NoService(self.settings.namespace, self.where, await self.served_namespaces())

    @property
    def where(self) -> str:
        """The Redis server, as errors name it (host and port, never a secret)."""
        url = self.settings.url()
        return "<unknown>" if url is None else str(parse_address(url))

    async def served_namespaces(self, *, max_keys: int = 1_000_000) -> list[str]:
        """Namespaces on this Redis with a live router host (leader or standby), found by a
        bounded SCAN: for error messages, not for a hot path."""
        found: set[str] = set()
        scanned = 0
        async for key in self.redis.scan_iter(match="bilevel:{*}:health:router:*", count=10_000):
            namespace = str(key).split("{", 1)[1].split("}", 1)[0]
            found.add(namespace)
            scanned += 1
            if scanned >= max_keys:
                break
        return sorted(found)

    async def pending(self, limit: int) -> list[RouteInfo]:
        """The oldest `limit` jobs of the ingress with what routing needs. A job that cannot be
        routed (its record is not a hash, a field is missing or garbled, its routing view is not
        one) is dead-lettered as CorruptJob with the reason and left out, and the jobs behind it
        fill its place; a stale entry is dropped. Never raises for what a record holds."""
        out: list[RouteInfo] = []
        for _ in range(_PEEK_ROUNDS):
            want = limit - len(out)
            # The jobs already taken are still in the ingress, ahead of the rest: skip them.
            args = [want, len(out), self.now_ms(), self._dead_ttl_ms]
            raw = await self._run_raw(self._scripts.peek, args)
            corrupt: list[tuple[str, str]] = []
            for i in range(0, len(raw), 4):
                job_id = raw[i].decode()
                try:
                    out.append(_route_info(job_id, raw[i + 1], raw[i + 3], raw[i + 2]))
                except PARSE_ERRORS as exc:
                    corrupt.append((job_id, _corrupt_reason(exc)))
            if not corrupt:
                break
            await self._dead_letter_corrupt(corrupt)
            if len(raw) // 4 < want:
                break  # the ingress had no more
        return out

    async def wait_for_ingress(self, timeout_s: float) -> bool:
        """Block until a submit signals the ingress (True) or the timeout passes (False).
        Waits at most MAX_BLOCK_S per call."""
        return await self._wait_signal(self.keys.ingress_signal, timeout_s)

    async def _wait_signal(self, key: str, timeout_s: float) -> bool:
        try:
            got = await self.redis.blpop([key], timeout=_block_s(timeout_s))
        except ResponseError as exc:
            if not _wrong_type(exc):
                raise
            # The signal key holds something else. The reader that comes before every wait
            # (peek for the ingress, lease for a queue) moves it aside; until then, wait out
            # the timeout as if no signal came, rather than fail and spin.
            log.error("store.signal_key_wrong_type", key=key)
            await asyncio.sleep(_block_s(timeout_s))
            return False
        return got is not None

    async def enqueue(self, assignments: Sequence[tuple[str, str]]) -> list[Code]:
        """Move (job id, queue) pairs from the ingress into their queues in one round trip."""
        if not assignments:
            return []
        args: list[Any] = [self.now_ms(), self._dead_ttl_ms, len(assignments)]
        for job_id, queue in assignments:
            args += [job_id, queue]
        return codes(await self._run(self._scripts.enqueue, args))

    async def promote_due(self, limit: int = 1000) -> int:
        """Queue delayed and retrying jobs whose time has come; returns how many. Corrupt ones
        are dead-lettered on the way, stale entries dropped."""
        args = [self.now_ms(), limit, self._dead_ttl_ms]
        return int(await self._run(self._scripts.promote, args))

    # -- workers ----------------------------------------------------------------------------

    async def lease(self, queue: str, n: int = 1, *, lease_s: float | None = None) -> list[Lease]:
        """Lease up to `n` jobs from the head of `queue`. A worker never receives a corrupt record:
        it is dead-lettered with the reason (and a stale member dropped) in its place."""
        lease_ms = _ms(lease_s if lease_s is not None else self.settings.lease_s)
        raw = await self._run_raw(
            self._scripts.lease, [queue, self.now_ms(), lease_ms, n, self._dead_ttl_ms]
        )
        leases: list[Lease] = []
        corrupt: list[tuple[str, str]] = []
        for i in range(0, len(raw), 3):
            job_id, token = raw[i].decode(), int(raw[i + 1])
            try:
                leases.append(Lease(job_id, token, parse_stored_spec(raw[i + 2]), queue))
            except PARSE_ERRORS as exc:
                corrupt.append((job_id, _corrupt_reason(exc)))
        if corrupt:
            await self._dead_letter_corrupt(corrupt)
        return leases

    async def wait_for_queue(self, queue: str, timeout_s: float) -> bool:
        """Block until `queue` is signalled (jobs arrived) or the timeout passes.
        Waits at most MAX_BLOCK_S per call."""
        return await self._wait_signal(self.keys.queue_signal(queue), timeout_s)

    async def heartbeat(
        self, leases: Sequence[tuple[str, int]], *, lease_s: float | None = None
    ) -> list[Code]:
        """Extend leases of (job id, token); CANCEL_REQUESTED tells the worker to stop that job."""
        if not leases:
            return []
        lease_ms = _ms(lease_s if lease_s is not None else self.settings.lease_s)
        args: list[Any] = [self.now_ms(), lease_ms, self._dead_ttl_ms, len(leases)]
        for job_id, token in leases:
            args += [job_id, token]
        return codes(await self._run(self._scripts.heartbeat, args))

    async def complete(
        self,
        results: Sequence[tuple[str, int, Any]],
        *,
        reports: Sequence[RunReport] | None = None,
    ) -> list[Code]:
        """Store results of (job id, token, result) in one round trip. Results must be JSON:
        InvalidJob names the first that is not, and then nothing is written. `reports`, one per
        result, is what the worker measured, for the recording."""
        if not results:
            return []
        encoded = [jsonvalue.encode(r, f"result of job {job_id}") for job_id, _, r in results]
        return await self.complete_encoded(
            [
                (job_id, token, text)
                for (job_id, token, _), text in zip(results, encoded, strict=True)
            ],
            reports=reports,
        )

    async def complete_encoded(
        self,
        results: Sequence[tuple[str, int, str]],
        *,
        reports: Sequence[RunReport] | None = None,
    ) -> list[Code]:
        """`complete` for results already encoded as JSON text."""
        if reports is not None and len(reports) != len(results):
            raise ValueError(f"{len(reports)} run reports for {len(results)} results")
        args: list[Any] = [self.now_ms(), self._result_ttl_ms, self._record_len, len(results)]
        for i, (job_id, token, text) in enumerate(results):
            r = reports[i] if reports is not None else _NO_REPORT
            args += [
                job_id,
                token,
                text,
                _opt_us(r.run_s),
                _opt_count(r.tokens_in),
                _opt_count(r.tokens_out),
            ]
        return codes(await self._run(self._scripts.complete, args))

    async def release(self, leases: Sequence[tuple[str, int]]) -> list[Code]:
        """Hand (job id, token) leases back to their queues unfinished, without charging the
        attempt against max_retries: for a worker that drains on reassignment or scale-down."""
        if not leases:
            return []
        args: list[Any] = [self.now_ms(), self._dead_ttl_ms, len(leases)]
        for job_id, token in leases:
            args += [job_id, token]
        return codes(await self._run(self._scripts.release, args))

    async def record_model_load(self, queue: str, load_s_by_type: Mapping[str, float]) -> None:
        """Add one entry to the recording's model loads (Keys.record_loads): a worker loaded
        these job types' models for `queue`, taking these seconds each. Nothing when recording
        is off or nothing was loaded."""
        if not self._record_len or not load_s_by_type:
            return
        await self.redis.xadd(
            self.keys.record_loads,
            {
                "q": queue,
                "at_ms": self.now_ms(),
                "loads": json.dumps({t: round(s, 4) for t, s in load_s_by_type.items()}),
            },
            maxlen=RECORD_LOADS_LEN,
            approximate=True,
        )

    def backoff_s(
        self, attempt: int, *, base_s: float | None = None, max_s: float | None = None
    ) -> float:
        """Retry delay after failed attempt number `attempt` (1-based), jitter included; `base_s`
        and `max_s` replace the settings' retry_backoff_s and retry_backoff_max_s."""
        s = self.settings
        first_s = s.retry_backoff_s if base_s is None else base_s
        cap_s = s.retry_backoff_max_s if max_s is None else max_s
        base = min(cap_s, first_s * 2.0 ** max(0, attempt - 1))
        return base * (1.0 + s.retry_jitter * (2.0 * self.rng.random() - 1.0))

    async def fail(
        self,
        job_id: str,
        token: int,
        error: ErrorInfo,
        *,
        retryable: bool = True,
        max_retries: int | None = None,
        backoff_s: float | None = None,
        backoff_max_s: float | None = None,
        run_s: float | None = None,
    ) -> Code:
        """Record a failed attempt: RETRY_SCHEDULED, DEAD_LETTERED, or OK when it was cancelled.
        `max_retries`, when given, replaces the record's budget (a handler's default for a job
        that did not set its own); `backoff_s` and `backoff_max_s` replace the settings'.
        `run_s` is how long the attempt ran, for the recording of a job that ends here."""
        args = [
            self.now_ms(),
            self._result_ttl_ms,
            job_id,
            token,
            error.model_dump_json(),
            "1" if retryable else "0",
            _ms(self.backoff_s(token, base_s=backoff_s, max_s=backoff_max_s)),
            "" if max_retries is None else max_retries,
            # A job that dies here is kept as long as any dead-lettered job (dead_ttl_s).
            self._dead_ttl_ms,
            self._record_len,
            _opt_us(run_s),
        ]
        return Code(int(await self._run(self._scripts.fail, args)))

    async def dead_letter(self, jobs: Sequence[tuple[str, ErrorInfo]]) -> list[Code]:
        """Send jobs to the dead-letter set with a reason, from any unfinished state."""
        if not jobs:
            return []
        args: list[Any] = [self.now_ms(), self._dead_ttl_ms, len(jobs)]
        for job_id, error in jobs:
            args += [job_id, error.model_dump_json()]
        return codes(await self._run(self._scripts.dead_letter, args))

    # -- control ----------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Code:
        """OK (cancelled now), CANCEL_PENDING (running; its worker stops it), ALREADY_FINISHED,
        NOT_FOUND, or CORRUPT (the record was unreadable: dead-lettered with the reason)."""
        args = [self.now_ms(), self._result_ttl_ms, job_id]
        return Code(int(await self._run(self._scripts.cancel, args)))

    async def requeue_expired(self, limit: int = 1000) -> RequeueReport:
        """Return jobs whose lease ran out to their queues (or the dead-letter set). Corrupt ones
        are dead-lettered on the way (counted in `corrupt`), stale entries dropped."""
        raw = await self._run(
            self._scripts.requeue_expired,
            [self.now_ms(), limit, self._result_ttl_ms, self._dead_ttl_ms, self._record_len],
        )
        return RequeueReport(int(raw[0]), int(raw[1]), int(raw[2]), int(raw[3]))

    async def move(self, job_ids: Sequence[str], to_queue: str) -> list[Code]:
        """Move waiting jobs to another queue, keeping their place in the order."""
        if not job_ids:
            return []
        args = [self.now_ms(), to_queue, self._dead_ttl_ms, len(job_ids), *job_ids]
        return codes(await self._run(self._scripts.move, args))

    async def queued_ids(self, queue: str, *, start: int = 0, stop: int = -1) -> list[str]:
        """Ids of the jobs waiting in `queue`, in serving order (a slice of it). Members that
        name no job are left out (the next lease drops them)."""
        members = await self._read_zset(self.keys.queue(queue), start, stop)
        return [
            m[_ORDER_HEAD:] for m in members if len(m) > _ORDER_HEAD and m[_ORDER_HEAD - 1] == ":"
        ]

    async def _read_zset(self, key: str, start: int, stop: int) -> list[str]:
        """Members of a sorted set, as text; ones that are not UTF-8 are left out, and a key of
        another type reads as empty (the next script to use it moves it aside)."""
        try:
            raw = await self._read_raw("ZRANGE", key, start, stop)
        except ResponseError as exc:
            if _wrong_type(exc):
                return []
            raise
        out = []
        for member in cast(list[bytes], raw):
            try:
                out.append(member.decode())
            except UnicodeDecodeError:
                continue
        return out

    async def stats(self, queues: Iterable[str] = ()) -> StoreStats:
        """Depth, oldest wait, in flight and dead per queue (every known queue when none given)."""
        names = list(queues)
        raw = await self._run(
            self._scripts.stats, [self.now_ms(), self._dead_ttl_ms, len(names), *names]
        )
        per_queue = {
            str(raw[i]): QueueStats(
                name=str(raw[i]),
                depth=int(raw[i + 1]),
                oldest_wait_s=int(raw[i + 2]) / 1000,
                in_flight=int(raw[i + 3]),
                dead=int(raw[i + 4]),
                enqueued_total=int(raw[i + 5]),
                completed_total=int(raw[i + 6]),
                failed_total=int(raw[i + 7]),
                rejected_total=int(raw[i + 8]),
                tenants=_tenant_counts(raw[i + 9]),
            )
            for i in range(5, len(raw), 10)
        }
        return StoreStats(
            ingress=int(raw[0]),
            delayed=int(raw[1]),
            queues=per_queue,
            corrupt_records=int(raw[2]),
            keys_moved_aside=int(raw[3]),
            ingress_tenants=_tenant_counts(raw[4]),
        )

    async def dead_ids(self, queue: str) -> list[str]:
        """Ids in a queue's dead-letter set, oldest first."""
        return await self._read_zset(self.keys.dead(queue), 0, -1)

    # -- listing, replay and purge -------------------------------------------------------------

    async def known_queues(self) -> list[str]:
        """Every queue a job was ever routed to in this namespace, sorted."""
        try:
            members = await self.redis.smembers(self.keys.queues)
        except ResponseError as exc:
            if _wrong_type(exc):
                return []
            raise
        return sorted(str(m) for m in members)

    async def check_queue(self, queue: str) -> None:
        """UnknownQueue when no job was ever routed to `queue` (INGRESS_QUEUE always exists)."""
        if queue == INGRESS_QUEUE:
            return
        known = await self.known_queues()
        if queue not in known:
            raise UnknownQueue(queue, [*known, INGRESS_QUEUE])

    async def list_jobs(
        self,
        options: ListOptions,
        *,
        limit: int = 100,
        cursor: str | None = None,
        budget: int | None = None,
    ) -> JobPage:
        """One page of jobs from the store's indexes (see scheduler.listing): at most `limit`
        rows, after examining at most `budget` entries (default max(4 x limit, 500), at most
        MAX_BUDGET). ValueError for a limit or budget out of range, InvalidCursor for a cursor
        this listing did not hand out, UnknownQueue for a queue filter no job was routed to."""
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit {limit} is out of range 1..{MAX_LIMIT}")
        if budget is None:
            budget = min(MAX_BUDGET, max(limit * DEFAULT_BUDGET_PER_ROW, MIN_DEFAULT_BUDGET))
        if not limit <= budget <= MAX_BUDGET:
            raise ValueError(f"budget {budget} is out of range {limit}..{MAX_BUDGET}")
        position = decode_cursor(cursor, options) if cursor is not None else None
        if options.queue is not None:
            await self.check_queue(options.queue)
        args = [
            self.now_ms(),
            self._dead_ttl_ms,
            options.order.value,
            limit,
            budget,
            options.status.value if options.status else "",
            options.queue or "",
            options.tenant or "",
            "" if position is None else position.section,
            "" if position is None else position.score,
            "" if position is None else position.member,
        ]
        raw = await self._run_raw(self._scripts.jobs, args)
        section, score, member = raw[0], raw[1], raw[2]
        next_cursor = None
        if section is not None:
            next_cursor = encode_cursor(
                options, Position(int(section), score.decode(), member.decode())
            )
        return JobPage(tuple(parse_rows(raw[3:])), next_cursor)

    async def replay(
        self, job_ids: Sequence[str], *, token: str, to_queue: str | None, reset_retries: bool
    ) -> list[tuple[Code, str]]:
        """Send dead-lettered jobs back to work in one step (replay.lua): per job the code and
        the reason of a refusal. `token` names the request: a repeat with the same token
        recognises the jobs it replayed already (C_OK) and changes nothing."""
        if not job_ids:
            return []
        args = [
            self.now_ms(),
            self._dead_ttl_ms,
            to_queue or "",
            "1" if reset_retries else "0",
            token,
            len(job_ids),
            *job_ids,
        ]
        raw = await self._run_raw(self._scripts.replay, args)
        return [(Code(int(raw[i])), raw[i + 1].decode()) for i in range(0, len(raw), 2)]

    async def purge(self, job_ids: Sequence[str]) -> list[tuple[Code, str]]:
        """Delete dead-lettered jobs by id, records and entries in one step (purge.lua): per
        job the code (OK, NOT_FOUND, WRONG_STATE for a job not dead) and the reason."""
        if not job_ids:
            return []
        args = [self.now_ms(), self._dead_ttl_ms, "ids", len(job_ids), *job_ids]
        raw = await self._run_raw(self._scripts.purge, args)
        return [(Code(int(raw[i])), raw[i + 1].decode()) for i in range(0, len(raw), 2)]

    async def purge_dead(
        self, *, queue: str | None, cutoff_ms: int, limit: int
    ) -> tuple[int, int, bool]:
        """Delete up to `limit` of the oldest dead-lettered jobs that died at or before
        `cutoff_ms` (in `queue`'s set, or every set) in one step: (records deleted, stale
        entries dropped, whether more may remain)."""
        args = [self.now_ms(), self._dead_ttl_ms, "all", queue or "", cutoff_ms, limit]
        deleted, dropped, more = await self._run(self._scripts.purge, args)
        return int(deleted), int(dropped), bool(int(more))

    # -- reading ----------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job:
        """The job's record. A corrupt record (not a hash, a field missing, garbled or not UTF-8)
        is not raised: an unfinished one is dead-lettered with the reason, and the Job returned
        is a stand-in holding what could be read, with the reason as its error."""
        raw = await self._hgetall(job_id)
        if raw is None:
            raise JobNotFound(job_id)
        try:
            return _job_from_hash(job_id, raw)
        except PARSE_ERRORS as exc:
            reason = _corrupt_reason(exc)
        if raw.get("status", b"").decode(errors="replace") not in _FINISHED_VALUES:
            await self._dead_letter_corrupt([(job_id, reason)])
            raw = await self._hgetall(job_id) or {}
        return _corrupt_job(job_id, raw, reason)

    async def _hgetall(self, job_id: str) -> dict[str, bytes] | None:
        """A job's fields as stored (None: no record); a key that is not a hash reads as an
        empty record, which the caller finds corrupt."""
        try:
            raw = await self._read_raw("HGETALL", self.keys.job(job_id))
        except ResponseError as exc:
            if _wrong_type(exc):
                return {}
            raise
        return _field_names(raw) or None

    async def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        """Records of many jobs in one round trip; None where a record does not exist. Corrupt
        ones are dead-lettered as `get` does."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.execute_command("HGETALL", self.keys.job(job_id), **{NEVER_DECODE: True})
        rows: list[Any] = await pipe.execute(raise_on_error=False)
        out: list[Job | None] = []
        for job_id, raw in zip(job_ids, rows, strict=True):
            if isinstance(raw, ResponseError) and not _wrong_type(raw):
                raise raw
            if not raw and not isinstance(raw, ResponseError):
                out.append(None)
                continue
            try:
                out.append(_job_from_hash(job_id, _field_names(raw)))
            except PARSE_ERRORS:
                out.append(await self.get(job_id))  # dead-letters it with the reason
        return out

    async def outcome(self, job_id: str) -> Outcome:
        """Status, result and error of a job, without reading its spec or payload."""
        [outcome] = await self.outcomes([job_id])
        return outcome

    async def outcomes(self, job_ids: Sequence[str]) -> list[Outcome]:
        """`outcome` of many jobs in one round trip. A record that cannot be read has a CorruptJob
        error saying why: a finished one keeps its status (its result reads as None); any other
        is dead-lettered, and reported DEAD."""
        if not job_ids:
            return []
        raw = await run_raw(self.redis, self._scripts.results, self._prefix, list(job_ids))
        out: list[Outcome] = []
        corrupt: list[tuple[str, str]] = []
        for i, job_id in enumerate(job_ids):
            status = raw[3 * i]
            try:
                out.append(_outcome(job_id, status, raw[3 * i + 1], raw[3 * i + 2]))
            except CorruptRecord as exc:
                error = ErrorInfo(type="CorruptJob", message=str(exc))
                finished = _STATUS_BY_VALUE.get(status.decode(errors="replace"))
                if finished is None or not finished.finished:
                    corrupt.append((job_id, str(exc)))
                    finished = JobStatus.DEAD
                out.append(Outcome(job_id, finished, None, error))
        if corrupt:
            await self._dead_letter_corrupt(corrupt)
        return out

    async def _dead_letter_corrupt(self, jobs: Sequence[tuple[str, str]]) -> None:
        """Dead-letter records this module found corrupt, as CorruptJob with the reasons."""
        for job_id, reason in jobs:
            log.warning("store.corrupt_job_dead_lettered", job_id=job_id, reason=reason)
        await self.dead_letter([(i, ErrorInfo(type="CorruptJob", message=m)) for i, m in jobs])

    async def wait_finished(self, job_id: str, timeout_s: float | None) -> Outcome:
        """Block until the job finishes (woken through this client's inbox, not by polling);
        returns its outcome. Raises TimeoutError when `timeout_s` passes first."""
        [outcome] = await self.wait_finished_many([job_id], timeout_s)
        return outcome

    async def wait_finished_many(
        self, job_ids: Sequence[str], timeout_s: float | None
    ) -> list[Outcome]:
        """`wait_finished` for many jobs: one call registers them all, one blocked connection
        delivers their completions, one call reads their outcomes. JobNotFound for an unknown id;
        TimeoutError when `timeout_s` passes before all have finished. A corrupt record is
        dead-lettered when it is watched, so its wait ends at once with its CorruptJob error."""
        seen = await self._waiter.wait(job_ids, timeout_s)
        known: dict[str, Outcome] = {}
        for job_id, status in zip(job_ids, seen, strict=True):
            if status is None:
                raise JobNotFound(job_id)
            if isinstance(status, tuple):
                # The finish notice carried the result: no read needed (unless it is unreadable:
                # then the record is read, and judged, below).
                with contextlib.suppress(CorruptRecord):
                    known[job_id] = _outcome(job_id, status[0], status[1], None)
        unread = [job_id for job_id in job_ids if job_id not in known]
        for i in range(0, len(unread), _READ_CHUNK):
            for outcome in await self.outcomes(unread[i : i + _READ_CHUNK]):
                known[outcome.job_id] = outcome
        return [known[job_id] for job_id in job_ids]

    async def _watch(self, job_ids: Sequence[str], client_id: str) -> list[str | None]:
        out: list[str | None] = []
        require = "1" if self.settings.require_service else "0"
        for i in range(0, len(job_ids), _READ_CHUNK):
            chunk = job_ids[i : i + _READ_CHUNK]
            args = [client_id, self._result_ttl_ms, self.now_ms(), require, len(chunk), *chunk]
            raw: list[Any] = await self._run(self._scripts.watch, args)
            if int(raw[0]) == Code.NO_SERVICE:
                raise await self._no_service()
            statuses: list[str | None] = raw[1:]
            # watch.lua marks a record it cannot read with '!' and the reason: dead-letter it now,
            # so nobody waits on a job no worker will ever finish.
            corrupt = [
                (job_id, s[1:])
                for job_id, s in zip(chunk, statuses, strict=True)
                if s is not None and s.startswith("!")
            ]
            if corrupt:
                await self._dead_letter_corrupt(corrupt)
            out += [
                JobStatus.DEAD.value if s is not None and s.startswith("!") else s for s in statuses
            ]
        return out

    # -- streams ----------------------------------------------------------------------------

    async def stream_append(
        self, job_id: str, token: int, first_index: int, chunks: Sequence[str]
    ) -> Code:
        """Append chunk JSON texts a streaming job yielded to its stream (Keys.stream), under lease
        `token`; `first_index` is the index within this attempt of chunks[0]. One round trip.
        OK; CANCEL_REQUESTED (nothing appended: stop and report the job); STALE_LEASE,
        ALREADY_FINISHED, NOT_FOUND (nothing appended: stop, do not report); CORRUPT (the record
        was dead-lettered). Safe to repeat: chunks already appended under the token are skipped."""
        args: list[Any] = [
            self.now_ms(),
            self._result_ttl_ms,
            self.settings.stream_max_len,
            job_id,
            token,
            first_index,
            len(chunks),
            *chunks,
        ]
        return Code(int(await self._run(self._scripts.stream_append, args)))

    async def stream_watch(self, job_id: str) -> JobStatus | None:
        """Say a reader waits on the job's stream, so its finish ends the stream even if it never
        streamed; returns its status (None: no such job). NoService (with
        `settings.require_service`) when it is unfinished and no router serves the namespace. A
        record that cannot be read is dead-lettered with the reason, and reads as DEAD."""
        require = "1" if self.settings.require_service else "0"
        args = [self.now_ms(), self._dead_ttl_ms, require, job_id]
        code, status = await self._run(self._scripts.stream_watch, args)
        if int(code) == Code.NO_SERVICE:
            raise await self._no_service()
        if status is None:
            return None
        if status.startswith("!"):
            await self._dead_letter_corrupt([(job_id, status[1:])])
            return JobStatus.DEAD
        return _STATUS_BY_VALUE[status]

    async def stream_read(
        self, job_id: str, after_id: str, *, block_s: float | None, count: int = 1000
    ) -> list[Entry]:
        """Up to `count` entries of the job's stream after entry `after_id` (scheduler.streams);
        with `block_s`, waits that long (at most MAX_BLOCK_S) for one to arrive, woken by the
        append itself (XREAD BLOCK), else returns at once. A stream key of the wrong type reads
        as empty after the wait (the next append moves it aside)."""
        key = self.keys.stream(job_id)
        block: list[Any] = [] if block_s is None else ["BLOCK", max(1, _ms(_block_s(block_s)))]
        try:
            raw = await self._read_raw("XREAD", "COUNT", count, *block, "STREAMS", key, after_id)
        except ResponseError as exc:
            if not _wrong_type(exc):
                raise
            log.error("store.stream_key_wrong_type", key=key)
            if block_s is not None:
                await asyncio.sleep(_block_s(block_s))
            return []
        return parse_entries(raw)

    async def close(self) -> None:
        """Stop waiting for results (the connection pool is the caller's to close)."""
        await self._waiter.close()


# Ids per script call when reading or watching many jobs (keeps each call short for the server).
_READ_CHUNK = 1000
_STATUS_BY_VALUE = {s.value: s for s in JobStatus}
_FINISHED_VALUES = frozenset(s.value for s in JobStatus if s.finished)
# Length of the order part of a queue member "<34 digits>:<id>", colon included (_common.lua).
_ORDER_HEAD = 35
# Calls to peek.lua at most per `pending`: later ones only refill the places of jobs found corrupt.
_PEEK_ROUNDS = 4


def _block_s(timeout_s: float) -> float:
    # Redis reads 0 as "block forever"; keep at least 1 ms, and at most MAX_BLOCK_S.
    return min(MAX_BLOCK_S, max(timeout_s, 0.001))


def _wrong_type(exc: ResponseError) -> bool:
    return str(exc).startswith("WRONGTYPE")


def _log_notices(notices: Sequence[str]) -> None:
    """Log what a script settled (see _common.lua): loudly, since each is data someone broke."""
    for i in range(0, len(notices), 3):
        kind, subject, detail = notices[i], notices[i + 1], notices[i + 2]
        if kind == "dead_lettered":
            log.warning("store.corrupt_job_dead_lettered", job_id=subject, reason=detail)
        elif kind == "dropped":
            log.warning("store.entry_dropped", index=subject, entry=detail)
        else:  # moved_aside, counter_reset
            log.error(f"store.{kind}", key=subject, detail=detail)


def _route_info(
    job_id: str, rt: bytes | None, spec_text: bytes | None, created_ms: bytes
) -> RouteInfo:
    """A pending job's RouteInfo from its stored fields; CorruptRecord saying why it has none."""
    if rt is None:
        # A record without its routing view: derive it from the spec, which must be sound.
        if spec_text is None:
            raise CorruptRecord("job record has neither a routing view nor a spec")
        view = route_view_of(parse_stored_spec(spec_text))
    else:
        view = parse_route_view(rt)
    return RouteInfo(
        id=job_id,
        job_type=view.job_type,
        priority=view.priority,
        deadline_s=view.deadline_s,
        tenant=view.tenant,
        tags=view.tags,
        created_s=parse_ms(created_ms, "created_ms") / 1000,
    )


def _corrupt_reason(exc: BaseException) -> str:
    if isinstance(exc, CorruptRecord):
        return str(exc)
    return f"job record is corrupt: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def _field_names(raw: dict[bytes, bytes]) -> dict[str, bytes]:
    # Field names are the store's own; a stray one that is not UTF-8 cannot be one of them.
    return {k.decode(errors="replace"): v for k, v in raw.items()}


def _text(raw: dict[str, bytes], name: str) -> str | None:
    value = raw.get(name)
    return None if value is None else decode_text(value, name)


def _opt_s(raw: dict[str, bytes], name: str) -> float | None:
    value = raw.get(name)
    return None if value is None else parse_ms(value, name) / 1000


def _status(text: str | None) -> JobStatus:
    if text is None:
        raise CorruptRecord("job record has no status")
    status = _STATUS_BY_VALUE.get(text)
    if status is None:
        raise CorruptRecord(f"job record is corrupt: its status {text[:60]!r} is not a status")
    return status


def _json(text: str | bytes | None, field: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except PARSE_ERRORS as exc:
        raise CorruptRecord(f"job record's {field} is not JSON: {exc}") from None


def _error(text: str | bytes | None) -> ErrorInfo | None:
    if text is None:
        return None
    try:
        return ErrorInfo.model_validate_json(text)
    except PARSE_ERRORS as exc:
        first = str(exc).splitlines()[0]
        raise CorruptRecord(f"job record's error is unreadable: {first}") from None


def _job_from_hash(job_id: str, raw: dict[str, bytes]) -> Job:
    spec = raw.get("spec")
    if spec is None:
        raise CorruptRecord("job record has no spec")
    created = raw.get("created_ms")
    if created is None:
        raise CorruptRecord("job record has no created_ms")
    attempts = raw.get("attempts")
    maxr, released = raw.get("maxr"), raw.get("released")
    result = raw.get("result")
    return Job(
        id=job_id,
        spec=parse_stored_spec(spec),
        status=_status(_text(raw, "status")),
        queue=_text(raw, "queue"),
        attempts=0 if attempts is None else parse_ms(attempts, "attempts"),
        created_s=parse_ms(created, "created_ms") / 1000,
        started_s=_opt_s(raw, "started_ms"),
        finished_s=_opt_s(raw, "finished_ms"),
        result=_json(raw.get("result"), "result"),
        error=_error(raw.get("error")),
        cancel_requested=raw.get("cancel") == b"1",
        max_retries=None if maxr is None else parse_ms(maxr, "maxr"),
        charged_attempts=(
            None
            if attempts is None
            else max(
                0,
                parse_ms(attempts, "attempts")
                - (0 if released is None else parse_ms(released, "released")),
            )
        ),
        result_bytes=None if result is None else len(result),
        history=parse_history(raw.get("history")),
    )


def _corrupt_job(job_id: str, raw: dict[str, bytes], reason: str) -> Job:
    """A readable stand-in for a record that could not be parsed: its status when it finished
    (an unfinished one was dead-lettered, and is DEAD now), what else can be read, and as its
    error the record's own (the scripts' reason, for a record they replaced) or else `reason`."""

    def readable(read: Callable[[], Any]) -> Any:
        try:
            return read()
        except PARSE_ERRORS:
            return None

    status = _STATUS_BY_VALUE.get(raw.get("status", b"").decode(errors="replace"))
    if status is None or not status.finished:
        status = JobStatus.DEAD
    queue = raw.get("queue")
    return Job(
        id=job_id,
        spec=readable(lambda: parse_stored_spec(raw["spec"])) or JobSpec(job_type="unknown"),
        status=status,
        queue=None if queue is None else queue.decode(errors="replace"),
        attempts=readable(lambda: parse_ms(raw["attempts"], "attempts")) or 0,
        created_s=readable(lambda: _opt_s(raw, "created_ms")) or 0.0,
        started_s=readable(lambda: _opt_s(raw, "started_ms")),
        finished_s=readable(lambda: _opt_s(raw, "finished_ms")),
        result=readable(lambda: _json(raw.get("result"), "result")),
        error=readable(lambda: _error(raw.get("error")))
        or ErrorInfo(type="CorruptJob", message=reason),
        history=parse_history(raw.get("history")),
    )


def _outcome(
    job_id: str, status: str | bytes | None, result: str | bytes | None, error: str | bytes | None
) -> Outcome:
    """An Outcome from a record's status, result and error; JobNotFound when there is no
    record, CorruptRecord when it is not what the store writes."""
    if status is None:
        raise JobNotFound(job_id)
    text = status.decode(errors="replace") if isinstance(status, bytes) else status
    if text.startswith("!"):  # results.lua's mark of a record it could not read
        raise CorruptRecord(text[1:])
    return Outcome(job_id, _status(text), _json(result, "result"), _error(error))


__all__ = [
    "Lease",
    "NewJob",
    "Outcome",
    "QueueStats",
    "RequeueReport",
    "RouteInfo",
    "Store",
    "StoreStats",
]
