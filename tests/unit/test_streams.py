"""What a reader makes of a job's stream entries (scheduler.streams.StreamCursor): chunks in
order once each, restarts, gaps from the cap, and the end."""

from __future__ import annotations

from typing import Any

from scheduler.models import JobStatus
from scheduler.streams import End, Entry, Gap, StreamCursor, StreamRestart, parse_entry

_ids = iter(range(1, 1_000_000))


def chunk(attempt: int, index: int, data: bytes | None = None) -> Entry:
    return Entry(f"1-{next(_ids)}", "chunk", attempt, index, data or str(index).encode())


def restart(attempt: int) -> Entry:
    return Entry(f"1-{next(_ids)}", "restart", attempt)


def end(attempt: int, status: JobStatus = JobStatus.SUCCEEDED) -> Entry:
    return Entry(f"1-{next(_ids)}", "end", attempt, status=status)


def feed(*entries: Entry) -> list[Any]:
    return StreamCursor().feed(entries)


def test_chunks_then_the_end() -> None:
    """Chunk values in order, then End; the cursor remembers the last entry id."""
    cursor = StreamCursor()
    entries = [chunk(1, 0), chunk(1, 1), end(1)]
    assert cursor.feed(entries) == [0, 1, End(JobStatus.SUCCEEDED, 1)]
    assert cursor.last_id == entries[-1].id
    assert cursor.ended


def test_a_chunk_seen_twice_is_given_once() -> None:
    """Re-reading an entry (a retried append, a resumed read) never repeats a chunk."""
    assert feed(chunk(1, 0), chunk(1, 0), chunk(1, 1)) == [0, 1]


def test_a_restart_voids_what_came_before() -> None:
    """A restart entry after chunks gives StreamRestart with how many to discard."""
    assert feed(chunk(1, 0), chunk(1, 1), restart(2), chunk(2, 0), end(2)) == [
        0, 1, StreamRestart(2, 2), 0, End(JobStatus.SUCCEEDED, 2)
    ]  # fmt: skip


def test_a_restart_before_any_chunk_says_nothing() -> None:
    """A reader that got nothing of the earlier attempt (trimmed) has nothing to discard."""
    assert feed(restart(2), chunk(2, 0)) == [0]


def test_a_newer_attempt_without_its_restart_entry_restarts_all_the_same() -> None:
    """The restart entry trimmed away: a chunk of a newer attempt implies it."""
    assert feed(chunk(1, 0), chunk(2, 0)) == [0, StreamRestart(2, 1), 0]


def test_success_on_an_attempt_that_streamed_nothing_voids_the_chunks() -> None:
    """The job succeeded on a later attempt with no chunks: what the reader had is void."""
    assert feed(chunk(1, 0), end(2)) == [0, StreamRestart(2, 1), End(JobStatus.SUCCEEDED, 2)]
    assert feed(chunk(1, 0), end(1, JobStatus.DEAD)) == [0, End(JobStatus.DEAD, 1)]


def test_trimmed_chunks_are_a_gap_then_reading_goes_on() -> None:
    """A reader that starts late or falls behind the cap is told how many it missed."""
    assert feed(chunk(1, 5), chunk(1, 6)) == [Gap(5, gap_reason()), 5, 6]
    assert feed(chunk(1, 0), chunk(1, 3)) == [0, Gap(2, gap_reason()), 3]


def gap_reason() -> str:
    return "trimmed by the stream's cap before this reader read them"


def test_an_unreadable_chunk_is_a_gap_of_one() -> None:
    """A chunk whose data is not JSON is not given, and not silently skipped."""
    events = feed(chunk(1, 0), chunk(1, 1, b"{not json"), chunk(1, 2))
    assert events[0] == 0
    assert isinstance(events[1], Gap)
    assert events[1].missed == 1
    assert events[2] == 2


def test_nothing_is_given_after_the_end() -> None:
    """Entries after the terminal one are not read."""
    assert feed(chunk(1, 0), end(1), chunk(1, 1)) == [0, End(JobStatus.SUCCEEDED, 1)]


def test_entries_not_written_by_the_store_are_unreadable() -> None:
    """Garbage fields parse as 'unreadable' with a reason, never raise."""
    assert parse_entry(b"1-1", {b"x": b"y"}).kind == "unreadable"
    assert parse_entry(b"1-1", {b"a": b"one", b"n": b"0", b"c": b"1"}).reason == "no attempt number"
    assert parse_entry(b"1-1", {b"a": b"1", b"c": b"1"}).kind == "unreadable"
    assert parse_entry(b"1-1", {b"a": b"1", b"e": b"running"}).kind == "unreadable"
    ok = parse_entry(b"1-2", {b"a": b"2", b"n": b"3", b"c": b'"x"'})
    assert (ok.kind, ok.attempt, ok.index, ok.data) == ("chunk", 2, 3, b'"x"')
    assert parse_entry(b"1-3", {b"a": b"2", b"e": b"cancelled"}).status is JobStatus.CANCELLED
