"""Return codes of the Lua job-store scripts, mirrored from their headers (scheduler/lua/*.lua)."""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    """What a store script did to one job. The numbers are part of the Lua scripts' contract."""

    # The transition happened.
    OK = 0
    # Submit with an idempotency key already in use: the existing job id is returned instead.
    DUPLICATE = 1
    # No record for this job id (never existed, or expired after its result TTL).
    NOT_FOUND = 2
    # The job is not in a state this transition applies to (e.g. enqueue of a running job).
    WRONG_STATE = 3
    # The caller's lease is not the job's current lease: it expired and the job moved on.
    STALE_LEASE = 4
    # The job already finished (succeeded, dead or cancelled); the first outcome stands.
    ALREADY_FINISHED = 5
    # Heartbeat accepted, but the job was cancelled: the worker should stop it.
    CANCEL_REQUESTED = 6
    # A failure was recorded and the job will run again after a backoff.
    RETRY_SCHEDULED = 7
    # The job went to the dead-letter set.
    DEAD_LETTERED = 8
    # The job record is missing fields or holds garbage; it was dead-lettered with the reason.
    CORRUPT = 9
    # The job was delayed rather than queued (its not-before time is in the future).
    DELAYED = 10
    # Cancellation of a running job was recorded; its worker sees it on the next heartbeat.
    CANCEL_PENDING = 11
    # Refused (nothing written): no router serves the namespace, so the job would wait forever.
    NO_SERVICE = 12
    # Refused by admission control (nothing written): over a cap; the detail names it.
    REJECTED = 13


# Script replies are lists of these; indexing a tuple is several times cheaper than Code(n).
_BY_VALUE = tuple(sorted(Code, key=int))


def codes(raw: list[int]) -> list[Code]:
    """Decode a script's list of return codes."""
    return [_BY_VALUE[c] for c in raw]
