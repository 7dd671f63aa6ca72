"""`bilevel jobs get|cancel|list`: one job's whole record, cancelling jobs, and listings read
from the store's own indexes (scheduler.listing)."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from scheduler.client import AsyncClient
from scheduler.commands._common import fail
from scheduler.commands._job_views import (
    ConfigOption,
    CursorOption,
    JsonOption,
    LimitOption,
    NamespaceOption,
    OldestOption,
    RedisUrlOption,
    check_limit,
    print_job,
    print_page,
    run_client,
)
from scheduler.listing import JobPage, ListOptions, ListOrder
from scheduler.models import Job, JobStatus
from scheduler.operations import Cancellation, CancelOutcome

app = typer.Typer(help="Look at jobs and cancel them.", no_args_is_help=True, rich_markup_mode=None)

_STATUSES = ", ".join(s.value for s in JobStatus)


def get(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    as_json: JsonOption = False,
    config_path: ConfigOption = None,
    redis_url: RedisUrlOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Show a job's record: status, queue, attempts against its retry budget, times, error and
    traceback, result (or its size), tenant, tags, priority and the history of its attempts.
    Exits 1 for an unknown job."""

    async def call(client: AsyncClient) -> Job:
        return await client.get(job_id)

    job = run_client(config_path, redis_url, namespace, call)
    print_job(job, as_json=as_json, now_s=time.time())


_CANCEL_TEXT = {
    CancelOutcome.CANCELLED: "cancelled",
    CancelOutcome.STOPPING: "running: its worker stops it at the next heartbeat",
    CancelOutcome.ALREADY_FINISHED: "had finished already; nothing changed",
}


def cancel(
    job_ids: Annotated[list[str], typer.Argument(help="Ids of the jobs to cancel.")],
    as_json: JsonOption = False,
    config_path: ConfigOption = None,
    redis_url: RedisUrlOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Cancel jobs: a waiting one at once, a running one by its worker. One line per job; exits
    1 when a job is unknown (or its record unreadable: it is dead-lettered instead)."""

    async def call(client: AsyncClient) -> list[Cancellation]:
        return await client.cancel(job_ids)

    results = run_client(config_path, redis_url, namespace, call)
    if as_json:
        typer.echo(json.dumps([{"job_id": c.job_id, "outcome": c.outcome.value} for c in results]))
    else:
        for c in results:
            if c.outcome in _CANCEL_TEXT:
                typer.echo(f"{c.job_id}: {_CANCEL_TEXT[c.outcome]}")
    bad = [c for c in results if c.outcome not in _CANCEL_TEXT]
    for c in bad:
        reason = (
            "not found (never submitted, purged, or its record expired)"
            if c.outcome is CancelOutcome.NOT_FOUND
            else "its record was unreadable: dead-lettered with the reason instead"
        )
        fail(f"job {c.job_id}: {reason}", code=1)
    if bad:
        raise typer.Exit(code=1)


def list_jobs(
    queue: Annotated[
        str | None, typer.Option("--queue", help="Only this queue's jobs ('~ingress': unrouted).")
    ] = None,
    status: Annotated[
        str | None, typer.Option("--status", help=f"Only jobs in this status ({_STATUSES}).")
    ] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's jobs.")] = None,
    limit: LimitOption = 50,
    oldest: OldestOption = False,
    cursor: CursorOption = None,
    as_json: JsonOption = False,
    config_path: ConfigOption = None,
    redis_url: RedisUrlOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """List jobs from the store's indexes, a page at a time: by section (pending, queued,
    running, delayed, dead, finished), each newest first by its own time (--oldest: oldest
    first). A page reads at most --limit jobs and max(4 x limit, 500) index entries; its caption (or
    "cursor" in JSON) resumes it. Finished jobs: succeeded and cancelled ones within the result
    TTL, the newest 10,000 per queue."""
    check_limit(limit)
    order = ListOrder.OLDEST if oldest else ListOrder.NEWEST
    try:
        ListOptions.checked(status=status, queue=queue, tenant=tenant, order=order)
    except ValueError as exc:
        raise fail(str(exc)) from None

    async def call(client: AsyncClient) -> JobPage:
        return await client.jobs(
            status=status, queue=queue, tenant=tenant, order=order, limit=limit, cursor=cursor
        )

    page = run_client(config_path, redis_url, namespace, call)
    print_page(page, title="Jobs", oldest=oldest, as_json=as_json, now_s=time.time())


def register(app_: typer.Typer) -> None:
    """Adds `jobs get|cancel|list` to the CLI."""
    app.command("get")(get)
    app.command("cancel")(cancel)
    app.command("list")(list_jobs)
    app_.add_typer(app, name="jobs")
