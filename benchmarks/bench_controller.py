"""The live controller's tick at 256 queues under load: how long level 2 takes per decision.

Prints one JSON object. Run: `python -m benchmarks.bench_controller [--queues N] [--load-s S]`
(or `make bench`). Starts its own embedded Redis and local Ray and stops both. The service has
256 queues of no-op jobs (each queue takes the jobs tagged with its name, so the rule router
spreads them), a few workers that the proportional allocator moves between the queues, and a
client that submits jobs across all queues at a steady rate meanwhile. The controller's
`last_tick_s` (its status, read several times per tick) gives one sample per full tick: median,
p90 and max in ms, against issue 19's target.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import statistics
import time
from typing import Any

from benchmarks.common import REPO_ROOT, bench_ray, commit
from benchmarks.targets import target
from scheduler.client import AsyncClient, JobRequest
from scheduler.config import ServiceConfig
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.logs import configure_logging

QUEUES = 256
WORKERS = 4
TICK_S = 1.0
# Jobs per submission and submissions per second: about 1,300 jobs/s across the queues, more than
# the few workers serve, so the queues stay loaded and the allocator keeps moving workers.
BATCH = 64
SUBMITS_PER_S = 20
LOAD_S = 45.0
# Before sampling: the workers start and the first ticks see the load arrive.
WARMUP_S = 5.0
# How often the controller's status is read: several times per tick, so no full tick is missed
# (each new tick count is one sample).
SAMPLE_EVERY_S = 0.2
TICK_MEDIAN_MS = 20.0


def queue_name(i: int) -> str:
    return f"q{i:03d}"


def bench_config(redis_url: str, queues: int) -> ServiceConfig:
    return ServiceConfig.from_mapping(
        {
            "store": {"namespace": "bench-controller", "redis_url": redis_url},
            "handlers": ["benchmarks.noop_handlers"],
            "queues": [
                {"name": queue_name(i), "job_types": ["noop"], "required_tags": [queue_name(i)]}
                for i in range(queues)
            ],
            "routing": {"policy": "rule", "batch_size": 1000},
            "allocation": {"policy": "proportional", "budget": WORKERS, "tick_s": TICK_S},
            "worker": {"max_batch": 256, "num_cpus": 0.25},
        },
        source="bench_controller",
    )


async def _load(
    client: AsyncClient, queues: int, stop: asyncio.Event, counts: dict[str, int]
) -> None:
    """Submits BATCH jobs to random queues SUBMITS_PER_S times a second until `stop`."""
    rng = random.Random(19)
    period_s = 1.0 / SUBMITS_PER_S
    next_s = time.perf_counter()
    while not stop.is_set():
        requests = [
            JobRequest("noop", None, tags=(queue_name(rng.randrange(queues)),))
            for _ in range(BATCH)
        ]
        handles = await client.submit_many(requests)
        counts["submitted"] += len(handles)
        counts["rejected"] += sum(h.rejected is not None for h in handles)
        next_s += period_s
        await asyncio.sleep(max(0.0, next_s - time.perf_counter()))


async def _sample_ticks(actor: Any, until_s: float) -> tuple[list[float], int]:
    """One last_tick_s per full tick seen before `until_s`, and the ticks counted meanwhile."""
    samples: list[float] = []
    first: int | None = None
    seen: int | None = None
    while time.perf_counter() < until_s:
        status = (await actor.status.remote())["controller"]
        ticks = int(status.get("ticks", 0))
        if first is None:
            first = seen = ticks
        elif ticks != seen:
            seen = ticks
            samples.append(float(status["last_tick_s"]))
        await asyncio.sleep(SAMPLE_EVERY_S)
    return samples, (seen or 0) - (first or 0)


def _ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000, 1)


def _controller(redis_url: str, queues: int, load_s: float) -> dict[str, Any]:
    from scheduler.service.runner import start_service

    counts = {"submitted": 0, "rejected": 0}
    with bench_ray(), start_service(bench_config(redis_url, queues)) as service:

        async def drive() -> tuple[list[float], int]:
            async with AsyncClient(service.redis_url, settings=service.config.store) as c:
                stop = asyncio.Event()
                load = asyncio.create_task(_load(c, queues, stop, counts))
                try:
                    await asyncio.sleep(WARMUP_S)
                    until_s = time.perf_counter() + load_s
                    return await _sample_ticks(service.actor, until_s)
                finally:
                    stop.set()
                    await load

        samples, ticks = asyncio.run(drive())
    if not samples:
        raise RuntimeError("the controller completed no full tick while the load ran")
    return {
        "queues": queues,
        "workers": WORKERS,
        "tick_s": TICK_S,
        "load_s": load_s,
        "jobs_submitted": counts["submitted"],
        "jobs_rejected": counts["rejected"],
        "ticks": ticks,
        "samples": len(samples),
        "tick_ms": {
            "median": round(statistics.median(samples) * 1000, 1),
            "p90": _ms(samples, 0.9),
            "max": round(max(samples) * 1000, 1),
        },
    }


def main(queues: int = QUEUES, load_s: float = LOAD_S) -> dict[str, Any]:
    os.environ.setdefault("PYTHONPATH", str(REPO_ROOT))
    with EmbeddedRedis() as server:
        before = os.getloadavg()[0]
        result = _controller(server.url, queues, load_s)
        after = os.getloadavg()[0]
    return {
        "benchmark": "controller_tick",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "cores": os.cpu_count(),
        "setup": f"{WORKERS} ModelWorker actors, rule router, proportional allocation",
        "load_average_1m": [round(before, 2), round(after, 2)],
        "controller": result,
        "targets": {
            f"controller_tick_median_ms_{queues}_queues": target(
                TICK_MEDIAN_MS, result["tick_ms"]["median"]
            ),
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queues", type=int, default=QUEUES, help="queues of the service")
    parser.add_argument("--load-s", type=float, default=LOAD_S, help="seconds of load sampled")
    cli = parser.parse_args()
    if cli.queues < 1 or cli.load_s <= 0:
        parser.error("--queues must be at least 1 and --load-s positive")
    # The service's log lines go to stderr, warnings only: stdout is the one JSON object.
    configure_logging(level="warning")
    print(json.dumps(main(cli.queues, cli.load_s)))
