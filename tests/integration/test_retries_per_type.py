"""Retries per job type, applied by a real ModelWorker (without Ray) against the real Redis: a
handler's max_retries, backoff and retryable exceptions, under a job's own max_retries, above
Settings.max_retries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from scheduler.client import AsyncClient
from scheduler.config import WorkerConfig
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.errors import JobFailed
from scheduler.models import JobStatus
from scheduler.settings import Settings
from scheduler.store import Store
from tests.conftest import ManualClock, Runner, make_settings
from tests.integration.helpers import new_job, submit_to_queue
from workers.model_worker import ModelWorker
from workers.registry import HandlerRegistry, PayloadError

SETTINGS_MAX_RETRIES = 2
REGISTRY = HandlerRegistry()


def _no_model() -> None:
    return None


@REGISTRY.handler("flaky", loader=_no_model, max_retries=4)
def flaky(model: None, payload: Any) -> Any:
    raise RuntimeError(f"flaky on {payload!r}")


@REGISTRY.handler("picky", loader=_no_model, max_retries=5, retryable=(TimeoutError,))
def picky(model: None, payload: Any) -> Any:
    if payload == "payload":
        raise PayloadError("never retried")
    if payload == "slow":
        raise TimeoutError("upstream too slow")  # worth retrying
    raise ValueError("bad input")  # not listed: dead at once


@REGISTRY.handler("patient", loader=_no_model, max_retries=1, retry_backoff_s=60.0)
def patient(model: None, payload: Any) -> Any:
    raise RuntimeError("later, please")


@REGISTRY.handler("plain", loader=_no_model)
def plain(model: None, payload: Any) -> Any:
    raise RuntimeError("no policy of its own")


@pytest.fixture
def settings(redis_server: EmbeddedRedis, namespace: str) -> Settings:
    return make_settings(
        redis_server, namespace, max_retries=SETTINGS_MAX_RETRIES, retry_backoff_s=0.0
    )


@asynccontextmanager
async def serving(store: Store) -> AsyncIterator[None]:
    """A worker on queue q for every job type above, and the controller's promotion of due
    retries."""
    worker = ModelWorker(store, config=WorkerConfig(heartbeat_s=0.3), name="w", registry=REGISTRY)
    await worker.assign("q", REGISTRY.job_types())

    async def promote() -> None:
        while True:
            await store.promote_due()
            await asyncio.sleep(0.01)

    task = asyncio.create_task(promote())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.stop(timeout_s=1.0)


async def runs_until_dead(store: Store, settings: Settings, job_type: str, **options: Any) -> int:
    """Submit one job, wait for it to die; how many attempts it had."""
    [job_id] = await submit_to_queue(store, "q", new_job(job_type, options.pop("payload", "x"),
                                                         **options))  # fmt: skip
    async with AsyncClient(settings=settings) as client:
        with pytest.raises(JobFailed):
            await client.handle(job_id).result(timeout=20)
        job = await client.get(job_id)
    assert job.status is JobStatus.DEAD
    return job.attempts


class TestPrecedence:
    def test_the_handlers_max_retries_applies_when_the_job_sets_none(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """flaky (max_retries=4) runs 5 times, not 1 + Settings.max_retries; its budget becomes
        the record's."""

        async def body() -> None:
            async with serving(store):
                assert await runs_until_dead(store, settings, "flaky") == 5

        run(body())

    def test_the_jobs_own_max_retries_wins(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """A job that says max_retries=1 (or 0) keeps it whatever its handler says."""

        async def body() -> None:
            async with serving(store):
                assert await runs_until_dead(store, settings, "flaky", max_retries=1) == 2
                assert await runs_until_dead(store, settings, "flaky", max_retries=0) == 1

        run(body())

    def test_settings_max_retries_without_a_handler_default(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """A handler without a policy leaves the submitter's Settings.max_retries."""

        async def body() -> None:
            async with serving(store):
                runs = await runs_until_dead(store, settings, "plain")
                assert runs == 1 + SETTINGS_MAX_RETRIES

        run(body())


class TestRetryable:
    def test_only_the_listed_exceptions_are_retried(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """picky retries TimeoutError (6 runs), not ValueError, and never PayloadError."""

        async def body() -> None:
            async with serving(store):
                assert await runs_until_dead(store, settings, "picky", payload="slow") == 6
                assert await runs_until_dead(store, settings, "picky", payload="bad") == 1
                assert await runs_until_dead(store, settings, "picky", payload="payload") == 1

        run(body())


class TestBackoff:
    def test_the_handlers_backoff_delays_the_retry(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """patient's retry is due 60 s after its failure (no jitter here), not at once as
        Settings say; once the clock passes it, it runs again and dies (max_retries=1)."""

        async def body() -> None:
            [job_id] = await submit_to_queue(store, "q", new_job("patient", None))
            async with serving(store), AsyncClient(settings=settings) as client:
                for _ in range(2000):
                    if (await store.get(job_id)).status is JobStatus.RETRYING:
                        break
                    await asyncio.sleep(0.005)
                due = await store.redis.zscore(store.keys.delayed, job_id)
                assert due == store.now_ms() + 60_000
                clock.advance(59)
                await asyncio.sleep(0.1)
                assert (await store.get(job_id)).status is JobStatus.RETRYING
                clock.advance(1)
                with pytest.raises(JobFailed):
                    await client.handle(job_id).result(timeout=20)
                assert (await client.get(job_id)).attempts == 2

        run(body())
