"""What an operator's calls did to jobs: cancel, replay from the dead-letter set, purge. Typed
reports for the client's methods of the same names (scheduler.client)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from scheduler.codes import Code


class CancelOutcome(StrEnum):
    """What a cancel did to one job."""

    # It was waiting (pending, queued, delayed or retrying) and is cancelled now.
    CANCELLED = "cancelled"
    # It is running: flagged, and its worker stops it at its next heartbeat.
    STOPPING = "stopping"
    # It had finished already (succeeded, dead or cancelled); nothing changed.
    ALREADY_FINISHED = "already_finished"
    # No such job: never submitted, purged, or its record expired.
    NOT_FOUND = "not_found"
    # Its record was unreadable: dead-lettered with the reason instead.
    CORRUPT = "corrupt"


@dataclass(frozen=True, slots=True)
class Cancellation:
    job_id: str
    outcome: CancelOutcome


@dataclass(frozen=True, slots=True)
class Refusal:
    """A job a replay or purge left alone, and why (NOT_FOUND: no such job; WRONG_STATE: not in
    the dead-letter set, or an unknown destination queue; CORRUPT: its record cannot run again)."""

    job_id: str
    code: Code
    reason: str

    def __str__(self) -> str:
        return f"job {self.job_id}: {self.reason}"


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """Jobs sent back to work from the dead-letter set, and the ones refused."""

    replayed: tuple[str, ...]
    refused: tuple[Refusal, ...] = ()


@dataclass(frozen=True, slots=True)
class PurgeReport:
    """Dead-lettered jobs deleted (records and index entries), and the ones refused."""

    purged: int
    refused: tuple[Refusal, ...] = ()
    # Dead-letter entries dropped whose job was gone already or is alive elsewhere.
    dropped: int = 0


__all__ = ["CancelOutcome", "Cancellation", "PurgeReport", "Refusal", "ReplayReport"]
