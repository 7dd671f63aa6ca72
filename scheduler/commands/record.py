"""`bilevel record`: what the service recorded of the jobs it served, as a generic trace CSV and a
scenario that replays it (scheduler.recorded_scenario), ready for simulate, tune, train and
evaluate. docs/recording.md describes what is recorded and what it costs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from redis.exceptions import RedisError, ResponseError

from scheduler.client import AsyncClient
from scheduler.commands._common import fail
from scheduler.commands._job_views import (
    ConfigOption,
    NamespaceOption,
    RedisUrlOption,
    parse_duration,
)
from scheduler.commands._outputs import check_output
from scheduler.commands._target import resolve_target
from scheduler.config import ServiceConfig
from scheduler.errors import BilevelError
from scheduler.recorded_scenario import (
    SCENARIO_FILE,
    TRACE_FILE,
    budget_seen,
    scenario_mapping,
    trace_csv,
    traced,
)
from scheduler.recording import Recording, read_recording
from scheduler.retry import describe
from scheduler.settings import Settings


@dataclass(frozen=True, slots=True)
class Window:
    """Arrivals kept: since_s <= submitted < until_s (None: unbounded), in epoch seconds."""

    since_s: float | None
    until_s: float | None

    def text(self) -> str:
        def stamp(t: float | None, none: str) -> str:
            if t is None:
                return none
            return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

        return f"{stamp(self.since_s, 'the oldest entry kept')} to {stamp(self.until_s, 'now')}"


def parse_since(text: str, now_s: float) -> float:
    """Epoch seconds of --since: a duration ago (`15m`, `2h`, `90`), or an ISO 8601 time
    (`2026-12-02T01:00:00Z`; no zone means UTC); Exit(2) naming the forms otherwise."""
    value = text.strip()
    if value[:1].isdigit() and ("-" in value or "T" in value):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise fail(
                f"--since {text!r} is neither a duration (15m, 2h) nor an ISO 8601 time "
                "(2026-12-02T01:00:00Z)"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        since_s = when.timestamp()
    else:
        since_s = now_s - parse_duration(text, "--since")
    if since_s > now_s:
        raise fail(f"--since {text!r} is in the future")
    return since_s


def window_of(since: str | None, duration: str | None, now_s: float) -> Window:
    """The window --since and --duration name: from --since (default: the oldest entry kept)
    for --duration (default: up to now)."""
    since_s = None if since is None else parse_since(since, now_s)
    until_s = None
    if duration is not None:
        length_s = parse_duration(duration, "--duration")
        if length_s <= 0:
            raise fail(f"--duration {duration!r} must be longer than 0")
        if since_s is None:
            raise fail("--duration needs --since (the start of the window it measures)")
        until_s = since_s + length_s
    return Window(since_s, until_s)


def check_out_dir(out: Path, force: bool) -> None:
    """Exit(2) unless both files can be written in `out`: a directory that is new, empty, or
    (with --force) whose trace.csv and scenario.yaml may be replaced."""
    if out.exists() and not out.is_dir():
        raise fail(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise fail(
            f"--out {out}: exists and is not empty; pass --force to replace its "
            f"{TRACE_FILE} and {SCENARIO_FILE}"
        )
    for name in (TRACE_FILE, SCENARIO_FILE):
        check_output("--out", out / name, create_parents=True)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file renamed over it: a reader sees the old file or
    the whole new one, never part of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


async def _read(settings: Settings, window: Window) -> tuple[Recording, int | None]:
    def ms(t: float | None) -> int | None:
        return None if t is None else round(t * 1000)

    async with AsyncClient(settings=settings) as client:
        store = client.store
        recording = await read_recording(
            store.redis, store.keys, since_ms=ms(window.since_s), until_ms=ms(window.until_s)
        )
        history: list[dict[str, int]] = []
        for text in await store.redis.lrange(store.keys.allocation_history, 0, -1):
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                workers = json.loads(text)["workers"]
                history.append({str(q): int(n) for q, n in workers.items()})
        return recording, budget_seen(history)


def read_window(settings: Settings, window: Window) -> tuple[Recording, int | None]:
    """The recording's jobs in `window`, every model load, and the budget the controller was
    seen to use; Exit(1) with one line when Redis cannot be read."""
    try:
        return asyncio.run(_read(settings, window))
    except ResponseError as exc:
        if "WRONGTYPE" in str(exc):
            raise fail(
                f"the recording of namespace {settings.namespace!r} is not a stream (a key "
                "written by something else): nothing to read",
                code=1,
            ) from None
        raise fail(f"Redis refused the request: {describe(exc)}", code=1) from None
    except BilevelError as exc:
        raise fail(str(exc), code=1) from None
    except RedisError as exc:
        raise fail(f"Redis refused the request: {describe(exc)}", code=1) from None


def _description(namespace: str, window: Window, jobs: int, skipped: int) -> str:
    text = f"Recorded from namespace {namespace}: {jobs} jobs that arrived from {window.text()}"
    if skipped:
        text += f" ({skipped} unreadable recording entries skipped)"
    return text + "."


def _summary(
    out: Path, jobs: list[Any], recording: Recording, scenario: dict[str, Any]
) -> list[str]:
    span_s = (jobs[-1].created_ms - jobs[0].created_ms) / 1000 if jobs else 0.0
    lines = [
        f"recorded {len(jobs)} jobs over {span_s:.1f} s on "
        f"{len(scenario['queues'])} queue(s) into {out}: {TRACE_FILE}, {SCENARIO_FILE}"
    ]
    for q in scenario["queues"]:
        service = q["service"]
        spread = f", cv {service['cv']}" if "cv" in service else ""
        lines.append(
            f"  {q['name']}: {', '.join(q['job_types'])}; service {service['kind']} mean "
            f"{service['mean_s']} s{spread}; model load {q['model_load_s']} s"
        )
    left_out = len(recording.jobs) - len(jobs)
    if left_out:
        lines.append(f"  {left_out} job(s) left out: cancelled, or never reached a queue")
    if recording.skipped:
        lines.append(
            f"  {recording.skipped} unreadable entries skipped, e.g. {recording.reasons[0]}"
        )
    return lines


def record(
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Directory for trace.csv and scenario.yaml.", show_default=False
        ),
    ],
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Jobs submitted since: a duration ago (15m, 2h) or an ISO 8601 time "
            "(2026-12-02T01:00:00Z). Default: the oldest entry kept.",
        ),
    ] = None,
    duration: Annotated[
        str | None,
        typer.Option("--duration", help="Window length from --since (default: up to now)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the files of an --out that is not empty.")
    ] = False,
    config_path: ConfigOption = None,
    redis_url: RedisUrlOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Write what the service recorded of the jobs it served as a trace (DIR/trace.csv, the
    generic trace CSV) and a scenario replaying it (DIR/scenario.yaml: the recorded queues,
    service times fitted per job type, measured model-load times), for simulate, tune, train
    and evaluate --scenario DIR/scenario.yaml. With --config the scenario takes the queues'
    bounds and SLOs, routing and allocation from that service config. Exits 2 for a bad option,
    1 when the window holds no job (or Redis cannot be read)."""
    window = window_of(since, duration, time.time())
    check_out_dir(out, force)
    settings, config = resolve_target(config_path, redis_url, namespace)
    recording, budget = read_window(settings, window)
    jobs = traced(recording.jobs)
    if not jobs:
        found = (
            f"{len(recording.jobs)} finished, none of them run on a queue"
            if recording.jobs
            else "none"
        )
        raise fail(
            f"nothing recorded in namespace {settings.namespace!r} from {window.text()} "
            f"({found}; {recording.entries_read} entries read"
            + (f", {recording.skipped} unreadable" if recording.skipped else "")
            + "); the recording is off unless the service runs with store.record: true in its "
            "config (or BILEVEL_RECORD=true)",
            code=1,
        )
    layout = config if isinstance(config, ServiceConfig) else None
    try:
        scenario = scenario_mapping(
            jobs,
            recording.loads,
            name=f"recorded_{settings.namespace}",
            description=_description(settings.namespace, window, len(jobs), recording.skipped),
            layout=layout,
            budget=budget if layout is None else None,
        )
    except (ValidationError, ValueError) as exc:
        raise fail(f"the recorded scenario is not valid: {exc}", code=1) from None
    header = (
        "# Recorded by `bilevel record` from the service's own traffic (docs/recording.md).\n"
        "# Replays trace.csv beside this file; service models are fitted to measured run times.\n"
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
        # The trace first: a scenario on disk always has its trace.
        write_atomic(out / TRACE_FILE, trace_csv(jobs))
        write_atomic(
            out / SCENARIO_FILE,
            header + yaml.safe_dump(scenario, sort_keys=False, width=100),
        )
    except OSError as exc:
        raise fail(f"--out {out}: could not write it: {exc.strerror or exc}", code=1) from None
    for line in _summary(out, jobs, recording, scenario):
        typer.echo(line)


def register(app: typer.Typer) -> None:
    """Adds the `record` command to the CLI."""
    app.command("record")(record)
