"""`bilevel demo`: the job store end to end on a private Redis, with in-process workers.

It submits a mixed load, routes it with level 1's rule router, leases and completes jobs from
worker tasks (one per queue), shows a retry ending in the dead-letter set, a cancellation and a
delayed job, and prints per-queue figures. The live-service demo on Ray supersedes this one.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from policies.routing import RuleRouter
from policies.views import JobView, QueueView, Rejection
from scheduler.client import AsyncClient, JobRequest
from scheduler.errors import JobCancelled, JobFailed
from scheduler.models import ErrorInfo
from scheduler.settings import Settings
from scheduler.store import Lease, RouteInfo, Store

QUEUES = {
    "embeddings": frozenset({"embed"}),
    "classifier": frozenset({"classify"}),
    "generator": frozenset({"generate"}),
}


def _embed(payload: Any) -> Any:
    digest = hashlib.sha256(str(payload["text"]).encode()).digest()
    return [round(b / 255, 3) for b in digest[:8]]


def _classify(payload: Any) -> Any:
    scores = np.asarray(payload["features"], dtype=float)
    return {"label": ["cat", "dog", "bird"][int(np.argmax(scores)) % 3]}


def _generate(payload: Any) -> Any:
    if payload.get("poison"):
        raise ValueError("this prompt always fails")
    return " ".join(f"tok{i}" for i in range(int(payload["tokens"])))


HANDLERS = {"embed": _embed, "classify": _classify, "generate": _generate}


@dataclass
class QueueFigures:
    completed: int = 0
    failed_attempts: int = 0
    latencies_ms: list[float] = field(default_factory=list)


async def _route(store: Store, router: RuleRouter, rng: np.random.Generator) -> int:
    """Level 1: route what is in the ingress; returns how many jobs it routed or rejected."""
    pending: list[RouteInfo] = await store.pending(500)
    if not pending:
        return 0
    queues = [QueueView(name=n, job_types=t) for n, t in QUEUES.items()]
    jobs = [JobView(p.id, p.job_type, p.created_s, tags=frozenset(p.tags)) for p in pending]
    decisions = router.route_batch(jobs, queues, rng)
    routed = [(j.job_id, d) for j, d in zip(jobs, decisions, strict=True) if isinstance(d, str)]
    rejected = [
        (j.job_id, ErrorInfo(type="Unroutable", message=d.reason))
        for j, d in zip(jobs, decisions, strict=True)
        if isinstance(d, Rejection)
    ]
    await store.enqueue(routed)
    await store.dead_letter(rejected)
    return len(pending)


async def _worker(store: Store, queue: str, figures: QueueFigures, stop: asyncio.Event) -> None:
    """Lease, run and complete jobs of one queue until told to stop; blocks while idle."""
    while not stop.is_set():
        leases: list[Lease] = await store.lease(queue, 16)
        if not leases:
            await store.wait_for_queue(queue, 0.2)
            continue
        done: list[tuple[str, int, Any]] = []
        for lease in leases:
            try:
                done.append(
                    (lease.job_id, lease.token, HANDLERS[lease.spec.job_type](lease.spec.payload))
                )
            except Exception as exc:
                figures.failed_attempts += 1
                await store.fail(
                    lease.job_id, lease.token, ErrorInfo(type=type(exc).__name__, message=str(exc))
                )
        await store.complete(done)
        figures.completed += len(done)


async def run_demo(settings: Settings, n_jobs: int, console: Console) -> None:
    rng = np.random.default_rng(0)
    # Short retry backoff, so the failing job reaches the dead-letter set within the demo.
    settings = settings.model_copy(update={"retry_backoff_s": 0.05})
    async with AsyncClient(settings=settings) as client:
        store = client.store
        where = "embedded Redis" if client.embedded else "the configured Redis"
        console.print(f"[bold]bilevel store demo[/] on {where}")
        requests = []
        for i in range(n_jobs):
            kind = rng.choice(["embed", "classify", "generate"], p=[0.5, 0.3, 0.2])
            payload: Any = {
                "embed": {"text": f"document {i}"},
                "classify": {"features": rng.random(3).round(3).tolist()},
                "generate": {"tokens": int(rng.integers(1, 6))},
            }[str(kind)]
            requests.append(JobRequest(str(kind), payload, priority=int(rng.integers(0, 3))))
        requests += [
            JobRequest("generate", {"poison": True}, max_retries=2),
            JobRequest("translate", {"text": "no queue takes this"}),
            JobRequest("embed", {"text": "delayed"}, delay_s=0.5),
            JobRequest("embed", {"text": "cancel me"}, delay_s=60),
        ]
        started = time.perf_counter()
        handles = await client.submit_many(requests)
        await handles[-1].cancel()
        figures = {q: QueueFigures() for q in QUEUES}
        stop = asyncio.Event()
        workers = [asyncio.create_task(_worker(store, q, figures[q], stop)) for q in QUEUES]
        router = RuleRouter()

        async def control() -> None:
            while not stop.is_set():
                await _route(store, router, rng)
                await store.promote_due()
                await store.wait_for_ingress(0.05)

        controller = asyncio.create_task(control())
        outcomes: dict[str, int] = {}
        for handle, request in zip(handles, requests, strict=True):
            try:
                await handle.result(timeout=30)
                outcome = "succeeded"
                queue = next(q for q, t in QUEUES.items() if request.job_type in t)
                info = await handle.info()
                if info.finished_s is not None:
                    figures[queue].latencies_ms.append((info.finished_s - info.created_s) * 1000)
            except JobFailed as exc:
                outcome = f"failed ({exc.error_type})"
            except JobCancelled:
                outcome = "cancelled"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        elapsed = time.perf_counter() - started
        stop.set()
        await asyncio.gather(controller, *workers)
        stats = await store.stats(QUEUES)
        _print(console, figures, stats.queues, outcomes, len(requests), elapsed)


def _print(
    console: Console,
    figures: dict[str, QueueFigures],
    stats: dict[str, Any],
    outcomes: dict[str, int],
    total: int,
    elapsed_s: float,
) -> None:
    table = Table(title="per queue")
    for column in ("queue", "completed", "failed attempts", "p50 ms", "max ms", "dead"):
        table.add_column(column, justify="right" if column != "queue" else "left")
    for name, fig in figures.items():
        lat = fig.latencies_ms
        table.add_row(
            name,
            str(fig.completed),
            str(fig.failed_attempts),
            f"{statistics.median(lat):.1f}" if lat else "-",
            f"{max(lat):.1f}" if lat else "-",
            str(stats[name].dead if name in stats else 0),
        )
    console.print(table)
    summary = ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items()))
    console.print(f"{total} jobs in {elapsed_s:.2f} s: {summary}")


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        jobs: int = typer.Option(300, min=1, help="How many regular jobs to submit."),
    ) -> None:
        """Run the job store end to end on a private Redis and print what happened."""
        asyncio.run(run_demo(Settings(), jobs, Console()))
