"""`bilevel dlq list|show|replay|purge`: the dead-letter sets, per queue (and `~ingress` for
jobs that died before they were routed)."""

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
    parse_duration,
    print_job,
    print_page,
    print_refusals,
    refusal_json,
    run_client,
)
from scheduler.keys import INGRESS_QUEUE, validate_name
from scheduler.listing import JobPage, ListOrder
from scheduler.models import Job, JobStatus
from scheduler.operations import PurgeReport, ReplayReport

app = typer.Typer(
    help="Inspect, replay and purge dead-lettered jobs.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

QueueOption = Annotated[
    str | None,
    typer.Option("--queue", help="Only this queue's dead-letter set ('~ingress': unrouted jobs)."),
]
JobIdsArgument = Annotated[
    list[str] | None, typer.Argument(help="Ids of dead-lettered jobs (or --all).")
]
AllOption = Annotated[bool, typer.Option("--all", help="Every job in the dead-letter set(s).")]


def _check_queue_name(queue: str | None, option: str) -> None:
    if queue is not None and queue != INGRESS_QUEUE:
        try:
            validate_name("queue", queue)
        except ValueError as exc:
            raise fail(f"{option}: {exc}") from None


def _ids_or_all(job_ids: list[str] | None, every: bool, extras: dict[str, bool]) -> list[str]:
    """The ids given, or [] with --all; Exit(2) unless exactly one of them was given, or when
    an option that only --all takes came with ids."""
    ids = job_ids or []
    if ids and every:
        raise fail("give job ids or --all, not both")
    if not ids and not every:
        raise fail("give the ids of dead-lettered jobs, or --all")
    for option, given in extras.items():
        if given and not every:
            raise fail(f"{option} goes with --all (ids name their jobs already)")
    return ids


def list_dead(
    queue: QueueOption = None,
    limit: LimitOption = 50,
    oldest: OldestOption = False,
    cursor: CursorOption = None,
    as_json: JsonOption = False,
    config_path: ConfigOption = None,
    redis_url: RedisUrlOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """List dead-lettered jobs, newest death first (--oldest: oldest first), a page at a time,
    with the error each died of. Records that cannot be read are listed too (status
    'unreadable', with the reason), so they can be purged."""
    check_limit(limit)
    _check_queue_name(queue, "--queue")
    order = ListOrder.OLDEST if oldest else ListOrder.NEWEST

    async def call(client: AsyncClient) -> JobPage:
        return await client.dead_letters(queue=queue, order=order, limit=limit, cursor=cursor)

    page = run_client(config_path, redis_url, namespace, call)
    print_page(page, title="Dead letters", oldest=oldest, as_json=as_json, now_s=time.time())


def show(
    job_id: Annotated[str, typer.Argument(help="The dead-lettered job's id.")],
    as_json: JsonOption = False,
    config_path: ConfigOption = None,
    redis_url: RedisUrlOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Show a dead-lettered job's record, the error it died of with its traceback, and the
    history of its attempts. Exits 1 for an unknown job or one that is not dead."""

    async def call(client: AsyncClient) -> Job:
        return await client.get(job_id)

    job = run_client(config_path, redis_url, namespace, call)
    if job.status is not JobStatus.DEAD:
        raise fail(f"job {job_id} is {job.status.value}, not in the dead-letter set", code=1)
    print_job(job, as_json=as_json, now_s=time.time())


def replay(
    job_ids: JobIdsArgument = None,
    every: AllOption = False,
    queue: QueueOption = None,
    to: Annotated[
        str | None,
        typer.Option("--to", help="Queue them here instead of the queue each died in."),
    ] = None,
    keep_budget: Annotated[
        bool,
        typer.Option(
            "--keep-budget",
            help="Keep the retry budget spent: one more failure dead-letters the job again "
            "(default: reset, so it gets its max_retries again).",
        ),
    ] = False,
    as_json: JsonOption = False,
    config_path: ConfigOption = None,
    redis_url: RedisUrlOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Send dead-lettered jobs back to work, each atomically: out of the dead-letter set and into
    the queue it died in (at its old place: priority, deadline, arrival), into the ingress when
    it died before routing, or into --to. Attempts, the latest error and the history are kept.
    Refuses, one line each, unknown ids, jobs not dead and records that cannot run again (purge
    those); exits 1 when any was refused."""
    ids = _ids_or_all(job_ids, every, {"--queue": queue is not None})
    _check_queue_name(queue, "--queue")
    _check_queue_name(to, "--to")

    async def call(client: AsyncClient) -> ReplayReport:
        if every:
            return await client.replay_all(queue=queue, to=to, reset_retries=not keep_budget)
        return await client.replay(ids, to=to, reset_retries=not keep_budget)

    report = run_client(config_path, redis_url, namespace, call)
    if as_json:
        typer.echo(
            json.dumps({"replayed": list(report.replayed), "refused": refusal_json(report.refused)})
        )
    else:
        budget = "budget kept" if keep_budget else "retry budget reset"
        typer.echo(f"replayed {len(report.replayed)} job(s) ({budget})")
    print_refusals(report.refused)
    if report.refused:
        raise typer.Exit(code=1)


def purge(
    job_ids: JobIdsArgument = None,
    every: AllOption = False,
    queue: QueueOption = None,
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than", help="With --all: only jobs that died longer ago (90s, 15m, 7d, ...)."
        ),
    ] = None,
    as_json: JsonOption = False,
    config_path: ConfigOption = None,
    redis_url: RedisUrlOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Delete dead-lettered jobs: each record with its dead-letter entries, atomically, in chunks
    of 100 (unreadable records included). --all deletes the jobs dead when it started (older
    than --older-than), oldest first; jobs dying meanwhile are kept. A job that is not dead is
    refused and left alone; exits 1 when any was refused."""
    older_than_s = parse_duration(older_than, "--older-than") if older_than is not None else None
    ids = _ids_or_all(
        job_ids, every, {"--queue": queue is not None, "--older-than": older_than is not None}
    )
    _check_queue_name(queue, "--queue")

    async def call(client: AsyncClient) -> PurgeReport:
        if every:
            return await client.purge_all(queue=queue, older_than_s=older_than_s)
        return await client.purge(ids)

    report = run_client(config_path, redis_url, namespace, call)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "purged": report.purged,
                    "dropped": report.dropped,
                    "refused": refusal_json(report.refused),
                }
            )
        )
    else:
        stale = f"; {report.dropped} stale entries dropped" if report.dropped else ""
        typer.echo(f"purged {report.purged} job(s){stale}")
    print_refusals(report.refused)
    if report.refused:
        raise typer.Exit(code=1)


def register(app_: typer.Typer) -> None:
    """Adds `dlq list|show|replay|purge` to the CLI."""
    app.command("list")(list_dead)
    app.command("show")(show)
    app.command("replay")(replay)
    app.command("purge")(purge)
    app_.add_typer(app, name="dlq")
