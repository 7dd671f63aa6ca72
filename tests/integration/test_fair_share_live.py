"""Tenant fair share live: real ModelWorkers serving a sleeping handler from a real Redis, a
heavy tenant submitting ten times a light tenant's load in bursts."""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from policies.fairshare import TenantShare
from scheduler.admission import AdmissionConfig, publish, published_fields
from scheduler.config import WorkerConfig
from scheduler.connection import client_from_url
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.models import build_spec, new_job_id
from scheduler.settings import Settings
from scheduler.store import NewJob, Store
from tests.conftest import Runner, make_settings
from tests.integration import handlers_for_tests  # noqa: F401  (registers test.sleep)
from workers.model_worker import ModelWorker

QUEUE = "q"
WORKERS = 16
SERVICE_S = 0.2
# Light: one job every 0.5 s (2/s); heavy: a burst of 20 jobs every second (20/s). With 16 workers
# of 0.2 s jobs (80/s) that is 28% load, but each burst takes every worker at once.
LIGHT_JOBS = 40
LIGHT_GAP_S = 0.5
HEAVY_BURST = 20
HEAVY_EVERY_S = 1.0


def _job(tenant: str) -> NewJob:
    options = {"tenant": tenant}
    spec, text = build_spec("test.sleep", {"seconds": SERVICE_S}, options, max_payload_bytes=1024)
    return NewJob(new_job_id(), spec, text)


@asynccontextmanager
async def _service(store: Store) -> AsyncIterator[None]:
    """WORKERS model workers on the queue, and a router loop sending the ingress to it."""

    async def route() -> None:
        while True:
            await store.wait_for_ingress(0.05)
            pending = await store.pending(500)
            await store.enqueue([(p.id, QUEUE) for p in pending])

    workers = [
        ModelWorker(store, config=WorkerConfig(max_batch=1, heartbeat_s=1.0), name=f"w{i}")
        for i in range(WORKERS)
    ]
    for w in workers:
        await w.assign(QUEUE, ["test.sleep"])
    router = asyncio.create_task(route())
    try:
        yield
    finally:
        router.cancel()
        await asyncio.gather(router, return_exceptions=True)
        await asyncio.gather(*(w.stop(timeout_s=5.0) for w in workers))


async def _light_mean_jct_s(store: Store, *, heavy: bool, seed: int) -> float:
    rng = random.Random(seed)
    light_ids: list[str] = []
    all_ids: list[str] = []

    async def light() -> None:
        for _ in range(LIGHT_JOBS):
            [(_, job_id)] = await store.submit([_job("light")])
            light_ids.append(job_id)
            await asyncio.sleep(LIGHT_GAP_S * rng.uniform(0.5, 1.5))

    async def heavy_bursts() -> None:
        for _ in range(round(LIGHT_JOBS * LIGHT_GAP_S / HEAVY_EVERY_S)):
            submitted = await store.submit([_job("heavy") for _ in range(HEAVY_BURST)])
            all_ids.extend(job_id for _, job_id in submitted)
            await asyncio.sleep(HEAVY_EVERY_S * rng.uniform(0.5, 1.5))

    async with _service(store):
        await asyncio.gather(light(), *([heavy_bursts()] if heavy else []))
        ids = light_ids + all_ids
        outcomes = await store.wait_finished_many(ids, 120.0)
        assert all(o.status == "succeeded" for o in outcomes)
    jobs = [await store.get(job_id) for job_id in light_ids]
    return statistics.mean(j.finished_s - j.created_s for j in jobs if j.finished_s is not None)


@pytest.mark.slow
def test_a_heavy_tenant_raises_the_light_ones_jct_by_under_20_percent(
    redis_server: EmbeddedRedis, namespace: str, run: Runner
) -> None:
    """With fair share, the light tenant's mean JCT beside 10x its load in bursts from a heavy
    tenant stays within 20% of its solo run."""
    settings: Settings = make_settings(redis_server, namespace, lease_s=10.0)
    redis = client_from_url(redis_server.url)
    store = Store(redis, settings)
    fields = published_fields(AdmissionConfig(), {"*": TenantShare()}, [(QUEUE, ("test.sleep",))])
    try:
        run(publish(store.redis, store.keys, fields))
        solo = run(_light_mean_jct_s(store, heavy=False, seed=1))
        shared = run(_light_mean_jct_s(store, heavy=True, seed=1))
    finally:
        run(store.close())
    assert shared / solo < 1.2, (solo, shared)
