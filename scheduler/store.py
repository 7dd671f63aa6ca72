"""The Redis job store: every job state change is one atomic Lua script (scheduler/lua/*.lua).

`Store` is asyncio-native. Times come from an injected clock (seconds), so tests can move time without
sleeping; the scripts receive `now` in ms as an argument instead of reading the server's clock.
"""

from __future__ import annotations

import functools
import json
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis

from scheduler import jsonvalue
from scheduler.codes import Code, codes
from scheduler.connection import MAX_BLOCK_S, parse_address
from scheduler.errors import JobNotFound, NoService, RedisUnavailable
from scheduler.keys import Keys
from scheduler.models import ErrorInfo, Job, JobSpec, JobStatus, parse_spec
from scheduler.retry import Backoff
from scheduler.scripts import Scripts
from scheduler.settings import Settings
from scheduler.waiter import ResultWaiter

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class NewJob:
    """A validated submission ready for the store (see models.build_spec)."""

    id: str
    spec: JobSpec
    spec_json: str


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """What level 1 needs of a pending job: no payload."""

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


@dataclass(frozen=True, slots=True)
class StoreStats:
    ingress: int
    delayed: int
    queues: dict[str, QueueStats] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RequeueReport:
    requeued: int
    dead_lettered: int
    cancelled: int


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


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
        # How the result waiter paces its reconnects after a lost connection (tests slow it).
        self._waiter = ResultWaiter(redis, self.keys.inbox, self._watch, backoff=waiter_backoff)

    def now_ms(self) -> int:
        return _ms(self.clock())

    # -- submit and route -------------------------------------------------------------------

    async def submit(self, jobs: Sequence[NewJob]) -> list[tuple[Code, str]]:
        """Put jobs into the ingress in one round trip; per job (OK or DUPLICATE, job id).
        With `settings.require_service`, NoService (nothing written) when no router serves the
        namespace."""
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
                o.max_retries,
                _routing_json(job.spec),
            ]
        if self.settings.replica_acks:
            raw = await self._submit_replicated(args)
        else:
            raw = await self._scripts.submit(keys=self._prefix, args=args)
        if len(raw) == 1 and int(raw[0]) == Code.NO_SERVICE:
            raise await self._no_service()
        return [(Code(int(raw[i])), str(raw[i + 1])) for i in range(0, len(raw), 2)]

    async def _submit_replicated(self, args: list[Any]) -> Any:
        """The submit script, then WAIT on the same connection (WAIT counts that connection's own
        writes). Too few replicas in time raise RedisUnavailable, which a client retries: the
        resent jobs are recognised by their ids, and the retry waits for the replicas again."""
        wanted = self.settings.replica_acks
        conn = self.redis.client()
        try:
            raw = await self._scripts.submit(keys=self._prefix, args=args, client=conn)
            acked = int(await conn.wait(wanted, _ms(self.settings.replica_ack_timeout_s)))
        finally:
            await conn.aclose()
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
        """The oldest `limit` jobs of the ingress with what routing needs (corrupt ones are
        dead-lettered with the reason and left out)."""
        raw = await self._scripts.peek(keys=self._prefix, args=[limit])
        if not raw:
            return []
        ids = raw[0::4]
        rows = zip(raw[1::4], raw[3::4], raw[2::4], strict=True)
        out: list[RouteInfo] = []
        corrupt: list[tuple[str, str]] = []
        for job_id, (rt, spec_text, created_ms) in zip(ids, rows, strict=True):
            try:
                out.append(self._route_info(job_id, rt, spec_text, created_ms))
            except (ValueError, KeyError, TypeError) as exc:
                corrupt.append((job_id, f"job record cannot be routed: {exc}"))
        if corrupt:
            await self.dead_letter(
                [(i, ErrorInfo(type="CorruptJob", message=m)) for i, m in corrupt]
            )
        return out

    @staticmethod
    def _route_info(
        job_id: str, rt: str | None, spec_text: str | None, created_ms: str | None
    ) -> RouteInfo:
        if rt is None:
            # A record without its routing view: derive it from the spec, which must be sound.
            if spec_text is None:
                raise ValueError("no spec")
            rt = _routing_json(parse_spec(spec_text))
        r = json.loads(rt)
        return RouteInfo(
            id=job_id,
            job_type=str(r["t"]),
            priority=int(r.get("p") or 0),
            deadline_s=None if r.get("d") is None else float(r["d"]),
            tenant=r.get("n"),
            tags=tuple(r.get("g") or ()),
            created_s=int(created_ms or 0) / 1000,
        )

    async def wait_for_ingress(self, timeout_s: float) -> bool:
        """Block until a submit signals the ingress (True) or the timeout passes (False).
        Waits at most MAX_BLOCK_S per call."""
        got = await self.redis.blpop([self.keys.ingress_signal], timeout=_block_s(timeout_s))
        return got is not None

    async def enqueue(self, assignments: Sequence[tuple[str, str]]) -> list[Code]:
        """Move (job id, queue) pairs from the ingress into their queues in one round trip."""
        if not assignments:
            return []
        args: list[Any] = [self.now_ms(), len(assignments)]
        for job_id, queue in assignments:
            args += [job_id, queue]
        raw = await self._scripts.enqueue(keys=self._prefix, args=args)
        return codes(raw)

    async def promote_due(self, limit: int = 1000) -> int:
        """Queue delayed and retrying jobs whose time has come; returns how many."""
        return int(await self._scripts.promote(keys=self._prefix, args=[self.now_ms(), limit]))

    # -- workers ----------------------------------------------------------------------------

    async def lease(self, queue: str, n: int = 1, *, lease_s: float | None = None) -> list[Lease]:
        """Lease up to `n` jobs from the head of `queue`."""
        lease_ms = _ms(lease_s if lease_s is not None else self.settings.lease_s)
        raw = await self._scripts.lease(
            keys=self._prefix, args=[queue, self.now_ms(), lease_ms, n, self._dead_ttl_ms]
        )
        leases: list[Lease] = []
        corrupt: list[tuple[str, ErrorInfo]] = []
        for i in range(0, len(raw), 3):
            job_id, token = str(raw[i]), int(raw[i + 1])
            try:
                leases.append(Lease(job_id, token, parse_spec(raw[i + 2]), queue))
            except ValueError as exc:  # pydantic's ValidationError and JSON errors are ValueErrors
                reason = f"stored spec is unreadable: {str(exc).splitlines()[0]}"
                corrupt.append((job_id, ErrorInfo(type="CorruptJob", message=reason)))
        if corrupt:
            await self.dead_letter(corrupt)
        return leases

    async def wait_for_queue(self, queue: str, timeout_s: float) -> bool:
        """Block until `queue` is signalled (jobs arrived) or the timeout passes.
        Waits at most MAX_BLOCK_S per call."""
        got = await self.redis.blpop([self.keys.queue_signal(queue)], timeout=_block_s(timeout_s))
        return got is not None

    async def heartbeat(
        self, leases: Sequence[tuple[str, int]], *, lease_s: float | None = None
    ) -> list[Code]:
        """Extend leases of (job id, token); CANCEL_REQUESTED tells the worker to stop that job."""
        if not leases:
            return []
        lease_ms = _ms(lease_s if lease_s is not None else self.settings.lease_s)
        args: list[Any] = [self.now_ms(), lease_ms, len(leases)]
        for job_id, token in leases:
            args += [job_id, token]
        raw = await self._scripts.heartbeat(keys=self._prefix, args=args)
        return codes(raw)

    async def complete(self, results: Sequence[tuple[str, int, Any]]) -> list[Code]:
        """Store results of (job id, token, result) in one round trip. Results must be JSON:
        InvalidJob names the first that is not, and then nothing is written."""
        if not results:
            return []
        encoded = [jsonvalue.encode(r, f"result of job {job_id}") for job_id, _, r in results]
        return await self.complete_encoded(
            [
                (job_id, token, text)
                for (job_id, token, _), text in zip(results, encoded, strict=True)
            ]
        )

    async def complete_encoded(self, results: Sequence[tuple[str, int, str]]) -> list[Code]:
        """`complete` for results already encoded as JSON text."""
        args: list[Any] = [self.now_ms(), self._result_ttl_ms, len(results)]
        for job_id, token, text in results:
            args += [job_id, token, text]
        raw = await self._scripts.complete(keys=self._prefix, args=args)
        return codes(raw)

    async def release(self, leases: Sequence[tuple[str, int]]) -> list[Code]:
        """Hand (job id, token) leases back to their queues unfinished, without charging the
        attempt against max_retries: for a worker that drains on reassignment or scale-down."""
        if not leases:
            return []
        args: list[Any] = [self.now_ms(), len(leases)]
        for job_id, token in leases:
            args += [job_id, token]
        raw = await self._scripts.release(keys=self._prefix, args=args)
        return codes(raw)

    def backoff_s(self, attempt: int) -> float:
        """Retry delay after failed attempt number `attempt` (1-based), jitter included."""
        s = self.settings
        base = min(s.retry_backoff_max_s, s.retry_backoff_s * 2.0 ** max(0, attempt - 1))
        return base * (1.0 + s.retry_jitter * (2.0 * self.rng.random() - 1.0))

    async def fail(
        self, job_id: str, token: int, error: ErrorInfo, *, retryable: bool = True
    ) -> Code:
        """Record a failed attempt: RETRY_SCHEDULED, DEAD_LETTERED, or OK when it was cancelled."""
        raw = await self._scripts.fail(
            keys=self._prefix,
            args=[
                self.now_ms(),
                self._result_ttl_ms,
                job_id,
                token,
                error.model_dump_json(),
                "1" if retryable else "0",
                _ms(self.backoff_s(token)),
            ],
        )
        return Code(int(raw))

    async def dead_letter(self, jobs: Sequence[tuple[str, ErrorInfo]]) -> list[Code]:
        """Send jobs to the dead-letter set with a reason, from any unfinished state."""
        if not jobs:
            return []
        args: list[Any] = [self.now_ms(), self._dead_ttl_ms, len(jobs)]
        for job_id, error in jobs:
            args += [job_id, error.model_dump_json()]
        raw = await self._scripts.dead_letter(keys=self._prefix, args=args)
        return codes(raw)

    # -- control ----------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Code:
        """OK (cancelled now), CANCEL_PENDING (running; its worker stops it), ALREADY_FINISHED
        or NOT_FOUND."""
        raw = await self._scripts.cancel(
            keys=self._prefix, args=[self.now_ms(), self._result_ttl_ms, job_id]
        )
        return Code(int(raw))

    async def requeue_expired(self, limit: int = 1000) -> RequeueReport:
        """Return jobs whose lease ran out to their queues (or the dead-letter set)."""
        raw = await self._scripts.requeue_expired(
            keys=self._prefix, args=[self.now_ms(), limit, self._result_ttl_ms]
        )
        return RequeueReport(int(raw[0]), int(raw[1]), int(raw[2]))

    async def move(self, job_ids: Sequence[str], to_queue: str) -> list[Code]:
        """Move waiting jobs to another queue, keeping their place in the order."""
        if not job_ids:
            return []
        raw = await self._scripts.move(
            keys=self._prefix, args=[self.now_ms(), to_queue, len(job_ids), *job_ids]
        )
        return codes(raw)

    async def queued_ids(self, queue: str, *, start: int = 0, stop: int = -1) -> list[str]:
        """Ids of the jobs waiting in `queue`, in serving order (a slice of it)."""
        members = cast(list[str], await self.redis.zrange(self.keys.queue(queue), start, stop))
        return [m.split(":", 1)[1] for m in members]

    async def stats(self, queues: Iterable[str] = ()) -> StoreStats:
        """Depth, oldest wait, in flight and dead per queue (every known queue when none given)."""
        names = list(queues)
        raw = await self._scripts.stats(
            keys=self._prefix, args=[self.now_ms(), self._dead_ttl_ms, len(names), *names]
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
            )
            for i in range(2, len(raw), 8)
        }
        return StoreStats(ingress=int(raw[0]), delayed=int(raw[1]), queues=per_queue)

    async def dead_ids(self, queue: str) -> list[str]:
        """Ids in a queue's dead-letter set, oldest first."""
        ids = cast(list[str], await self.redis.zrange(self.keys.dead(queue), 0, -1))
        return ids

    # -- reading ----------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job:
        """The job's record. A corrupt record is dead-lettered with the reason, not raised."""
        raw = cast(dict[str, str], await self.redis.hgetall(self.keys.job(job_id)))
        if not raw:
            raise JobNotFound(job_id)
        try:
            return _job_from_hash(job_id, raw)
        except (ValueError, KeyError, TypeError) as exc:
            reason = f"job record is corrupt: {str(exc).splitlines()[0]}"
            await self.dead_letter([(job_id, ErrorInfo(type="CorruptJob", message=reason))])
            raw = cast(dict[str, str], await self.redis.hgetall(self.keys.job(job_id)))
            return _corrupt_job(job_id, raw, reason)

    async def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        """Records of many jobs in one round trip; None where a record does not exist."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.keys.job(job_id))
        rows: list[dict[str, str]] = await pipe.execute()
        out: list[Job | None] = []
        for job_id, raw in zip(job_ids, rows, strict=True):
            if not raw:
                out.append(None)
                continue
            try:
                out.append(_job_from_hash(job_id, raw))
            except (ValueError, KeyError, TypeError):
                out.append(await self.get(job_id))  # dead-letters it with the reason
        return out

    async def outcome(self, job_id: str) -> Outcome:
        """Status, result and error of a job, without reading its spec or payload."""
        [outcome] = await self.outcomes([job_id])
        return outcome

    async def outcomes(self, job_ids: Sequence[str]) -> list[Outcome]:
        """`outcome` of many jobs in one round trip."""
        if not job_ids:
            return []
        raw = await self._scripts.results(keys=self._prefix, args=list(job_ids))
        return [
            self._outcome(job_id, raw[3 * i], raw[3 * i + 1], raw[3 * i + 2])
            for i, job_id in enumerate(job_ids)
        ]

    @staticmethod
    def _outcome(job_id: str, status: str | None, result: str | None, error: str | None) -> Outcome:
        if status is None:
            raise JobNotFound(job_id)
        try:
            return Outcome(
                job_id,
                _STATUS_BY_VALUE[status],
                None if result is None else json.loads(result),
                None if error is None else ErrorInfo.model_validate_json(error),
            )
        except (ValueError, KeyError) as exc:
            # Not what the store writes: report it as the corrupt record it is.
            reason = f"job record is corrupt: {str(exc).splitlines()[0]}"
            return Outcome(
                job_id, JobStatus.DEAD, None, ErrorInfo(type="CorruptJob", message=reason)
            )

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
        TimeoutError when `timeout_s` passes before all have finished."""
        seen = await self._waiter.wait(job_ids, timeout_s)
        known: dict[str, Outcome] = {}
        for job_id, status in zip(job_ids, seen, strict=True):
            if status is None:
                raise JobNotFound(job_id)
            if isinstance(status, tuple):
                # The finish notice carried the result: no read needed.
                known[job_id] = self._outcome(job_id, status[0], status[1], None)
            elif status and status not in _STATUS_BY_VALUE:
                await self.get(job_id)  # a corrupt record: get() dead-letters it with the reason
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
            raw = await self._scripts.watch(
                keys=self._prefix,
                args=[client_id, self._result_ttl_ms, require, len(chunk), *chunk],
            )
            if int(raw[0]) == Code.NO_SERVICE:
                raise await self._no_service()
            out += raw[1:]
        return out

    async def close(self) -> None:
        """Stop waiting for results (the connection pool is the caller's to close)."""
        await self._waiter.close()


# Ids per script call when reading or watching many jobs (keeps each call short for the server).
_READ_CHUNK = 1000
_STATUS_BY_VALUE = {s.value: s for s in JobStatus}


def _block_s(timeout_s: float) -> float:
    # Redis reads 0 as "block forever"; keep at least 1 ms, and at most MAX_BLOCK_S.
    return min(MAX_BLOCK_S, max(timeout_s, 0.001))


def _opt_s(ms: str | None) -> float | None:
    return None if ms is None else int(ms) / 1000


def _job_from_hash(job_id: str, raw: dict[str, str]) -> Job:
    error = raw.get("error")
    result = raw.get("result")
    return Job(
        id=job_id,
        spec=parse_spec(raw["spec"]),
        status=JobStatus(raw["status"]),
        queue=raw.get("queue"),
        attempts=int(raw.get("attempts", 0)),
        created_s=int(raw["created_ms"]) / 1000,
        started_s=_opt_s(raw.get("started_ms")),
        finished_s=_opt_s(raw.get("finished_ms")),
        result=None if result is None else json.loads(result),
        error=None if error is None else ErrorInfo.model_validate_json(error),
        cancel_requested=raw.get("cancel") == "1",
    )


def _corrupt_job(job_id: str, raw: dict[str, str], reason: str) -> Job:
    """A readable stand-in for a record that could not be parsed (now dead-lettered)."""
    try:
        spec = parse_spec(raw.get("spec", ""))
    except ValueError:
        spec = JobSpec(job_type="unknown")
    return Job(
        id=job_id,
        spec=spec,
        status=JobStatus.DEAD,
        queue=raw.get("queue"),
        created_s=_opt_s(raw.get("created_ms")) or 0.0,
        finished_s=_opt_s(raw.get("finished_ms")),
        error=ErrorInfo(type="CorruptJob", message=reason),
    )


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
