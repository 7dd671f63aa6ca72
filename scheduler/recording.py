"""Reading what the service recorded of the jobs it served (Keys.record) and the model loads its
workers made (Keys.record_loads).

The scripts that finish a job append one entry to the namespace's recording (`record` in
scheduler/lua/_common.lua) and copy the job record's fields into it without judging them, so
every entry is judged here: one that is not what the scripts write (a record that was corrupt when
it finished, an entry written by hand) is skipped and counted with its reason, and the rest are
read. The stream is read in pages (XRANGE ... COUNT), so a recording of any length costs bounded
memory per round trip.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, cast

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE

from scheduler.keys import Keys, validate_name
from scheduler.models import JobStatus
from scheduler.records import PARSE_ERRORS, CorruptRecord, parse_route_view

# Entries per XRANGE round trip: ~100 KB of reply.
PAGE_ENTRIES: Final = 1000
_STATUSES: Final = frozenset({JobStatus.SUCCEEDED, JobStatus.DEAD, JobStatus.CANCELLED})
# Reasons kept for the summary; the rest are only counted.
_REASONS_KEPT: Final = 5


@dataclass(frozen=True, slots=True)
class ServedJob:
    """One finished job as the recording has it."""

    job_id: str
    # When it was submitted, first leased, and finished (ms since the epoch, the store's clock).
    created_ms: int
    started_ms: int | None
    finished_ms: int
    # None for a job that never reached a queue (dead-lettered in the ingress).
    queue: str | None
    job_type: str
    priority: int
    tenant: str | None
    # Seconds after submission, as the client set it.
    deadline_s: float | None
    attempts: int
    status: JobStatus
    # Seconds the handler ran on its last attempt as the worker measured it; None when no worker
    # reported (a job that died by its lease expiring, or was never run).
    run_s: float | None
    tokens_in: int | None
    tokens_out: int | None

    @property
    def wait_s(self) -> float | None:
        """Seconds from submission to the first lease; None when it never ran."""
        if self.started_ms is None:
            return None
        return max(0.0, (self.started_ms - self.created_ms) / 1000.0)


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """One assignment of a worker to a queue: the models it loaded and their seconds each."""

    queue: str
    at_ms: int
    load_s_by_type: dict[str, float]


@dataclass(slots=True)
class Recording:
    """What a read of the recording found: the jobs (the last entry of each job id; a replayed
    job finishes twice), the model loads, and the entries skipped as unreadable."""

    jobs: list[ServedJob] = field(default_factory=list)
    loads: list[ModelLoad] = field(default_factory=list)
    # Entries skipped, and the first few reasons ("<entry id>: <reason>").
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)
    # Entries read from the stream (of every job, in the window or not).
    entries_read: int = 0

    def skip(self, entry_id: str, reason: str) -> None:
        self.skipped += 1
        if len(self.reasons) < _REASONS_KEPT:
            self.reasons.append(f"{entry_id}: {reason}")


def _text(fields: Mapping[bytes, bytes], name: str) -> str:
    raw = fields.get(name.encode())
    if raw is None:
        raise CorruptRecord(f"no field {name!r}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptRecord(f"field {name!r} is not UTF-8") from None


# The values packed in an entry's 'v', in order (`record` in scheduler/lua/_common.lua).
PACKED: Final = ("c", "s", "f", "q", "a", "st", "r", "ti", "to")


def _uint(values: Mapping[str, str], name: str, *, required: bool) -> int | None:
    text = values[name]
    if not text:
        if required:
            raise CorruptRecord(f"{name!r} is empty")
        return None
    # What the scripts write: decimal digits (int() would also take '+5' and '1_000').
    if not text.isascii() or not text.isdigit() or len(text) > 30:
        raise CorruptRecord(f"{name!r} is {text[:40]!r}, not a whole number")
    return int(text)


def _whole(values: Mapping[str, str], name: str) -> int:
    value = _uint(values, name, required=True)
    assert value is not None  # required: empty raised
    return value


def _unpack(fields: Mapping[bytes, bytes]) -> dict[str, str]:
    """The named values of an entry's 'v'. A value holding a space (garbage copied from a corrupt
    record) makes the count wrong, so the entry is refused rather than read askew."""
    parts = _text(fields, "v").split(" ")
    if len(parts) != len(PACKED):
        raise CorruptRecord(f"'v' holds {len(parts)} values, not {len(PACKED)}")
    return dict(zip(PACKED, parts, strict=True))


def parse_served(entry_id: str, fields: Mapping[bytes, bytes]) -> ServedJob:
    """The job an entry of the recording describes; CorruptRecord naming the field when the
    entry is not what the scripts write."""
    job_id = _text(fields, "id")
    if not job_id:
        raise CorruptRecord("field 'id' is empty")
    values = _unpack(fields)
    status_text = values["st"]
    try:
        status = JobStatus(status_text)
    except ValueError:
        raise CorruptRecord(f"status {status_text[:40]!r} is not a status") from None
    if status not in _STATUSES:
        raise CorruptRecord(f"status {status_text!r} is not a finished status")
    queue: str | None = None
    if values["q"]:
        try:
            queue = validate_name("queue", values["q"])
        except ValueError as exc:
            raise CorruptRecord(str(exc)) from None
    rt = fields.get(b"rt")
    if not rt:
        raise CorruptRecord("no routing view")
    view = parse_route_view(rt)
    run_us = _uint(values, "r", required=False)
    return ServedJob(
        job_id=job_id,
        created_ms=_whole(values, "c"),
        started_ms=_uint(values, "s", required=False),
        finished_ms=_whole(values, "f"),
        queue=queue,
        job_type=view.job_type,
        priority=view.priority,
        tenant=view.tenant,
        deadline_s=view.deadline_s,
        attempts=_uint(values, "a", required=False) or 0,
        status=status,
        run_s=None if run_us is None else run_us / 1_000_000,
        tokens_in=_uint(values, "ti", required=False),
        tokens_out=_uint(values, "to", required=False),
    )


def parse_load(fields: Mapping[bytes, bytes]) -> ModelLoad:
    """A model-load entry (Store.record_model_load); CorruptRecord when it is not one."""
    try:
        queue = validate_name("queue", _text(fields, "q"))
    except ValueError as exc:
        raise CorruptRecord(str(exc)) from None
    at_text = _text(fields, "at_ms")
    at_ms = _whole({"at_ms": at_text}, "at_ms")
    try:
        raw: Any = json.loads(_text(fields, "loads"))
    except PARSE_ERRORS as exc:
        raise CorruptRecord(f"loads are unreadable: {exc}") from None
    if not isinstance(raw, dict):
        raise CorruptRecord("loads are not an object")
    loads: dict[str, float] = {}
    for job_type, seconds in raw.items():
        ok = isinstance(seconds, int | float) and not isinstance(seconds, bool)
        if not ok or not math.isfinite(seconds) or seconds < 0:
            raise CorruptRecord(f"load of {str(job_type)[:40]!r} is {seconds!r}, not seconds")
        loads[str(job_type)] = float(seconds)
    return ModelLoad(queue=queue, at_ms=at_ms, load_s_by_type=loads)


async def _pages(
    redis: aioredis.Redis, key: str, start: str, page: int
) -> AsyncIterator[list[tuple[bytes, dict[bytes, bytes]]]]:
    """The entries of stream `key` from ID `start` on, a page at a time."""
    while True:
        # Bytes, not text: a value that is not UTF-8 is one unreadable entry, not a failed read.
        client: Any = redis  # redis-py's execute_command is untyped
        reply = await client.execute_command(
            "XRANGE", key, start, "+", "COUNT", page, **{NEVER_DECODE: True}
        )
        batch = cast(list[tuple[bytes, dict[bytes, bytes]]], reply or [])
        if batch:
            yield batch
        if len(batch) < page:
            return
        # Exclusive start (Redis 6.2+): resume after the last entry read.
        start = "(" + batch[-1][0].decode()


async def read_recording(
    redis: aioredis.Redis,
    keys: Keys,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    page: int = PAGE_ENTRIES,
) -> Recording:
    """The jobs that arrived (were submitted) in [since_ms, until_ms) and finished since, and
    every model load kept. The stream is in finish order, and a
    job finishes after it arrives, so reading starts at since_ms; entries whose job arrived
    outside the window are passed over."""
    found = Recording()
    start = "-" if since_ms is None else str(max(0, since_ms))
    latest: dict[str, ServedJob] = {}
    async for batch in _pages(redis, keys.record, start, page):
        for raw_id, fields in batch:
            found.entries_read += 1
            entry_id = raw_id.decode()
            try:
                job = parse_served(entry_id, fields)
            except CorruptRecord as exc:
                found.skip(entry_id, str(exc))
                continue
            if since_ms is not None and job.created_ms < since_ms:
                continue
            if until_ms is not None and job.created_ms >= until_ms:
                continue
            latest.pop(job.job_id, None)
            latest[job.job_id] = job
    found.jobs = sorted(latest.values(), key=lambda j: (j.created_ms, j.job_id))
    async for batch in _pages(redis, keys.record_loads, "-", page):
        for raw_id, fields in batch:
            try:
                found.loads.append(parse_load(fields))
            except CorruptRecord as exc:
                found.skip(raw_id.decode(), f"model load: {exc}")
    return found


__all__ = [
    "PAGE_ENTRIES",
    "ModelLoad",
    "Recording",
    "ServedJob",
    "parse_load",
    "parse_served",
    "read_recording",
]
