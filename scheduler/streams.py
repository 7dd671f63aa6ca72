"""Reading a streaming job's stream: its entries, and what a reader makes of them.

A streaming handler's chunks go to a Redis Stream per job (Keys.stream), appended under the
worker's lease (stream_append.lua) and ended by the script that finishes the job with one terminal
entry: succeeded, dead or cancelled (finish in _common.lua). This module parses those entries
(`parse_entries`) and turns them into what a reader sees (`StreamCursor`), with no I/O; the client's
iterators (scheduler.streaming) feed it from XREAD.

Semantics, for one reader:
- Chunks arrive in the order they were yielded, each exactly once: the reader resumes after the
  last entry id it saw when a connection is lost, and drops an entry it already had by its
  (attempt, index), so a retried append or a re-read never shows twice.
- At-least-once across attempts: when a worker dies mid-stream (or fails and is retried, or drains
  and hands the job back), the job runs again from the start on another worker, and that attempt's
  chunks follow the first attempt's in the stream, after a restart entry. The reader gets a
  `StreamRestart` (attempt, discard) in line before them: the `discard` chunks it had from earlier
  attempts are void, and the new attempt's follow from its first. Only chunks of the attempt that
  finished the job are its output.
- A reader slower than the cap (Settings.stream_max_len entries), or one that starts after the
  stream outgrew it, finds the oldest entries trimmed: it is told how many chunks it missed
  (`Gap`, raised as StreamTruncated by the client), never given a partial stream silently; reading
  on continues from the oldest chunk still held.
- The terminal entry ends the stream; a reader then raises what result() would (JobFailed,
  JobCancelled) or stops. A job that never streamed still gets a terminal entry when a reader
  waits on it, so stream() of a non-streaming job yields nothing and ends when the job ends.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from scheduler.logs import get_logger
from scheduler.models import JobStatus

log = get_logger("bilevel.streams")

# The stream id before any entry: XREAD from it returns the stream from its oldest entry.
START_ID = "0-0"


@dataclass(frozen=True, slots=True)
class StreamRestart:
    """In a job's stream: the job started over on another worker (its earlier attempt died, failed
    and was retried, or was handed back by a draining worker). The `discard` chunks this reader
    got since the previous restart (or the start) are void; the chunks of `attempt` follow, from
    its first."""

    attempt: int
    discard: int


@dataclass(frozen=True, slots=True)
class Gap:
    """Chunks the reader missed: trimmed by the stream's cap before it read them, or unreadable.
    `missed` is how many (of the current attempt)."""

    missed: int
    reason: str


@dataclass(frozen=True, slots=True)
class End:
    """The stream's terminal entry: the job finished with `status` on `attempt`."""

    status: JobStatus
    attempt: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One parsed stream entry. kind: 'chunk' (index, data: the chunk JSON text), 'restart', 'end'
    (status), or 'unreadable' (reason; attempt and index when those could be read)."""

    id: str
    kind: str
    attempt: int = 0
    index: int = -1
    data: bytes = b""
    status: JobStatus | None = None
    reason: str = ""


_STATUSES = {s.value: s for s in JobStatus if s.finished}


def _uint(raw: bytes | None) -> int | None:
    if raw is None or not raw.isdigit() or len(raw) > 30:
        return None
    return int(raw)


def parse_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Entry:
    """An entry as stream_append.lua and finish write it; 'unreadable' for anything else (written
    by someone else: a stream key must be read as data, never trusted)."""
    eid = entry_id.decode(errors="replace")
    attempt = _uint(fields.get(b"a"))
    if attempt is None:
        return Entry(eid, "unreadable", reason="no attempt number")
    if b"c" in fields:
        index = _uint(fields.get(b"n"))
        if index is None:
            return Entry(eid, "unreadable", attempt, reason="a chunk without its index")
        return Entry(eid, "chunk", attempt, index, data=fields[b"c"])
    if b"e" in fields:
        status = _STATUSES.get(fields[b"e"].decode(errors="replace"))
        if status is None:
            return Entry(eid, "unreadable", attempt, reason="an end entry without a final status")
        return Entry(eid, "end", attempt, status=status)
    if b"r" in fields:
        return Entry(eid, "restart", attempt)
    return Entry(eid, "unreadable", attempt, reason="no chunk, restart or end fields")


def parse_entries(raw: Any) -> list[Entry]:
    """The entries of one stream from an XREAD reply (bytes; [] or None when it timed out)."""
    if not raw:
        return []
    out: list[Entry] = []
    for _name, entries in raw:
        for entry_id, fields in entries:
            out.append(parse_entry(entry_id, fields or {}))
    return out


class StreamCursor:
    """What one reader has seen of a stream; `feed` turns entries into events for it: a chunk's
    value, StreamRestart, Gap, or End (the last)."""

    def __init__(self) -> None:
        self.last_id = START_ID
        # The attempt whose chunks the reader is getting, and the index it expects next.
        self.attempt: int | None = None
        self.next_index = 0
        # Chunks given since the last restart: what a restart tells the reader to discard.
        self.given = 0
        self.ended = False

    def feed(self, entries: Iterable[Entry]) -> list[Any]:
        events: list[Any] = []
        for entry in entries:
            if self.ended:
                break
            self.last_id = entry.id
            if entry.kind == "chunk":
                self._chunk(entry, events)
            elif entry.kind == "restart":
                self._new_attempt(entry.attempt, events)
            elif entry.kind == "end":
                self._end(entry, events)
            else:
                self._unreadable(entry, events)
        return events

    def _new_attempt(self, attempt: int, events: list[Any]) -> bool:
        """Move to `attempt` if it is newer; tell the reader to discard what it had. False for an
        entry of an older attempt (which no sound store writes after a newer one)."""
        if self.attempt is not None and attempt <= self.attempt:
            return attempt == self.attempt
        if self.given:
            events.append(StreamRestart(attempt, self.given))
        self.attempt, self.next_index, self.given = attempt, 0, 0
        return True

    def _chunk(self, entry: Entry, events: list[Any]) -> None:
        # A newer attempt without its restart entry (trimmed by the cap) restarts all the same.
        if not self._new_attempt(entry.attempt, events) or entry.index < self.next_index:
            return  # an older attempt's, or one this reader has had already
        if entry.index > self.next_index:
            missed = entry.index - self.next_index
            events.append(Gap(missed, "trimmed by the stream's cap before this reader read them"))
        self.next_index = entry.index + 1
        try:
            value = json.loads(entry.data)
        except (ValueError, UnicodeDecodeError):
            log.warning("stream.chunk_unreadable", entry=entry.id)
            events.append(Gap(1, "a chunk in the stream is not JSON"))
            return
        self.given += 1
        events.append(value)

    def _end(self, entry: Entry, events: list[Any]) -> None:
        # A job that succeeded on an attempt that streamed nothing: what the reader had is void.
        if entry.status is JobStatus.SUCCEEDED and self.given:
            self._new_attempt(entry.attempt, events)
        self.ended = True
        assert entry.status is not None
        events.append(End(entry.status, entry.attempt))

    def _unreadable(self, entry: Entry, events: list[Any]) -> None:
        log.warning("stream.entry_unreadable", entry=entry.id, reason=entry.reason)
        if entry.index >= 0 and entry.attempt == self.attempt and entry.index >= self.next_index:
            self.next_index = entry.index + 1
            events.append(Gap(1, f"an entry of the stream is unreadable: {entry.reason}"))
        # Otherwise what it was cannot be told; a chunk it held shows as a gap before the next.


__all__ = [
    "START_ID",
    "End",
    "Entry",
    "Gap",
    "StreamCursor",
    "StreamRestart",
    "parse_entries",
    "parse_entry",
]
