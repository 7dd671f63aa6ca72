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
from scheduler.commands._outputs import check_plot, write_failed
from scheduler.config import ServiceConfig
from scheduler.errors import BilevelError
from scheduler.keys import Keys

QUEUE_OF = {"embed": "embeddings", "classify": "classifier", "generate": "generator"}

# Jobs per second of each type in each phase: the load moves from one model to another, so the
# controller has to move workers (and pay the model loads) to keep up.
PHASES: tuple[tuple[str, dict[str, float]], ...] = (
    ("embeddings burst", {"embed": 40.0, "classify": 4.0, "generate": 0.5}),
    ("generation burst", {"embed": 4.0, "classify": 2.0, "generate": 4.0}),
    ("classification burst", {"embed": 4.0, "classify": 40.0, "generate": 0.5}),
)
SLICE_S = 0.05


def demo_config() -> ServiceConfig:
    """The demo service: three queues on a budget of three workers, switch-aware allocation."""
    return ServiceConfig.from_mapping(
        {
            "store": {"namespace": "demo", "lease_s": 10},
            # A free port: a demo must not fail because a service on this machine holds 9470.
            "metrics": {"port": 0},
            "handlers": ["workers.demo_models"],
            "queues": [
                {"name": q, "job_types": [t], "max_workers": 3, "slo_s": slo}
                for (t, q), slo in zip(QUEUE_OF.items(), (0.5, 1.0, 5.0), strict=True)
            ],
            "routing": {"policy": "rule"},
            "allocation": {
                "policy": "switch_aware",
                "tick_s": 1.0,
                "budget": 3,
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
    for job in jobs:
        if job is None or job.finished_s is None or job.status != "succeeded":
            continue
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
        raw = await client.store.redis.lrange(
            Keys(config.store.namespace).allocation_history, 0, -1
        )
        history = [json.loads(e) for e in raw]
    _print_results(console, out, sent)
    _print_allocation(console, history, t0_wall)
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
    ) -> None:
        """Run the live service with the demo models under a shifting load, and report."""
        check_plot("--plot", plot)
        import ray

        from scheduler.service.runner import start_service

        console = Console()
        config = demo_config()
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
