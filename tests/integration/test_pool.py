"""WorkerPool with real Ray actors on a local Ray and a real Redis: placement, moves, failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import ray
from ray.exceptions import RayActorError

from scheduler.config import ServiceConfig
from scheduler.connection import client_from_url
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.models import JobStatus
from scheduler.settings import Settings
from scheduler.store import Store
from tests.conftest import Runner, make_settings
from tests.integration.helpers import new_job, submit_to_queue
from workers.pool import WorkerPool

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture
def settings(redis_server: EmbeddedRedis, namespace: str) -> Settings:
    return make_settings(redis_server, namespace, lease_s=2.0, retry_backoff_s=0.0)


@pytest.fixture
def config(settings: Settings) -> ServiceConfig:
    return ServiceConfig.from_mapping(
        {
            "store": settings,
            "handlers": ["workers.demo_models", "tests.integration.handlers_for_tests"],
            "queues": [
                {"name": "sleepy", "job_types": ["test.sleep"]},
                {"name": "e", "job_types": ["embed"]},
                {"name": "c", "job_types": ["classify"]},
            ],
            "allocation": {"budget": 4},
            "worker": {"heartbeat_s": 0.3, "max_batch": 8},
        }
    )


@pytest.fixture
def live_store(settings: Settings, run: Runner) -> Iterator[Store]:
    """A store on the wall clock: the actors' leases are on it too."""
    redis = client_from_url(settings.url() or "")
    store = Store(redis, settings)
    yield store
    run(store.close())  # ends its result waiter's blocked read before the connection goes
    run(redis.aclose())


@asynccontextmanager
async def pool_of(config: ServiceConfig, namespace: str) -> AsyncIterator[WorkerPool]:
    pool = WorkerPool(config, name_prefix=f"{namespace}-", drain_timeout_s=2.0)
    try:
        yield pool
    finally:
        await pool.shutdown()


async def wait_status(store: Store, job_id: str, status: JobStatus, timeout_s: float) -> None:
    """Wait for a job to reach a state that signals nobody (running): a bounded status watch."""
    deadline = time.monotonic() + timeout_s
    while (await store.get(job_id)).status is not status:
        assert time.monotonic() < deadline, f"job never became {status}"
        await asyncio.sleep(0.02)


async def is_dead(handle: Any) -> bool:
    try:
        await handle.ping.remote()
    except RayActorError:
        return True
    return False


class TestFailures:
    @pytest.mark.slow
    def test_killed_worker_job_runs_again_once_and_the_actor_is_replaced(
        self, config: ServiceConfig, live_store: Store, namespace: str, run: Runner
    ) -> None:
        """Kill an actor mid-job: its lease expires, the job completes exactly once on the
        replacement (attempt 2), and the pool puts a new actor on the same queue."""

        async def body() -> None:
            async with pool_of(config, namespace) as pool:
                await pool.apply({"sleepy": 1}, wait=True)
                [victim] = pool.handles().values()
                victim_pid = await victim.ping.remote()
                [job_id] = await submit_to_queue(
                    live_store, "sleepy", new_job("test.sleep", {"seconds": 1.0})
                )
                await wait_status(live_store, job_id, JobStatus.RUNNING, 20)
                ray.kill(victim, no_restart=True)
                # ray.kill only asks: wait until the actor is seen dead, as the pool would be.
                deadline = time.monotonic() + 10
                while not await is_dead(victim):
                    assert time.monotonic() < deadline, "the killed actor still answers"
                assert await pool.replace_dead() == 1
                # Instead of waiting out the lease, look at the store from just after it ended.
                later = Store(
                    live_store.redis,
                    live_store.settings,
                    clock=lambda: time.time() + live_store.settings.lease_s + 0.5,
                )
                assert (await later.requeue_expired()).requeued == 1
                outcome = await live_store.wait_finished(job_id, 30)
                assert outcome.status is JobStatus.SUCCEEDED
                assert outcome.result["pid"] != victim_pid
                job = await live_store.get(job_id)
                assert job.attempts == 2
                stats = (await live_store.stats(["sleepy"])).queues["sleepy"]
                assert stats.completed_total == 1
                view = await pool.view()
                assert view.replaced == 1
                assert view.queues["sleepy"].ready == 1
                assert victim not in pool.handles().values()

        run(body())


class TestPlacement:
    @pytest.mark.slow
    def test_apply_moves_an_idle_worker_and_reports_the_load_it_paid(
        self, config: ServiceConfig, live_store: Store, namespace: str, run: Runner
    ) -> None:
        """Moving a worker from embed to classify reloads a model; view() reports the measured
        load seconds and service time, and the pool never holds more actors than the target."""

        async def body() -> None:
            async with pool_of(config, namespace) as pool:
                change = await pool.apply({"e": 2}, wait=True)
                assert (change.created, change.moved, change.removed) == (2, 0, 0)
                ids = await submit_to_queue(
                    live_store, "e", *(new_job("embed", {"text": f"t{i}"}) for i in range(6))
                )
                for job_id in ids:
                    assert (
                        await live_store.wait_finished(job_id, 20)
                    ).status is JobStatus.SUCCEEDED
                view = await pool.view()
                assert view.queues["e"].ready == 2
                assert view.queues["e"].model_load_s > 0.05
                assert view.queues["e"].service_time_s > 0

                change = await pool.apply({"e": 1, "c": 1})
                assert change.moves == (("e", "c"),)
                assert (change.created, change.removed) == (0, 0)
                moving = await pool.view()
                assert moving.queues["c"].loading + moving.queues["c"].ready == 1
                assert moving.total == 2
                await pool.settle()
                view = await pool.view()
                assert (view.queues["e"].ready, view.queues["c"].ready) == (1, 1)
                assert view.queues["c"].model_load_s > 0.2  # classify builds a 2048² QR
                assert len(pool.handles()) == 2

                change = await pool.apply({"c": 1}, wait=True)
                assert (change.removed, change.moved, change.created) == (1, 0, 0)
                assert len(pool.handles()) == 1
                view = await pool.view()
                assert (view.queues["e"].allocated, view.queues["c"].ready) == (0, 1)

        run(body())

    def test_shutdown_leaves_no_actor(
        self, config: ServiceConfig, namespace: str, run: Runner
    ) -> None:
        """After shutdown every actor the pool made is dead and no name with its prefix is left."""

        async def body() -> list[Any]:
            pool = WorkerPool(config, name_prefix=f"{namespace}-", drain_timeout_s=1.0)
            await pool.apply({"sleepy": 2}, wait=True)
            handles = list(pool.handles().values())
            assert len(handles) == 2
            await pool.shutdown()
            assert pool.handles() == {}
            return [await is_dead(h) for h in handles]

        assert run(body()) == [True, True]
        assert not [n for n in ray.util.list_named_actors() if n.startswith(f"{namespace}-")]

    def test_detached_workers_are_adopted_by_the_next_pool_with_their_models(
        self, config: ServiceConfig, namespace: str, live_store: Store, run: Runner
    ) -> None:
        """A detached pool's actors outlive it (as when its controller dies); a new pool with the
        same prefix adopts them on their queues, models loaded, serves with them, adds new actors
        without a name clash, and its shutdown ends them all."""

        async def body() -> None:
            first = WorkerPool(
                config, name_prefix=f"{namespace}-", detached=True, drain_timeout_s=1.0
            )
            await first.apply({"e": 1, "c": 1}, wait=True)
            pids = {name: await h.ping.remote() for name, h in first.handles().items()}
            del first  # abandoned without shutdown: its actors live on
            second = WorkerPool(
                config, name_prefix=f"{namespace}-", detached=True, drain_timeout_s=1.0
            )
            try:
                assert await second.adopt() == 2
                assert await second.adopt() == 0  # known members are not adopted twice
                assert {n: await h.ping.remote() for n, h in second.handles().items()} == pids
                assert set(second.placement().values()) == {"e", "c"}
                view = await second.view()
                assert (view.queues["e"].ready, view.queues["c"].ready) == (1, 1)
                [job_id] = await submit_to_queue(live_store, "e", new_job("embed", {"text": "a"}))
                outcome = await live_store.wait_finished(job_id, 30.0)
                assert outcome.status is JobStatus.SUCCEEDED
                await second.apply({"e": 2, "c": 1}, wait=True)
                assert len(second.handles()) == 3
            finally:
                await second.shutdown()

        run(body())
        assert not [n for n in ray.util.list_named_actors() if n.startswith(f"{namespace}-")]

    def test_unknown_queue_in_target_is_refused(
        self, config: ServiceConfig, namespace: str, run: Runner
    ) -> None:
        """A target naming a queue the service does not have is an error, not a silent no-op."""
        pool = WorkerPool(config, name_prefix=f"{namespace}-")
        with pytest.raises(KeyError, match="unknown queue 'nope'"):
            run(pool.apply({"nope": 1}))
