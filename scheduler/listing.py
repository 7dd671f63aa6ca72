"""Listing jobs from the store's own indexes (jobs.lua): the options of a listing, its rows, its
pages and their cursors, and the reading of a job's history.

A listing walks six sections in a fixed order (pending, queued, running, delayed, dead,
finished), each a merge of its per-queue indexes by the index's own time, newest first unless
asked otherwise; the finished section (capped lists, which carry no time to merge by) is read one
queue after another. A page ends after `limit` rows or after examining `budget` entries (filters that
skip entries cost reads too), and its cursor resumes after the last entry examined: jobs that
move meanwhile may be seen twice or not at all, as in a Redis SCAN, but a page never reads more
than its bound, and a cursor whose own entry has left its index still finds its place.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from scheduler.errors import InvalidCursor
from scheduler.keys import INGRESS_QUEUE, validate_name
from scheduler.models import ErrorInfo, JobEvent, JobStatus
from scheduler.records import PARSE_ERRORS, parse_route_view

# The sections of a listing, in the order it walks them (jobs.lua), and what each is ordered by.
SECTIONS = ("pending", "queued", "running", "delayed", "dead", "finished")
ORDERED_BY = {
    "pending": "submit order",
    "queued": "time queued",
    "running": "lease deadline",
    "delayed": "time due",
    "dead": "time of death",
    "finished": "time finished, queue by queue",
}
# A page blocks Redis while it runs (about 20-40 us a row on a loaded 2-core machine): these keep
# one page under about 10 ms by default and 100 ms at most.
MAX_LIMIT = 500
MAX_BUDGET = 5000
DEFAULT_BUDGET_PER_ROW = 4
MIN_DEFAULT_BUDGET = 500
# Values per row in the reply of jobs.lua.
_ROW = 15
_STATUS_BY_VALUE = {s.value: s for s in JobStatus}


class ListOrder(StrEnum):
    """Which end of each index a listing starts from."""

    # Highest index time first: the latest submitted, queued, due, died or finished.
    NEWEST = "newest"
    # Lowest first.
    OLDEST = "oldest"


@dataclass(frozen=True, slots=True)
class ListOptions:
    """What a listing shows; a cursor belongs to the options it was handed out with."""

    status: JobStatus | None = None
    queue: str | None = None
    tenant: str | None = None
    order: ListOrder = ListOrder.NEWEST

    @classmethod
    def checked(
        cls,
        *,
        status: JobStatus | str | None,
        queue: str | None,
        tenant: str | None,
        order: ListOrder | str,
    ) -> ListOptions:
        """The options, or ValueError naming the one that is not valid."""
        if status is not None and not isinstance(status, JobStatus):
            if status not in _STATUS_BY_VALUE:
                raise ValueError(
                    f"status {status!r} is not a status (one of: {', '.join(_STATUS_BY_VALUE)})"
                )
            status = _STATUS_BY_VALUE[status]
        if queue is not None and queue != INGRESS_QUEUE:
            validate_name("queue", queue)
        if tenant is not None and not tenant:
            raise ValueError("tenant must not be empty")
        try:
            order = ListOrder(order)
        except ValueError:
            raise ValueError(f"order {order!r} is not 'newest' or 'oldest'") from None
        return cls(status, queue, tenant, order)

    def _key(self) -> str:
        """A short digest of the options, which a cursor carries to be checked against."""
        text = "\n".join(
            [self.status.value if self.status else "", self.queue or "", self.tenant or ""]
        )
        return f"{self.order.value[0]}{hashlib.sha256(text.encode()).hexdigest()[:8]}"


@dataclass(frozen=True, slots=True)
class Position:
    """Where a page ended: section number (1-based), index score and member of the last entry
    examined."""

    section: int
    score: str
    member: str


def encode_cursor(options: ListOptions, position: Position) -> str:
    """An opaque cursor for the next page of the listing with `options`."""
    body = [1, options._key(), position.section, position.score, position.member]
    text = json.dumps(body, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, options: ListOptions) -> Position:
    """The position in `cursor`; InvalidCursor when it is not one a listing handed out, or was
    handed out for other options."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, key, section, score, member = json.loads(raw)
        valid = (
            version == 1
            and isinstance(key, str)
            and isinstance(section, int)
            and 1 <= section <= len(SECTIONS)
            and isinstance(score, str)
            and isinstance(member, str)
        )
    except (*PARSE_ERRORS, binascii.Error):
        valid = False
    if not valid:
        raise InvalidCursor(f"cursor {cursor[:40]!r} is not a cursor a listing handed out")
    if key != options._key():
        raise InvalidCursor(
            "the cursor belongs to a listing with other options (status, queue, tenant, order): "
            "repeat that listing's options, or start without a cursor"
        )
    return Position(section, score, member)


@dataclass(frozen=True, slots=True)
class JobSummary:
    """One row of a listing: what the job's record says, without its payload or result."""

    id: str
    # Which index listed it (one of SECTIONS), and that index's time for it in seconds: when it
    # was queued, its lease deadline, when it is due, when it died or finished (None in the
    # ingress, which is ordered by submit sequence).
    index: str
    index_time_s: float | None
    # None when the record cannot be read (then `unreadable` says why; such a job is listed only
    # from the dead-letter set, where it can be purged).
    status: JobStatus | None
    queue: str | None
    job_type: str | None
    priority: int | None
    tenant: str | None
    tags: tuple[str, ...]
    attempts: int
    max_retries: int | None
    created_s: float | None
    started_s: float | None
    finished_s: float | None
    # The latest error, its message cut to a few hundred characters.
    error: ErrorInfo | None
    cancel_requested: bool
    unreadable: str | None = None


@dataclass(frozen=True, slots=True)
class JobPage:
    """One page of a listing; `cursor` fetches the next (None: the listing is complete)."""

    jobs: tuple[JobSummary, ...]
    cursor: str | None


def _text(raw: Any) -> str | None:
    if raw is None:
        return None
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def _uint(raw: Any) -> int | None:
    text = _text(raw)
    return int(text) if text is not None and text.isdigit() and len(text) <= 30 else None


def _seconds(raw: Any) -> float | None:
    ms = _uint(raw)
    return None if ms is None else ms / 1000


def _error_summary(raw: Any) -> ErrorInfo | None:
    text = _text(raw)
    if text is None:
        return None
    if text.startswith("!"):  # jobs.lua's mark of an error field that is not an error JSON
        return ErrorInfo(type="UnreadableError", message=text[1:])
    try:
        return ErrorInfo.model_validate_json(text)
    except PARSE_ERRORS:
        return ErrorInfo(type="UnreadableError", message=text)


def parse_rows(raw: Sequence[Any]) -> list[JobSummary]:
    """The rows of a jobs.lua reply (after its 3 cursor values)."""
    rows: list[JobSummary] = []
    for i in range(0, len(raw), _ROW):
        (
            job_id, index, score, status, queue, attempts, maxr, _released, created, started,
            finished, rt, error, cancel, unreadable,
        ) = raw[i : i + _ROW]  # fmt: skip
        section = _text(index) or ""
        view = None
        if rt is not None:
            try:
                view = parse_route_view(rt)
            except PARSE_ERRORS:
                view = None  # listed all the same; only its routing fields are unknown
        reason = _text(unreadable) or None
        status_text = _text(status)
        rows.append(
            JobSummary(
                id=_text(job_id) or "",
                index=section,
                index_time_s=_index_time_s(section, score, finished),
                status=None if reason else _STATUS_BY_VALUE.get(status_text or ""),
                queue=_text(queue),
                job_type=None if view is None else view.job_type,
                priority=None if view is None else view.priority,
                tenant=None if view is None else view.tenant,
                tags=() if view is None else view.tags,
                attempts=_uint(attempts) or 0,
                max_retries=_uint(maxr),
                created_s=_seconds(created),
                started_s=_seconds(started),
                finished_s=_seconds(finished),
                error=_error_summary(error),
                cancel_requested=_text(cancel) == "1",
                unreadable=reason,
            )
        )
    return rows


def _index_time_s(section: str, score: Any, finished: Any) -> float | None:
    if section == "pending":
        return None
    if section == "finished":
        return _seconds(finished)
    return _score_s(score)


def _score_s(raw: Any) -> float | None:
    try:
        return float(_text(raw) or "") / 1000
    except ValueError:
        return None


# -- history ------------------------------------------------------------------------------------


def parse_history(raw: bytes | str | None) -> tuple[JobEvent, ...]:
    """A record's `history` field (one JSON object per line, see _common.lua add_history) as
    events. Never raises: a line that cannot be read becomes an 'unreadable' event holding it, so
    a garbled history never makes the job itself unreadable."""
    if raw is None:
        return ()
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return tuple(_event(line) for line in text.split("\n") if line)


def _event(line: str) -> JobEvent:
    try:
        e = json.loads(line)
        if not isinstance(e, dict) or not isinstance(e.get("event"), str):
            raise ValueError("not an event")
        error = None
        if isinstance(e.get("type"), str):
            error = ErrorInfo(type=e["type"], message=str(e.get("message", "")))
        return JobEvent(
            event=e["event"],
            at_s=_number(e.get("at_ms"), 1000),
            attempt=e["attempt"] if isinstance(e.get("attempt"), int) else None,
            error=error,
            from_queue=e["from"] if isinstance(e.get("from"), str) else None,
            to_queue=e["to"] if isinstance(e.get("to"), str) else None,
            reset_retries=e["reset"] if isinstance(e.get("reset"), bool) else None,
        )
    except PARSE_ERRORS:
        return JobEvent(event="unreadable", error=ErrorInfo(type="Unreadable", message=line[:300]))


def _number(value: Any, per_unit: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value / per_unit


__all__ = [
    "DEFAULT_BUDGET_PER_ROW",
    "MAX_BUDGET",
    "MAX_LIMIT",
    "MIN_DEFAULT_BUDGET",
    "ORDERED_BY",
    "SECTIONS",
    "JobPage",
    "JobSummary",
    "ListOptions",
    "ListOrder",
    "Position",
    "decode_cursor",
    "encode_cursor",
    "parse_history",
    "parse_rows",
]
