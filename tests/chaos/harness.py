"""What every chaos scenario shares: the service under test, a tracked load, exact counts, a report.

A scenario starts the real service (router, controller and ModelWorker actors on the session's local
Ray) on a Redis it owns or shares, runs a load of jobs whose handler records each execution
(tests/chaos/handlers.py), does its damage, and then counts, per job: acknowledged by submit,
finished with its own result, and how many times it ran. Nothing is sampled: every acknowledged job
must finish, and the store's completion counters must equal the number of jobs (a second completion
of a job is refused by the store, so it would show as a missing count, never as an extra one).

Each scenario adds one JSON object to the chaos report: the file named by BILEVEL_CHAOS_REPORT, else
chaos-report.json in the pytest temp dir; `python -m tests.chaos.report FILE` prints it as a table.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.client import AsyncClient, AsyncJobHandle, JobRequest
from scheduler.config import ServiceConfig
from scheduler.errors import BilevelError
from scheduler.settings import Settings

JOB_TYPES = ("chaos.a", "chaos.b")
QUEUES = ({"name": "qa", "job_types": ["chaos.a"]}, {"name": "qb", "job_types": ["chaos.b"]})


def chaos_config(
    settings: Settings, *, redis_url: str | None = None, **overrides: Any
) -> ServiceConfig:
    """Two queues of recorded jobs. Short leases and heartbeats, so the jobs of a killed worker
    run again within seconds; a fast tick, so the controller notices dead workers at once."""
    store = {
        **settings.model_dump(),
        "redis_url": redis_url or settings.url(),
        "lease_s": 2.0,
        **overrides.pop("store", {}),
    }
    raw: dict[str, Any] = {
        "store": store,
        "handlers": ["tests.chaos.handlers"],
        "queues": list(QUEUES),
        "allocation": {"budget": 3, "tick_s": 0.3, "policy": "proportional", "fallback": "static"},
        "worker": {"max_batch": 8, "heartbeat_s": 0.5, "num_cpus": 0.25},
        **overrides,
    }
    return ServiceConfig.from_mapping(raw)


@dataclass
class Tracked:
    """A load's bookkeeping: what was acknowledged, what finished, what failed to submit."""

    log: Path
    handles: dict[str, AsyncJobHandle] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    submit_failures: list[str] = field(default_factory=list)
    submit_s: list[tuple[float, float]] = field(default_factory=list)
    # Waiters started as the jobs were acknowledged (submit(..., wait_s=...)).
    waiters: list[asyncio.Task[None]] = field(default_factory=list)
    # time.monotonic() at which each job's waiter got its result.
    finished_at: dict[str, float] = field(default_factory=dict)

    def requests(self, start: int, n: int, work_s: float) -> list[tuple[str, JobRequest]]:
        out = []
        for i in range(start, start + n):
            key = f"j{i}"
            payload = {"key": key, "log": str(self.log), "work_s": work_s}
            out.append((key, JobRequest(JOB_TYPES[i % len(JOB_TYPES)], payload, max_retries=20)))
        return out

    async def submit(
        self, client: AsyncClient, n: int, *, batch: int = 50, rate_per_s: float | None = None,
        work_s: float = 0.01, wait_s: float | None = None,
    ) -> None:  # fmt: skip
        """Submit `n` jobs in batches (at `rate_per_s` jobs per second, or as fast as possible),
        recording every acknowledgement and every submit that raised. With `wait_s`, a waiter per
        job starts as soon as it is acknowledged (so waiters are blocked when faults strike)."""
        started = time.monotonic()
        for first in range(0, n, batch):
            pairs = self.requests(
                len(self.handles) + len(self.submit_failures), min(batch, n - first), work_s
            )
            t0 = time.monotonic()
            try:
                handles = await client.submit_many([r for _, r in pairs])
            except BilevelError as exc:
                self.submit_failures += [f"{key}: {exc}" for key, _ in pairs]
            else:
                acked = {key: h for (key, _), h in zip(pairs, handles, strict=True)}
                self.handles.update(acked)
                if wait_s is not None:
                    self.waiters += [
                        asyncio.create_task(self._wait_one(k, h, wait_s)) for k, h in acked.items()
                    ]
            self.submit_s.append((t0, time.monotonic() - t0))
            if rate_per_s is not None:
                due = started + (first + batch) / rate_per_s
                await asyncio.sleep(max(0.0, due - time.monotonic()))

    async def _wait_one(self, key: str, handle: AsyncJobHandle, timeout_s: float) -> None:
        try:
            self.results[key] = await handle.result(timeout=timeout_s)
            self.finished_at[key] = time.monotonic()
        except BilevelError as exc:
            self.errors[key] = f"{type(exc).__name__}: {exc}"

    async def wait_all(self, timeout_s: float) -> None:
        """Every acknowledged job's result (or error), each with its own waiter, as clients would:
        the waiters started at submit, or else one per job now."""
        if not self.waiters:
            self.waiters = [
                asyncio.create_task(self._wait_one(k, h, timeout_s))
                for k, h in self.handles.items()
            ]
        await asyncio.gather(*self.waiters)

    def throughput_per_s(self, start: float, end: float) -> float:
        """Results returned per second in [start, end) (monotonic times)."""
        done = sum(1 for t in self.finished_at.values() if start <= t < end)
        return done / (end - start) if end > start else 0.0

    def executions(self) -> Counter[str]:
        if not self.log.exists():
            return Counter()
        return Counter(line.split()[0] for line in self.log.read_text().splitlines() if line)

    def summary(self) -> dict[str, Any]:
        runs = self.executions()
        acked = set(self.handles)
        finished = {k for k, r in self.results.items() if r == {"key": k}}
        return {
            "acknowledged": len(acked),
            "submit_failures": len(self.submit_failures),
            "finished": len(finished),
            "lost": len(acked - finished - set(self.errors)),
            "failed": len(self.errors),
            "never_ran": len([k for k in finished if runs[k] == 0]),
            "ran_more_than_once": sum(1 for k in acked if runs[k] > 1),
            "executions": sum(runs[k] for k in acked),
            "first_errors": sorted(set(self.errors.values()))[:3],
            "first_submit_failures": self.submit_failures[:2],
        }


async def completed_totals(client: AsyncClient) -> int:
    stats = await client.stats([q["name"] for q in QUEUES])
    return sum(q.completed_total for q in stats.queues.values())


def report(scenario: str, figures: dict[str, Any], tmp_root: Path) -> dict[str, Any]:
    """Append one scenario's figures to the chaos report (see the module notes) and return them."""
    path = Path(os.environ.get("BILEVEL_CHAOS_REPORT") or tmp_root / "chaos-report.json")
    entries: list[dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    entry = {
        "scenario": scenario,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **figures,
    }
    entries = [e for e in entries if e.get("scenario") != scenario] + [entry]
    path.write_text(json.dumps(entries, indent=2) + "\n")
    print(json.dumps(entry))
    return entry


def assert_every_job_accounted(summary: dict[str, Any], completed: int, *, n: int) -> None:
    """The exact counts every scenario must end with."""
    assert summary["submit_failures"] == 0, summary
    assert summary["acknowledged"] == n, summary
    assert summary["lost"] == 0, summary
    assert summary["failed"] == 0, summary
    assert summary["finished"] == n, summary
    assert summary["never_ran"] == 0, summary
    # One completion per job: a second one would be refused by the store, not counted.
    assert completed == n, (completed, summary)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


__all__ = [
    "QUEUES",
    "Tracked",
    "assert_every_job_accounted",
    "chaos_config",
    "completed_totals",
    "percentile",
    "report",
]
