"""`bilevel demo` (what `make demo` runs): the live service on a local Ray with an embedded Redis.

It starts the router and controller actors with the demo models (deploy/service.yaml's queues, built
in here so the demo needs no file), sends a bursty mixed load from the async client for about 30 s
that shifts from embeddings to generation to classification, waits for every result, then prints
per-queue job completion times and throughput and the allocation changes over time, and writes a
PNG. While it runs, the live dashboard and the Prometheus metrics are served on a free loopback port
(the URL is printed at start). Everything it started (actors, Ray, Redis) is stopped before it
returns.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from scheduler.client import AsyncClient, AsyncJobHandle, JobRequest
from scheduler.commands._common import fail
from scheduler.commands._outputs import check_plot, write_failed
from scheduler.commands.status import shadow_lines
from scheduler.config import ServiceConfig
from scheduler.errors import BilevelError
from scheduler.keys import Keys
from scheduler.service.views import PublishedState

QUEUE_OF = {"embed": "embeddings", "classify": "classifier", "generate": "generator"}

# Jobs per second of each type in each phase: the load moves from one model to another, so the
# controller has to move workers (and pay the model loads) to keep up.
PHASES: tuple[tuple[str, dict[str, float]], ...] = (
    ("embeddings burst", {"embed": 40.0, "classify": 4.0, "generate": 0.5}),
    ("generation burst", {"embed": 4.0, "classify": 2.0, "generate": 4.0}),
    ("classification burst", {"embed": 4.0, "classify": 40.0, "generate": 0.5}),
)
# The job type each phase's burst is of (the generation burst is the heaviest in work, not in
# jobs per second).
BURST_OF: tuple[str, ...] = ("embed", "generate", "classify")
SLICE_S = 0.05


# The acting policy and its shadow, by the demo's --policy (see DEFAULT_POLICY).
SHADOW_OF = {"learned": "switch_aware", "switch_aware": "learned"}
# The shipped learned allocator acts, switch-aware decides in shadow and the estimate of what it
# would have done is printed at the end (docs/shadow.md has both ways round on the demo's load).
DEFAULT_POLICY = "learned"


def demo_config(policy: str = DEFAULT_POLICY) -> ServiceConfig:
    """The demo service: three queues, one worker each at least and one more that level 2 moves
    to where the load is (a budget of four), `policy` acting and the other of switch-aware and
    the shipped learned allocator in shadow."""
    if policy not in SHADOW_OF:
        raise ValueError(f"the demo runs {' or '.join(SHADOW_OF)}, not {policy!r}")
    return ServiceConfig.from_mapping(
        {
            "store": {"namespace": "demo", "lease_s": 10},
            # A free port: a demo must not fail because a service on this machine holds 9470.
            "metrics": {"port": 0},
            "handlers": ["workers.demo_models"],
            "queues": [
                {"name": q, "job_types": [t], "min_workers": 1, "max_workers": 2, "slo_s": slo}
                for (t, q), slo in zip(QUEUE_OF.items(), (0.5, 1.0, 5.0), strict=True)
            ],
            "routing": {"policy": "rule"},
            "allocation": {
                "policy": policy,
                "shadow": SHADOW_OF[policy],
                "tick_s": 1.0,
                "budget": 4,
                "max_moves_per_tick": 1,
            },
        },
        source="demo",
    )


def _payload(job_type: str, i: int, rng: np.random.Generator) -> Any:
    if job_type == "embed":
        return {"text": f"document {i} about queue {int(rng.integers(100))}"}
    if job_type == "classify":
        return {"text": f"is item {i} a cat, a dog or a bird?"}
    return {"prompt": f"story {i}:", "max_tokens": int(rng.integers(8, 33))}


@dataclass
class Sent:
    job_type: str
    handle: AsyncJobHandle
    sent_s: float


@dataclass
class Outcomes:
    jct_s: dict[str, list[float]] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    finished_at_s: dict[str, list[float]] = field(default_factory=dict)
    # Every sent job and its completion time (NaN when it did not succeed), in sending order.
    sent_order: list[Sent] = field(default_factory=list)
    jct_by_sent: list[float] = field(default_factory=list)


async def _send_load(
    client: AsyncClient, phase_s: float, rng: np.random.Generator, console: Console
) -> list[Sent]:
    """Poisson arrivals per job type, submitted in one batch per 50 ms slice."""
    sent: list[Sent] = []
    start = time.monotonic()
    for name, rates in PHASES:
        console.print(f"  {time.monotonic() - start:5.1f} s  {name}")
        phase_end = time.monotonic() + phase_s
        while (now := time.monotonic()) < phase_end:
            batch = [
                (job_type, JobRequest(job_type, _payload(job_type, len(sent) + k, rng)))
                for job_type, rate in rates.items()
                for k in range(int(rng.poisson(rate * SLICE_S)))
            ]
            if batch:
                handles = await client.submit_many([r for _, r in batch])
                sent += [Sent(t, h, now - start) for (t, _), h in zip(batch, handles, strict=True)]
            await asyncio.sleep(max(0.0, SLICE_S - (time.monotonic() - now)))
    return sent


async def _collect(client: AsyncClient, sent: list[Sent], timeout_s: float) -> Outcomes:
    out = Outcomes()
    results = await client.gather(
        [s.handle for s in sent], timeout=timeout_s, return_exceptions=True
    )
    for s, result in zip(sent, results, strict=True):
        if isinstance(result, BilevelError):
            out.failed[s.job_type] = out.failed.get(s.job_type, 0) + 1
    jobs = await client.store.get_many([s.handle.id for s in sent])
    t0 = min((j.created_s for j in jobs if j is not None), default=0.0)
    out.sent_order = list(sent)
    for job in jobs:
        if job is None or job.finished_s is None or job.status != "succeeded":
            out.jct_by_sent.append(math.nan)
            continue
        out.jct_by_sent.append(job.finished_s - job.created_s)
        out.jct_s.setdefault(job.job_type, []).append(job.finished_s - job.created_s)
        out.finished_at_s.setdefault(job.job_type, []).append(job.finished_s - t0)
    return out


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _print_results(console: Console, out: Outcomes, sent: list[Sent]) -> None:
    table = Table(title="per queue")
    for col in ("queue", "jobs", "failed", "mean JCT s", "p50 s", "p99 s", "jobs/s"):
        table.add_column(col, justify="left" if col == "queue" else "right")
    for job_type, queue in QUEUE_OF.items():
        jct = out.jct_s.get(job_type, [])
        done_at = out.finished_at_s.get(job_type, [])
        span = (max(done_at) - min(done_at)) if len(done_at) > 1 else 0.0
        table.add_row(
            queue,
            str(sum(1 for s in sent if s.job_type == job_type)),
            str(out.failed.get(job_type, 0)),
            f"{statistics.fmean(jct):.3f}" if jct else "-",
            f"{_p(jct, 50):.3f}",
            f"{_p(jct, 99):.3f}",
            f"{len(done_at) / span:.1f}" if span > 0 else "-",
        )
    console.print(table)


def change_lines(history: list[dict[str, Any]], t0_s: float) -> list[str]:
    """One line per allocation change: which queues gained or lost workers, the policy that
    decided, what it saw of the queues that gained, and the guardrails or fallback involved."""
    lines = []
    before: dict[str, int] = {}
    for entry in history:
        workers: dict[str, int] = entry["workers"]
        moved = [q for q in workers if workers[q] != before.get(q, 0)]
        if not moved:
            before = workers
            continue
        cells = []
        for q in moved:
            old, new = before.get(q, 0), workers[q]
            cells.append(f"{q} {old}->{new} ({new - old:+d})")
        why = []
        for q in moved:
            seen = entry.get("inputs", {}).get(q)
            busy = seen is not None and (seen["depth"] > 0 or seen["rate_per_s"] > 0)
            if seen is not None and busy and workers[q] > before.get(q, 0):
                why.append(
                    f"{q}: {seen['depth']} waiting, {seen['rate_per_s']:.1f}/s arriving, "
                    f"oldest {seen['oldest_wait_s']:.1f} s"
                )
        proposal = entry.get("proposal") or {}
        constraints = entry.get("constraints") or []
        if constraints:
            wanted = " ".join(f"{q}={proposal[q]}" for q in moved if q in proposal)
            why.append(f"proposed {wanted}, trimmed by {', '.join(constraints)}")
        if entry.get("fallback"):
            why.append(f"fallback: {entry['fallback']}")
        policy = entry.get("policy") or "?"
        lines.append(
            f"{entry['t_s'] - t0_s:6.1f} s  {', '.join(cells)}  [{policy}] " + "; ".join(why)
        )
        before = workers
    return lines


@dataclass(frozen=True)
class PhaseReport:
    """How one load phase went for the queue its burst is on."""

    name: str
    queue: str
    start_s: float
    # Workers the burst's queue had when the phase began, and the most it got during the phase.
    workers_at_start: int
    workers_max: int
    # Seconds from the phase's start until the queue had more workers than at the start (None:
    # never during the phase).
    more_workers_after_s: float | None
    jobs: int
    p99_jct_s: float
    slo_s: float | None


def phase_reports(
    history: list[dict[str, Any]],
    t0_s: float,
    phase_s: float,
    sent: list[Sent],
    out: Outcomes,
    slo_of: dict[str, float | None],
) -> list[PhaseReport]:
    """Per phase: when the burst's queue got workers, and its jobs' p99 completion time."""
    reports = []
    for i, ((name, _), job_type) in enumerate(zip(PHASES, BURST_OF, strict=True)):
        queue = QUEUE_OF[job_type]
        start_s, end_s = i * phase_s, (i + 1) * phase_s

        def workers_at(t_s: float, queue: str = queue) -> int:
            count = 0
            for entry in history:
                if entry["t_s"] - t0_s > t_s:
                    break
                count = int(entry["workers"].get(queue, 0))
            return count

        at_start = workers_at(start_s)
        during = [
            (e["t_s"] - t0_s, int(e["workers"].get(queue, 0)))
            for e in history
            if start_s < e["t_s"] - t0_s <= end_s
        ]
        more = next((t - start_s for t, n in during if n > at_start), None)
        jct = [
            j
            for s, j in zip(out.sent_order, out.jct_by_sent, strict=True)
            if s.job_type == job_type and start_s <= s.sent_s < end_s and not math.isnan(j)
        ]
        reports.append(
            PhaseReport(
                name=name,
                queue=queue,
                start_s=start_s,
                workers_at_start=at_start,
                workers_max=max([at_start, *(n for _, n in during)]),
                more_workers_after_s=more,
                jobs=sum(1 for s in sent if s.job_type == job_type and start_s <= s.sent_s < end_s),
                p99_jct_s=_p(jct, 99),
                slo_s=slo_of.get(queue),
            )
        )
    return reports


def _print_phases(console: Console, reports: list[PhaseReport]) -> None:
    table = Table(title="each load shift: did its queue get workers?")
    for col in ("phase", "queue", "workers at start", "most", "more after s", "jobs", "p99 s"):
        table.add_column(col, justify="left" if col in ("phase", "queue") else "right")
    for r in reports:
        after = "never" if r.more_workers_after_s is None else f"{r.more_workers_after_s:.1f}"
        slo = "" if r.slo_s is None else f" (SLO {r.slo_s:g})"
        table.add_row(
            r.name, r.queue, str(r.workers_at_start), str(r.workers_max), after, str(r.jobs),
            f"{r.p99_jct_s:.3f}{slo}",
        )  # fmt: skip
    console.print(table)


def _print_allocation(console: Console, history: list[dict[str, Any]], t0_s: float) -> None:
    table = Table(title="allocation changes (workers per queue)")
    table.add_column("t s", justify="right")
    for queue in QUEUE_OF.values():
        table.add_column(queue, justify="right")
    for entry in history:
        workers = entry["workers"]
        table.add_row(
            f"{entry['t_s'] - t0_s:6.1f}", *(str(workers.get(q, 0)) for q in QUEUE_OF.values())
        )
    console.print(table)


def _plot(
    path: Path, sent: list[Sent], history: list[dict[str, Any]], t0_s: float, out: Outcomes
) -> None:
    from scheduler.plots import demo_figure, save  # matplotlib: only once there is a plot to make

    submitted: dict[str, list[float]] = {}
    for s in sent:
        submitted.setdefault(QUEUE_OF[s.job_type], []).append(s.sent_s)
    allocation = [(e["t_s"] - t0_s, e["workers"]) for e in history]
    jct = {QUEUE_OF[job_type]: values for job_type, values in out.jct_s.items()}
    end_s = max((s.sent_s for s in sent), default=1.0)
    save(demo_figure(list(QUEUE_OF.values()), submitted, allocation, jct, end_s), path)


async def _drive(
    redis_url: str, config: ServiceConfig, phase_s: float, plot: Path, console: Console
) -> Exception | None:
    """Sends the load, prints the results and writes the plot; the plot's write error, if any."""
    rng = np.random.default_rng(7)
    async with AsyncClient(redis_url, settings=config.store) as client:
        t0_wall = time.time()
        console.print(f"[bold]load[/] for {phase_s * len(PHASES):.0f} s:")
        sent = await _send_load(client, phase_s, rng, console)
        console.print(f"submitted {len(sent)} jobs; waiting for the results")
        out = await _collect(client, sent, timeout_s=60.0)
        keys = Keys(config.store.namespace)
        raw = await client.store.redis.lrange(keys.allocation_history, 0, -1)
        history = [json.loads(e) for e in raw]
        state = await client.store.redis.get(keys.allocation)
    published = None if state is None else PublishedState.from_json(str(state))
    _print_results(console, out, sent)
    slo_of = {q.name: q.slo_s for q in config.queues}
    _print_phases(console, phase_reports(history, t0_wall, phase_s, sent, out, slo_of))
    console.print("[bold]what level 2 decided, and why[/] (one line per change):")
    for line in change_lines(history, t0_wall):
        console.print(f"  {line}", highlight=False, markup=False)
    if published is not None and published.shadow is not None:
        console.print("[bold]shadow mode[/]:")
        for line in shadow_lines(published.policy, published.shadow):
            console.print(f"  {line}", highlight=False, markup=False)
    try:
        _plot(plot, sent, history, t0_wall, out)
    except (OSError, ValueError, RuntimeError) as exc:
        # Raised after the service is stopped, by the caller: the results are printed already.
        return exc
    console.print(f"plot written to {plot}")
    return None


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        phase_s: float = typer.Option(
            10.0, min=1.0, help="Seconds of each of the three load phases."
        ),
        plot: Path = typer.Option(Path("demo.png"), help="Where to write the PNG plot."),
        policy: str = typer.Option(
            DEFAULT_POLICY,
            help="The acting allocator: switch_aware or learned (the other one shadows it).",
        ),
    ) -> None:
        """Run the live service with the demo models under a shifting load, and report."""
        check_plot("--plot", plot)
        import ray

        from scheduler.service.runner import start_service

        console = Console()
        try:
            config = demo_config(policy)
        except ValueError as exc:
            raise fail(f"--policy: {exc}") from None
        started = time.monotonic()
        console.print("[bold]bilevel demo[/]: starting Redis, Ray and the service ...")
        # A local Ray of our own (its temp dir under /tmp: socket paths have a length cap), with
        # the actors' log lines kept in Ray's log files instead of this terminal.
        ray.init(
            _temp_dir=tempfile.mkdtemp(prefix="bldemo", dir="/tmp"),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            namespace="bilevel-demo",
        )
        try:
            with start_service(config) as service:
                console.print(
                    f"service up in {time.monotonic() - started:.1f} s (Redis at {service.redis_url})"
                )
                if service.metrics_url is not None:
                    console.print(
                        f"dashboard: {service.metrics_url}/  metrics: {service.metrics_url}/metrics",
                        highlight=False,
                    )
                plot_error = asyncio.run(_drive(service.redis_url, config, phase_s, plot, console))
        except BilevelError as exc:
            console.print(f"[red]demo failed:[/] {exc}")
            raise typer.Exit(1) from None
        finally:
            ray.shutdown()
        console.print(
            f"done in {time.monotonic() - started:.1f} s; everything it started is stopped"
        )
        if plot_error is not None:
            raise write_failed("--plot", plot, plot_error)
