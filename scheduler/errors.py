"""Exceptions raised to users of the client and the store."""

from __future__ import annotations


class BilevelError(Exception):
    """Base class of every error bilevel raises on purpose."""


class InvalidJob(BilevelError, ValueError):
    """A job (or its options) failed validation; nothing was written. `field` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class JobNotFound(BilevelError, KeyError):
    """No record for this job id: it never existed, or its record expired after the result TTL."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"job {self.job_id} not found (never submitted, or its record expired)"


class JobFailed(BilevelError):
    """The job ran and failed for good (dead-lettered); carries the remote error."""

    def __init__(
        self, job_id: str, error_type: str, message: str, traceback: str | None = None
    ) -> None:
        super().__init__(f"job {job_id} failed: {error_type}: {message}")
        self.job_id = job_id
        self.error_type = error_type
        self.message = message
        self.traceback = traceback


class JobCancelled(BilevelError):
    """The job was cancelled before it produced a result."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was cancelled")
        self.job_id = job_id


class JobTimeout(BilevelError, TimeoutError):
    """Waiting for a job's result took longer than the caller allowed; the job itself goes on."""

    def __init__(self, job_id: str, timeout_s: float) -> None:
        super().__init__(f"job {job_id} did not finish within {timeout_s:g} s")
        self.job_id = job_id
        self.timeout_s = timeout_s


class NoService(BilevelError):
    """No bilevel service (router) serves this namespace on this Redis, so a job submitted or
    awaited there would wait forever. Names the namespaces that are served there."""

    def __init__(self, namespace: str, where: str, served: list[str]) -> None:
        there = (
            f"served there: {', '.join(served)}; pass namespace=... (or BILEVEL_NAMESPACE)"
            if served
            else "no namespace is served there; start one with `bilevel serve`"
        )
        super().__init__(
            f"no bilevel service serves namespace {namespace!r} on Redis at {where} ({there}). "
            "To queue jobs for a service that is not running yet, set require_service=False."
        )
        self.namespace = namespace
        self.served = served


class Rejected(BilevelError):
    """Admission control refused a job: nothing was written for it. `cap` names the cap
    (max_queued_total, tenant_max_queued, queue_max_queued or queue_max_wait_s), `current` is its
    value when the job came (jobs waiting, or the estimated wait in seconds) and `limit` the cap;
    `queue` is the queue whose cap it was (None for the total and tenant caps). Submit again after
    `retry_after_s` (an estimate from the queue's recent drain rate, when one is known)."""

    def __init__(
        self,
        job_id: str,
        cap: str,
        current: float,
        limit: float,
        retry_after_s: float,
        queue: str | None = None,
        tenant: str | None = None,
    ) -> None:
        where = f" of queue {queue!r}" if queue else ""
        who = f" of tenant {tenant!r}" if tenant and cap.startswith("tenant") else ""
        super().__init__(
            f"job {job_id} rejected: {cap}{where}{who} is at {current:g} (limit {limit:g}); "
            f"retry after {retry_after_s:g} s"
        )
        self.job_id = job_id
        self.cap = cap
        self.current = current
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.queue = queue
        self.tenant = tenant


class RedisUnavailable(BilevelError, ConnectionError):
    """Redis could not be reached or refused our credentials. Names host and port, never secrets."""

    def __init__(self, host: str, port: int | None, reason: str) -> None:
        where = f"{host}:{port}" if port is not None else host
        super().__init__(f"cannot use Redis at {where}: {reason}")
        self.host = host
        self.port = port


class StreamTruncated(BilevelError):
    """A reader of a job's stream missed `missed` chunks: the stream's cap (Settings.stream_max_len)
    trimmed them before it read them (it fell behind, or started late), or they were unreadable.
    The job itself is unaffected: its result stays available from result(). Iterating on after
    this continues from the oldest chunk still in the stream."""

    def __init__(self, job_id: str, missed: int, reason: str) -> None:
        super().__init__(
            f"the stream of job {job_id} lost {missed} chunk{'s' if missed != 1 else ''} before "
            f"this reader read them ({reason}); result() still has the job's result"
        )
        self.job_id = job_id
        self.missed = missed
        self.reason = reason


class UnknownQueue(BilevelError, ValueError):
    """A queue name that no job was ever routed to in this namespace (a typo, or another
    namespace's queue). Names the queues that are known."""

    def __init__(self, queue: str, known: list[str]) -> None:
        there = ", ".join(known) if known else "none yet"
        super().__init__(f"queue {queue!r} is not a known queue (known: {there})")
        self.queue = queue
        self.known = known


class InvalidCursor(BilevelError, ValueError):
    """A listing cursor that this listing did not hand out, or one handed out for other options."""
