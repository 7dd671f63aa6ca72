"""What `bilevel jobs` and `bilevel dlq` share: the target options, running a client call with
its errors turned into one-line messages and exit codes, durations, and how a job is shown."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from redis.exceptions import RedisError
from rich.console import Console

from scheduler.client import AsyncClient
from scheduler.commands._common import fail
from scheduler.commands._tables import Column, print_table
from scheduler.commands._target import resolve_target
from scheduler.errors import BilevelError, InvalidCursor, JobNotFound, UnknownQueue
from scheduler.listing import MAX_LIMIT, ORDERED_BY, SECTIONS, JobPage, JobSummary
from scheduler.models import Job, JobEvent
from scheduler.operations import Refusal
from scheduler.retry import describe

T = TypeVar("T")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="Service config YAML (Redis and namespace).")
]
RedisUrlOption = Annotated[str | None, typer.Option("--redis-url", help="Redis URL.")]
NamespaceOption = Annotated[str | None, typer.Option("--namespace", help="Namespace.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
LimitOption = Annotated[
    int, typer.Option("--limit", help=f"Most jobs on the page (1-{MAX_LIMIT}).")
]
OldestOption = Annotated[
    bool, typer.Option("--oldest", help="Oldest first (default: newest first).")
]
CursorOption = Annotated[
    str | None, typer.Option("--cursor", help="Resume where the previous page ended.")
]

# Results longer than this are shown by their size in text output (--json prints them whole).
_RESULT_SHOWN_CHARS = 200
_ERROR_SHOWN_CHARS = 80
_TABLE_ERROR_CHARS = 40


def run_client(
    config_path: Path | None,
    redis_url: str | None,
    namespace: str | None,
    call: Callable[[AsyncClient], Awaitable[T]],
) -> T:
    """`call` on a connected client; every error a user can cause or meet is one line on stderr
    and an exit code: 2 for a malformed option (a bad status, queue name, limit or cursor), 1 for
    what the store says (unknown job or queue, Redis unreachable)."""
    settings, _ = resolve_target(config_path, redis_url, namespace)

    async def go() -> T:
        async with AsyncClient(settings=settings) as client:
            return await call(client)

    try:
        return asyncio.run(go())
    except (UnknownQueue, JobNotFound) as exc:
        raise fail(str(exc), code=1) from None
    except InvalidCursor as exc:
        raise fail(str(exc), code=2) from None
    except BilevelError as exc:
        raise fail(str(exc), code=1) from None
    except ValueError as exc:
        raise fail(str(exc), code=2) from None
    except RedisError as exc:
        # A reply no retry fixes (an ACL that forbids a command, a server out of memory).
        raise fail(f"Redis refused the request: {describe(exc)}", code=1) from None


def check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise fail(f"--limit {limit} is out of range 1..{MAX_LIMIT}")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str, option: str) -> float:
    """Seconds in a duration such as `90`, `90s`, `15m`, `1h30m`, `7d` or `2w`; Exit(2) naming
    the option and the forms it takes otherwise."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = _DURATION.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise fail(
            f"{option} {text!r} is not a duration: give a number with a unit, "
            "e.g. 90s, 15m, 1h30m, 7d or 2w (a plain number is seconds)"
        )
    seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if not math.isfinite(seconds):
        raise fail(f"{option} {text!r} is too long")
    return seconds


def ago(time_s: float | None, now_s: float) -> str:
    """A short age: `45s`, `12m`, `3h`, `2d` ('-' for none; `in 20s` for the future)."""
    if time_s is None:
        return "-"
    delta = now_s - time_s
    text = _span(abs(delta))
    return text if delta >= 0 else f"in {text}"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def when(time_s: float | None, now_s: float) -> str:
    """An absolute UTC time with its age, or '-'."""
    if time_s is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time_s))
    return f"{stamp} UTC ({ago(time_s, now_s)} ago)" if time_s <= now_s else f"{stamp} UTC"


def _cut(text: str, chars: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= chars else text[: chars - 1] + "…"


def error_text(job: JobSummary | Job, chars: int = _ERROR_SHOWN_CHARS) -> str:
    if job.error is None:
        return "-"
    return _cut(f"{job.error.type}: {job.error.message}", chars)


def _plain(value: Any) -> Any:
    """JSON-ready: enums by value, dataclasses and models as dicts."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def summary_json(job: JobSummary) -> dict[str, Any]:
    return _plain(asdict(job))  # type: ignore[no-any-return]


def print_page(page: JobPage, *, title: str, oldest: bool, as_json: bool, now_s: float) -> None:
    """A listing page: a table (or JSON), and how to fetch the next page."""
    if as_json:
        typer.echo(
            json.dumps({"jobs": [summary_json(j) for j in page.jobs], "cursor": page.cursor})
        )
        return
    order = "oldest" if oldest else "newest"
    sections = ", ".join(f"{s} by {ORDERED_BY[s]}" for s in SECTIONS)
    caption = f"{len(page.jobs)} shown, {order} first within each section ({sections})"
    rows = [
        [
            j.id,
            j.status.value if j.status is not None else "unreadable",
            j.queue or "-",
            j.job_type or "-",
            str(j.attempts),
            ago(j.created_s, now_s),
            j.unreadable if j.unreadable else error_text(j, _TABLE_ERROR_CHARS),
        ]
        for j in page.jobs
    ]
    columns = [
        Column("job id", "text"),
        Column("status", "text"),
        Column("queue", "name"),
        Column("type", "text"),
        Column("attempts"),
        Column("age"),
        Column("error", "text"),
    ]
    print_table(Console(highlight=False), title, columns, rows, caption=caption)
    # On a line of its own, never wrapped, so it can be copied whole.
    typer.echo(f"next page: --cursor {page.cursor}" if page.cursor else "no more jobs")


def _event_text(event: JobEvent, now_s: float) -> str:
    at = when(event.at_s, now_s)
    if event.event == "failed":
        error = f"{event.error.type}: {event.error.message}" if event.error else "?"
        return f"attempt {event.attempt} failed at {at}: {_cut(error, _ERROR_SHOWN_CHARS)}"
    if event.event == "lease_expired":
        return f"attempt {event.attempt}: its lease expired at {at} (the worker died or stalled)"
    if event.event == "replayed":
        budget = "budget reset" if event.reset_retries else "budget kept"
        return f"replayed at {at} from {event.from_queue} to {event.to_queue} ({budget})"
    message = event.error.message if event.error else ""
    return f"{event.event}: {_cut(message, _ERROR_SHOWN_CHARS)}"


def job_json(job: Job) -> dict[str, Any]:
    out: dict[str, Any] = job.model_dump(mode="json")
    out["job_type"] = job.job_type
    return out


def print_job(job: Job, *, as_json: bool, now_s: float) -> None:
    """Every field of a job's record (its payload only in JSON)."""
    if as_json:
        typer.echo(json.dumps(job_json(job)))
        return
    o = job.spec.options
    budget = (
        f" ({job.charged_attempts} counted against max_retries {job.max_retries})"
        if job.max_retries is not None and job.charged_attempts is not None
        else ""
    )
    lines = [
        ("job", job.id),
        ("status", job.status.value + (" (cancel requested)" if job.cancel_requested else "")),
        ("queue", job.queue or "-"),
        ("type", job.job_type),
        ("priority", str(o.priority)),
        ("tenant", o.tenant or "-"),
        ("tags", ", ".join(o.tags) or "-"),
        ("attempts", f"{job.attempts}{budget}"),
        ("created", when(job.created_s, now_s)),
        ("started", when(job.started_s, now_s)),
        ("finished", when(job.finished_s, now_s)),
        ("error", "-" if job.error is None else f"{job.error.type}: {job.error.message}"),
        ("result", _result_text(job)),
    ]
    for name, value in lines:
        typer.echo(f"{name:<9} {value}")
    if job.history:
        typer.echo("history")
        for i, event in enumerate(job.history, 1):
            typer.echo(f"  {i}. {_event_text(event, now_s)}")
    if job.error is not None and job.error.traceback:
        typer.echo("traceback")
        for line in job.error.traceback.rstrip().splitlines():
            typer.echo(f"  {line}")


def _result_text(job: Job) -> str:
    if job.result_bytes is None:
        return "-"
    text = json.dumps(job.result)
    if len(text) <= _RESULT_SHOWN_CHARS:
        return text
    return f"{job.result_bytes} bytes of JSON (--json prints it)"


def print_refusals(refused: Sequence[Refusal]) -> None:
    """One error line per job a replay or purge refused (the caller exits 1)."""
    for refusal in refused:
        fail(str(refusal), code=1)


def refusal_json(refused: Sequence[Refusal]) -> list[dict[str, Any]]:
    return [{"job_id": r.job_id, "code": r.code.name, "reason": r.reason} for r in refused]
