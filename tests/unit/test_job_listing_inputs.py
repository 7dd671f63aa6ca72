"""What `bilevel jobs` and `bilevel dlq` read from a user before they touch Redis: durations,
listing options and cursors, and a job's history as stored."""

from __future__ import annotations

import pytest
import typer

from scheduler.commands._job_views import parse_duration
from scheduler.errors import InvalidCursor
from scheduler.listing import ListOptions, Position, decode_cursor, encode_cursor, parse_history
from scheduler.models import ErrorInfo, JobStatus


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("1h30m", 5400.0), ("7d", 604800.0),
     ("2w", 1209600.0), ("250ms", 0.25), ("1.5h", 5400.0), (" 3D ", 259200.0)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    """A number with units (or plain seconds) reads as seconds."""
    assert parse_duration(text, "--older-than") == seconds


@pytest.mark.parametrize("text", ["", "7x", "d", "-5m", "5 m", "1h-30m", "seven days"])
def test_malformed_durations_are_usage_errors(text: str) -> None:
    """Anything else is exit 2, naming the option and the forms it takes."""
    with pytest.raises(typer.Exit) as info:
        parse_duration(text, "--older-than")
    assert info.value.exit_code == 2


def options(**given: object) -> ListOptions:
    values: dict[str, object] = {"status": None, "queue": None, "tenant": None, "order": "newest"}
    values.update(given)
    return ListOptions.checked(**values)  # type: ignore[arg-type]


def test_a_cursor_round_trips_and_belongs_to_its_options() -> None:
    """A cursor decodes to its position under the same options, and is refused under others."""
    opts = options(status="dead", queue="embed")
    position = Position(5, "1800000000000", "0123abcd")
    cursor = encode_cursor(opts, position)
    assert decode_cursor(cursor, opts) == position
    assert len(cursor) < 100
    for other in (options(status="dead"), options(status="dead", queue="embed", order="oldest")):
        with pytest.raises(InvalidCursor, match="other options"):
            decode_cursor(cursor, other)
    for garbage in ("", "x", "WzFd", encode_cursor(opts, position)[:-3]):
        with pytest.raises(InvalidCursor, match="not a cursor a listing handed out"):
            decode_cursor(garbage, opts)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"status": "done"}, "status 'done' is not a status"),
        ({"queue": "bad queue"}, "queue 'bad queue' is invalid"),
        ({"tenant": ""}, "tenant must not be empty"),
        ({"order": "random"}, "order 'random' is not 'newest' or 'oldest'"),
    ],
)
def test_bad_listing_options_name_what_is_wrong(given: dict[str, object], message: str) -> None:
    """Each bad option is a ValueError naming it."""
    with pytest.raises(ValueError, match=message):
        options(**given)


def test_listing_options_accept_statuses_and_the_ingress() -> None:
    """Status text becomes the enum; '~ingress' is a queue a filter may name."""
    opts = options(status="retrying", queue="~ingress")
    assert (opts.status, opts.queue) == (JobStatus.RETRYING, "~ingress")


def test_history_lines_that_cannot_be_read_are_kept_not_raised() -> None:
    """A garbled line of a stored history becomes an 'unreadable' event; the rest are read."""
    raw = (
        b'{"event":"failed","at_ms":1800000000000,"attempt":1,"type":"Boom","message":"x"}\n'
        b"not json\xff\n"
        b'{"event":"replayed","at_ms":1800000001000,"from":"a","to":"b","reset":false}'
    )
    failed, garbled, replayed = parse_history(raw)
    assert (failed.event, failed.attempt, failed.at_s) == ("failed", 1, 1_800_000_000.0)
    assert failed.error == ErrorInfo(type="Boom", message="x")
    assert garbled.event == "unreadable"
    assert garbled.error is not None
    assert garbled.error.message.startswith("not json")
    assert (replayed.from_queue, replayed.to_queue, replayed.reset_retries) == ("a", "b", False)
    assert parse_history(None) == ()
