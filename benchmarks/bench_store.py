"""Store-level no-op job cycle: submit → enqueue → lease → complete → read result.

Prints one JSON object. Run: `python -m benchmarks.bench_store` (or `make bench`).
Uses a private embedded Redis, so the figures include a real server on the same machine.
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import time
from typing import Any

from scheduler.client import AsyncClient
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.models import build_spec, new_job_id
from scheduler.settings import Settings
from scheduler.store import NewJob, Store

QUEUE = "bench"
# Cycles in flight at once in one client process (one connection each).
BATCH_CONCURRENCY = 4
SINGLE_CONCURRENCY = 16


def _jobs(n: int) -> list[NewJob]:
    out = []
    for i in range(n):
        spec, text = build_spec("noop", i, {}, max_payload_bytes=1 << 20)
        out.append(NewJob(new_job_id(), spec, text))
    return out


async def _cycle(store: Store, batch: int, queue: str = QUEUE) -> None:
    """One full cycle for `batch` jobs through `queue`, one round trip per step."""
    submitted = await store.submit(_jobs(batch))
    ids = [job_id for _, job_id in submitted]
    await store.enqueue([(job_id, queue) for job_id in ids])
    leases = await store.lease(queue, batch)
    await store.complete_encoded([(lease.job_id, lease.token, "null") for lease in leases])
    outcomes = await store.outcomes(ids)
    assert all(o.status == "succeeded" for o in outcomes)


async def _throughput(store: Store, batch: int, total: int, concurrency: int) -> float:
    """Jobs/s with `concurrency` cycles in flight at once (as many clients and workers would be),
    so the client's CPU work overlaps the server's."""
    rounds = total // (batch * concurrency)

    async def loop(queue: str) -> None:
        for _ in range(rounds):
            await _cycle(store, batch, queue)

    queues = [f"{QUEUE}{i}" for i in range(concurrency)]
    await asyncio.gather(*(_cycle(store, batch, q) for q in queues))  # warm up
    started = time.perf_counter()
    await asyncio.gather(*(loop(q) for q in queues))
    return rounds * batch * concurrency / (time.perf_counter() - started)


async def _wake_latency(client: AsyncClient, samples: int) -> dict[str, float]:
    """ms from a worker's complete call to the waiting result() returning."""
    store = client.store
    waits: list[float] = []
    for _ in range(samples):
        handle = await client.submit("noop", None)
        await store.enqueue([(handle.id, QUEUE)])
        [lease] = await store.lease(QUEUE)
        waiter = asyncio.create_task(handle.result(timeout=10))
        await asyncio.sleep(0.002)
        # From the start of the completing call: includes its round trip, so it bounds how long
        # after a worker reports a result the waiting client has it.
        done_at = time.perf_counter()
        await store.complete_encoded([(lease.job_id, lease.token, "null")])
        await waiter
        waits.append((time.perf_counter() - done_at) * 1000)
    waits.sort()
    return {
        "p50_ms": round(statistics.median(waits), 3),
        "p99_ms": round(waits[int(len(waits) * 0.99) - 1], 3),
    }


async def main() -> dict[str, Any]:
    with EmbeddedRedis() as server:
        settings = Settings.from_url(server.url, namespace="bench", require_service=False)
        async with AsyncClient(settings=settings) as client:
            store = client.store
            batched = await _throughput(store, 100, 60_000, BATCH_CONCURRENCY)
            single = await _throughput(store, 1, 8_000, SINGLE_CONCURRENCY)
            wake = await _wake_latency(client, 300)
            info = await store.redis.info("server")
    return {
        "benchmark": "store_noop_cycle",
        "cycle": "submit -> enqueue -> lease -> complete -> read result",
        "batched_100_jobs_per_s": round(batched),
        "batched_concurrency": BATCH_CONCURRENCY,
        "single_jobs_per_s": round(single),
        "single_concurrency": SINGLE_CONCURRENCY,
        "result_wake": wake,
        "redis_version": info["redis_version"],
        "python": platform.python_version(),
        "targets": {"batched_100_jobs_per_s": 30_000, "single_jobs_per_s": 2_500},
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
