"""Job models: what a client submits, what the store keeps, and the states a job goes through."""

from __future__ import annotations

import os
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scheduler import jsonvalue
from scheduler.errors import InvalidJob

# Priorities order a queue: higher first. Encoded in four digits inside the queue's order key.
MAX_PRIORITY = 9999
MAX_JOB_TYPE_LEN = 128
MAX_TENANT_LEN = 128
MAX_TAGS = 32
MAX_TAG_LEN = 64


def check_job_type(job_type: str) -> str:
    """`job_type` if it is printable with no leading or trailing spaces, else ValueError."""
    if not job_type.isprintable() or job_type != job_type.strip():
        raise ValueError("must be printable with no leading or trailing spaces")
    return job_type


def check_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    """The tags sorted without repeats, or ValueError naming a tag that is empty or too long."""
    for tag in tags:
        if not tag or len(tag) > MAX_TAG_LEN:
            raise ValueError(f"tag {tag!r} must have 1-{MAX_TAG_LEN} characters")
    return tuple(sorted(set(tags)))


class JobStatus(StrEnum):
    """Where a job is in its life. Exactly one at any time."""

    # Submitted and waiting in the ingress for level 1 to pick its queue.
    PENDING = "pending"
    # In a task queue, waiting for a worker.
    QUEUED = "queued"
    # Routed, but held until its delay has passed.
    DELAYED = "delayed"
    # Leased by a worker, which renews the lease by heartbeat while it runs.
    RUNNING = "running"
    # Finished with a result, which is kept for the result TTL.
    SUCCEEDED = "succeeded"
    # Failed at least once and waits out its backoff before running again.
    RETRYING = "retrying"
    # Failed more than max_retries times, or could not be run at all; kept in the dead-letter set.
    DEAD = "dead"
    # Cancelled before it produced a result.
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """True for the states a job never leaves."""
        return self in _FINISHED


_FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.DEAD, JobStatus.CANCELLED})


class JobOptions(BaseModel):
    """Submit options, validated before anything is written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    priority: int = Field(default=0, ge=0, le=MAX_PRIORITY)
    # Seconds after submission by which the job should finish; orders the queue after priority.
    deadline_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # Seconds to hold the job after routing before any worker may take it.
    delay_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # Retries after the first attempt. None: the handler's default for the job type, else the
    # submitting client's Settings.max_retries (a value given here always wins).
    max_retries: int | None = Field(default=None, ge=0, le=100)
    # Seconds one attempt may run before the worker abandons it and records a failure.
    timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    tenant: str | None = Field(default=None, min_length=1, max_length=MAX_TENANT_LEN)
    tags: tuple[str, ...] = Field(default=(), max_length=MAX_TAGS)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("tags")
    @classmethod
    def _plain_tags(cls, tags: tuple[str, ...]) -> tuple[str, ...]:
        return check_tags(tags)


_DEFAULT_OPTIONS = JobOptions()
_DEFAULT_VALUES = _DEFAULT_OPTIONS.model_dump()


class JobSpec(BaseModel):
    """Everything about a job fixed at submission: stored once as JSON in the job record.

    The stored form uses one-letter keys ({"t", "p", "o"}) and leaves default options out: the
    record is written and read once per job, so its size and parse time are on the hot path.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    job_type: str = Field(alias="t", min_length=1, max_length=MAX_JOB_TYPE_LEN)
    payload: Any = Field(default=None, alias="p")
    options: JobOptions = Field(default=_DEFAULT_OPTIONS, alias="o")

    @field_validator("job_type")
    @classmethod
    def _printable_job_type(cls, job_type: str) -> str:
        return check_job_type(job_type)


class ErrorInfo(BaseModel):
    """A failure as the worker saw it: exception type, message and traceback text."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str
    message: str
    traceback: str | None = None


class JobEvent(BaseModel):
    """One entry of a job's history: a failed attempt ('failed': its error's type and message),
    a lease that expired ('lease_expired'), or a replay from the dead-letter set ('replayed':
    from which queue, to which, and whether the retry budget was reset). An entry that cannot be
    read is kept as 'unreadable' with its text in `error.message`."""

    model_config = ConfigDict(frozen=True)

    event: str
    at_s: float | None = None
    attempt: int | None = None
    error: ErrorInfo | None = None
    from_queue: str | None = None
    to_queue: str | None = None
    reset_retries: bool | None = None


class Job(BaseModel):
    """A job record as read back from the store."""

    model_config = ConfigDict(frozen=True)

    id: str
    spec: JobSpec
    status: JobStatus
    queue: str | None = None
    attempts: int = 0
    created_s: float
    started_s: float | None = None
    finished_s: float | None = None
    result: Any = None
    error: ErrorInfo | None = None
    cancel_requested: bool = False
    # The retry budget the store applies (the job's own, its handler's or the default), and the
    # attempts counted against it (attempts handed back by a draining worker, or made before a
    # replay that reset the budget, are not). None when the record does not say.
    max_retries: int | None = None
    charged_attempts: int | None = None
    # Size of the stored result JSON in bytes (None without a result).
    result_bytes: int | None = None
    # Failed attempts, expired leases and replays, oldest first (the newest keys.HISTORY_LEN).
    history: tuple[JobEvent, ...] = ()

    @property
    def job_type(self) -> str:
        return self.spec.job_type

    @property
    def payload(self) -> Any:
        return self.spec.payload


def new_job_id() -> str:
    """A random 128-bit id, hex: unguessable, so a job id works as a capability for its result.
    (os.urandom directly: uuid4 adds only version bits, at four times the cost per job.)"""
    return os.urandom(16).hex()


def _field_path(error: Any) -> str:
    loc = [str(p) for p in error["loc"] if p != "options"]
    return ".".join(loc) or "job"


def build_spec(
    job_type: Any, payload: Any, options: dict[str, Any], *, max_payload_bytes: int
) -> tuple[JobSpec, str]:
    """Validate a submission and return it with its JSON text; InvalidJob names the bad field."""
    jsonvalue.check_json(payload, "payload")
    try:
        # Most submissions use default options: skip validating them again.
        opts = _DEFAULT_OPTIONS if options == _DEFAULT_VALUES else JobOptions(**options)
        spec = JobSpec(job_type=job_type, payload=payload, options=opts)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidJob(_field_path(first), first["msg"]) from None
    except TypeError as exc:  # an unknown keyword argument
        raise InvalidJob("options", str(exc)) from None
    text = spec_json(spec)
    size = len(text.encode())
    if size > max_payload_bytes:
        raise InvalidJob(
            "payload", f"job is {size} bytes encoded, over the limit of {max_payload_bytes} bytes"
        )
    return spec, text


def spec_json(spec: JobSpec) -> str:
    """The stored JSON form of a spec: short keys, options that differ from the defaults only."""
    o = spec.options
    if o is _DEFAULT_OPTIONS:
        return jsonvalue.dumps({"t": spec.job_type, "p": spec.payload})
    opts = {k: getattr(o, k) for k, default in _DEFAULT_VALUES.items() if getattr(o, k) != default}
    return jsonvalue.dumps({"t": spec.job_type, "p": spec.payload, "o": opts})


def parse_spec(text: str | bytes) -> JobSpec:
    """Inverse of `spec_json`; raises ValueError (pydantic's ValidationError is one) on anything
    that is not a valid stored spec, text that is not UTF-8 included."""
    return JobSpec.model_validate_json(text)
