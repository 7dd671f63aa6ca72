"""`bilevel status`: per-queue depth, oldest wait, in flight, dead, workers and throughput, the
health of every role host (leading, standby, failing, stalled or gone; see
scheduler.service.health) and, with `--decisions N`, the last N level-2 decisions with their
reasons (scheduler.service.decisions)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from scheduler.client import AsyncClient
from scheduler.commands._common import fail
from scheduler.commands._tables import Column, print_table
from scheduler.commands._target import resolve_target
from scheduler.config import ServiceConfig
from scheduler.errors import BilevelError
from scheduler.keys import DECISIONS_LEN
from scheduler.service.decisions import DecisionRecord, read_decisions
from scheduler.service.health import RoleHealth, read_health
from scheduler.service.views import PublishedShadow, PublishedState
from scheduler.settings import Settings
from scheduler.store import StoreStats


async def _gather(
    settings: Settings, config: ServiceConfig | None, window_s: float, decisions: int
) -> tuple[
    StoreStats,
    StoreStats,
    float,
    PublishedState | None,
    dict[str, bool],
    int,
    list[RoleHealth],
    list[DecisionRecord],
]:
    async with AsyncClient(settings=settings) as client:
        store = client.store
        names = [q.name for q in config.queues] if config is not None else []
        first = await store.stats(names)
        started = time.monotonic()
        await asyncio.sleep(window_s)
        second = await store.stats(names)
        elapsed_s = time.monotonic() - started
        raw = await store.redis.get(store.keys.allocation)
        try:
            published = None if raw is None else PublishedState.from_json(str(raw))
        except ValueError:
            published = None
        leaders = {
            role: bool(await store.redis.exists(store.keys.leader(role)))
            for role in ("router", "controller")
        }
        changes = int(await store.redis.llen(store.keys.allocation_history))
        roles = await read_health(store.redis, store.keys)
        kept = await read_decisions(store.redis, store.keys, decisions)
        return first, second, elapsed_s, published, leaders, changes, roles, kept


def shadow_lines(acting: str, shadow: PublishedShadow) -> list[str]:
    """The shadow policy as `status` prints it: its decision beside the acting one's, the latest
    estimate of the difference, and how it gets promoted."""
    workers = " ".join(f"{q}={n}" for q, n in shadow.workers.items()) or "no decision"
    lines = [f"shadow {shadow.policy} (acting {acting}) would allocate: {workers}"]
    if shadow.fallback:
        lines[0] += f" (its guardrails: {shadow.fallback})"
    e = shadow.estimate
    if e is None:
        lines.append("estimate: none yet (the replay window is still filling)")
    else:
        diff = float(e["difference_s"])
        verdict = "faster" if diff < 0 else "slower" if diff > 0 else "the same"
        lines.append(
            f"estimate: mean JCT {e['shadow_mean_jct_s']:.3f} s under {shadow.policy} vs "
            f"{e['acting_mean_jct_s']:.3f} s under {acting} ({diff:+.3f} s, "
            f"{abs(float(e['gain'])):.0%} {verdict}) over the last {e['window_s']:.0f} s, "
            f"{e['jobs']:.0f} jobs replayed in the simulator ({e['wall_ms']:.0f} ms)"
        )
    rule = shadow.auto_promote
    how = (
        "manual: `bilevel promote`"
        if rule is None
        else f"automatic after {rule['after_s']:.0f} s of estimates at least "
        f"{rule['min_gain']:.0%} faster, or `bilevel promote`"
    )
    if shadow.acting_role == "shadow":
        how += "; allocation.shadow acts since a promotion (the config file is unchanged)"
    lines.append(f"promotion: {how}")
    return lines


def role_rows(roles: list[RoleHealth], now_s: float) -> list[dict[str, Any]]:
    """One row per role host: its state judged now, how long since it last made progress, and
    what it last failed on."""
    return [
        {
            "role": r.role,
            "name": r.name,
            "state": r.state(now_s),
            "leading": r.leading,
            "progress_age_s": round(
                max(0.0, now_s - min(r.last_progress_s, r.election_progress_s)), 1
            ),
            "failures": r.failures,
            "restarts": r.restarts,
            "last_error": r.last_error,
            **r.figures,
        }
        for r in roles
    ]


def status(
    config_path: Annotated[
        Path | None, typer.Option("--config", help="Service config YAML (Redis and namespace).")
    ] = None,
    redis_url: Annotated[str | None, typer.Option("--redis-url", help="Redis URL.")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", help="Namespace.")] = None,
    window_s: Annotated[
        float, typer.Option("--window", min=0.0, help="Seconds to measure throughput over.")
    ] = 1.0,
    decisions: Annotated[
        int,
        typer.Option(
            "--decisions",
            min=0,
            max=DECISIONS_LEN,
            help="Also show the last N level-2 decisions and their reasons.",
        ),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show the queues of a running (or stopped) deployment."""
    settings, config = resolve_target(config_path, redis_url, namespace)
    try:
        first, second, elapsed_s, published, leaders, changes, roles, kept = asyncio.run(
            _gather(settings, config, window_s, decisions)
        )
    except BilevelError as exc:
        raise fail(str(exc), code=1) from None
    rows: list[dict[str, Any]] = []
    for name, q in second.queues.items():
        before = first.queues.get(name)
        done = q.completed_total - (before.completed_total if before else q.completed_total)
        measured = done / elapsed_s if elapsed_s > 0 and window_s > 0 else None
        pub = published.queues.get(name) if published is not None else None
        throughput = (
            measured if measured is not None else (pub.completion_rate_per_s if pub else None)
        )
        rows.append(
            {
                "queue": name,
                "depth": q.depth,
                "oldest_wait_s": q.oldest_wait_s,
                "in_flight": q.in_flight,
                "dead": q.dead,
                "workers": None if pub is None else pub.workers,
                "ready": None if pub is None else pub.ready,
                "loading": None if pub is None else pub.loading,
                "completed_per_s": throughput,
                "completed_total": q.completed_total,
            }
        )
    if as_json:
        payload = {
            "namespace": settings.namespace,
            "ingress": second.ingress,
            "delayed": second.delayed,
            "corrupt_records": second.corrupt_records,
            "keys_moved_aside": second.keys_moved_aside,
            "leaders": leaders,
            "policy": published.policy if published else None,
            "shadow": None
            if published is None or published.shadow is None
            else asdict(published.shadow),
            "allocation_changes": changes,
            "queues": rows,
            "roles": role_rows(roles, time.time()),
        }
        if decisions:
            payload["decisions"] = [d.to_dict() for d in kept]
        typer.echo(json.dumps(payload))
        return
    console = Console()
    title = f"namespace {settings.namespace}: ingress {second.ingress}, delayed {second.delayed}"
    cells = []
    for r in rows:
        workers = "-" if r["workers"] is None else f"{r['workers']} ({r['loading']} loading)"
        rate = "-" if r["completed_per_s"] is None else f"{r['completed_per_s']:.1f}"
        cells.append([
            r["queue"], str(r["depth"]), f"{r['oldest_wait_s']:.1f}", str(r["in_flight"]),
            str(r["dead"]), workers, rate,
        ])  # fmt: skip
    columns = [Column("queue", "name")]
    columns += [Column(c) for c in ("depth", "oldest wait s", "in flight", "dead", "workers")]
    print_table(console, title, [*columns, Column("done/s")], cells)
    led = ", ".join(f"{role}: {'led' if up else 'NO LEADER'}" for role, up in leaders.items())
    policy = f"policy {published.policy}" if published else "no controller has ticked recently"
    console.print(f"{led}; {policy}; {changes} allocation changes recorded", highlight=False)
    if published is not None and published.shadow is not None:
        for line in shadow_lines(published.policy, published.shadow):
            console.print(line, highlight=False, markup=False)
    if second.corrupt_records or second.keys_moved_aside:
        # Serving goes on past corrupt data, so say that something is writing it.
        console.print(
            f"[yellow]{second.corrupt_records} corrupt job records dead-lettered, "
            f"{second.keys_moved_aside} keys of the wrong type moved aside (corrupt:*)[/yellow]"
        )
    if roles:
        _print_roles(console, role_rows(roles, time.time()))
    if decisions:
        _print_decisions(console, kept)


def _print_decisions(console: Console, kept: list[DecisionRecord]) -> None:
    if not kept:
        console.print("no level-2 decision recorded", highlight=False)
        return
    now_s = time.time()
    cells = [
        [f"{max(0.0, now_s - d.t_s):.0f}", d.policy, d.moves(), "; ".join(d.reasons())]
        for d in kept
    ]
    columns = [Column("age s"), Column("policy", "text"), Column("workers", "text")]
    print_table(
        console, "level-2 decisions, newest first", [*columns, Column("why", "text")], cells
    )


def _print_roles(console: Console, rows: list[dict[str, Any]]) -> None:
    cells = []
    for r in rows:
        if r["role"] == "router":
            detail = (
                f"routed {r.get('routed_total', 0):.0f}, lag {r.get('lag_jobs', 0):.0f} jobs / "
                f"{r.get('lag_s', 0.0):.1f} s"
            )
        else:
            detail = (
                f"ticks {r.get('ticks_total', 0):.0f}, last tick "
                f"{r.get('last_tick_s', 0.0) * 1000:.0f} ms"
            )
        if r["last_error"] and r["state"] in ("failing", "stalled"):
            detail += f"; last error: {r['last_error']}"
        state = r["state"].upper() if r["state"] in ("failing", "stalled", "gone") else r["state"]
        cells.append(
            [r["role"], r["name"], state, f"{r['progress_age_s']:.1f}", str(r["failures"]),
             str(r["restarts"]), detail]
        )  # fmt: skip
    columns = [Column("role", "text"), Column("host", "name"), Column("state", "text")]
    columns += [Column("progress age s"), Column("failures"), Column("restarts")]
    print_table(console, "roles", [*columns, Column("detail", "text")], cells)


def register(app: typer.Typer) -> None:
    """Adds the `status` command to the CLI."""
    app.command("status")(status)
