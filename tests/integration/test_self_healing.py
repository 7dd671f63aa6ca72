"""Loops and waiters that heal themselves: lost connections, retried submits, poison jobs and stalls,
against the session's real Redis (the server restarts themselves are in tests/chaos)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import redis.asyncio as aioredis

from policies.views import JobView, QueueView, RouteDecision
from scheduler.client import AsyncClient
from scheduler.codes import Code
from scheduler.connection import client_from_url
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.models import JobStatus
from scheduler.retry import Backoff
from scheduler.service.actors import RoleHost
from scheduler.service.health import read_health
from scheduler.service.router_loop import RouterLoop
from scheduler.settings import Settings
from scheduler.store import Store
from tests.conftest import Runner
from tests.integration.helpers import new_job, submit_to_queue
from tests.integration.service_helpers import service_config


async def kill_clients(redis: aioredis.Redis, *, command: str) -> int:
    """Close (server side) every client connection whose last command was `command`, as a
    restart or a network cut would; returns how many."""
    killed = 0
    for client in await redis.client_list():
        if client.get("cmd") == command:
            killed += int(await redis.client_kill_filter(_id=client["id"]))
    return killed


async def until(predicate: object, timeout_s: float, what: str) -> None:
    """Wait (bounded) until the async `predicate()` is true."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


class TestRetriedSubmit:
    def test_resending_a_submit_never_makes_a_second_job(self, store: Store, run: Runner) -> None:
        """A submit resent with the same job ids (its reply was lost) returns them, created once."""
        jobs = [new_job("embed", {"i": i}) for i in range(3)]
        keyed = new_job("embed", {"k": 1}, idempotency_key="order-7")

        async def scenario() -> tuple[list[tuple[Code, str]], list[tuple[Code, str]], int]:
            first = await store.submit([*jobs, keyed])
            again = await store.submit([*jobs, keyed])
            return first, again, (await store.stats()).ingress

        first, again, ingress = run(scenario())
        assert first == again
        assert [code for code, _ in again] == [Code.OK] * 4
        assert ingress == 4

    def test_a_retried_submit_keeps_the_jobs_progress(self, store: Store, run: Runner) -> None:
        """A resend that arrives after the job moved on leaves the job where it is."""

        async def scenario() -> JobStatus:
            job = new_job("embed", {"i": 1})
            [job_id] = await submit_to_queue(store, "embeddings", job)
            [(code, same)] = await store.submit([job])
            assert (code, same) == (Code.OK, job_id)
            return (await store.get(job_id)).status

        assert run(scenario()) is JobStatus.QUEUED


class TestResultWaiter:
    def test_a_completion_missed_while_disconnected_is_still_delivered(
        self, redis_server: EmbeddedRedis, settings: Settings, run: Runner
    ) -> None:
        """The waiter's connection dies and the finish notice is lost with it: after
        reconnecting it re-checks the job, finds it finished and returns the result."""

        async def scenario() -> object:
            admin = client_from_url(redis_server.url)
            worker = Store(client_from_url(redis_server.url), settings)
            # Slow reconnects, so the job surely finishes while the waiter is cut off.
            waiter = Store(
                client_from_url(redis_server.url),
                settings,
                waiter_backoff=Backoff(base_s=2.0, cap_s=2.0),
            )
            try:
                [job_id] = await submit_to_queue(worker, "embeddings", new_job("embed", {"x": 1}))
                wait = asyncio.create_task(waiter.wait_finished(job_id, 20.0))
                await until(lambda: _someone_blocked(admin), 5.0, "the waiter to block")
                assert await kill_clients(admin, command="blpop") >= 1
                [lease] = await worker.lease("embeddings")
                assert await worker.complete([(lease.job_id, lease.token, {"ok": True})]) == [
                    Code.OK
                ]
                # The notice is gone, as it would be with a server that lost it (there may be
                # none to delete: a notice pushed while the inbox had no live reader can be
                # dropped by the server already).
                notices = [k async for k in admin.scan_iter(waiter.keys.inbox("*"))]
                if notices:
                    await admin.delete(*notices)
                outcome = await wait
                assert waiter._waiter.recoveries >= 1
                return outcome.result
            finally:
                for s in (waiter, worker):
                    await s.close()
                    await s.redis.aclose()
                await admin.aclose()

        assert run(scenario()) == {"ok": True}


async def _someone_blocked(admin: aioredis.Redis) -> bool:
    return any(c.get("cmd") == "blpop" for c in await admin.client_list())


class _PoisonAverseRouter:
    """A routing policy that cannot handle jobs tagged "poison" (as a buggy plug-in might)."""

    name = "poison-averse"

    def route_batch(
        self, jobs: Sequence[JobView], queues: Sequence[QueueView], rng: np.random.Generator
    ) -> list[RouteDecision]:
        for job in jobs:
            if "poison" in job.tags:
                raise KeyError(f"no rule for {sorted(job.tags)}")
        return ["embeddings" for _ in jobs]


class TestRouterIsolatesPoisonJobs:
    def test_a_job_the_policy_chokes_on_is_dead_lettered_and_the_rest_route(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """The policy raises on one job of a batch: that job dies with the error, the rest route."""
        loop = RouterLoop(store, service_config(settings), router=_PoisonAverseRouter())

        async def scenario() -> None:
            good = [new_job("embed", {"i": i}) for i in range(5)]
            bad = new_job("embed", {"i": 99}, tags=["poison"])
            await store.submit([*good[:2], bad, *good[2:]])
            report = await loop.route_batch()
            assert (report.routed, report.rejected) == (5, 1)
            dead = await store.get(bad.id)
            assert dead.status is JobStatus.DEAD
            assert dead.error is not None
            assert "poison-averse router failed on this job" in dead.error.message
            assert "KeyError" in dead.error.message
            assert {(await store.get(j.id)).status for j in good} == {JobStatus.QUEUED}

        run(scenario())

    def test_the_loop_outlives_a_lost_connection_and_drains_what_came_meanwhile(
        self, redis_server: EmbeddedRedis, settings: Settings, run: Runner
    ) -> None:
        """The router's blocked connection is killed; it reconnects and routes later submits."""

        async def scenario() -> None:
            admin = client_from_url(redis_server.url)
            store = Store(client_from_url(redis_server.url), settings)
            loop = RouterLoop(store, service_config(settings), wait_s=5.0)
            stop = asyncio.Event()
            task = asyncio.create_task(loop.run(stop))
            try:
                await until(lambda: _someone_blocked(admin), 5.0, "the router to block")
                assert await kill_clients(admin, command="blpop") >= 1
                await store.submit([new_job("embed", {"i": i}) for i in range(20)])
                await until(
                    lambda: _stats_depth(store, "embeddings", 20), 10.0, "the jobs to route"
                )
                assert loop.progress.failures_total >= 1
                assert not task.done()
            finally:
                stop.set()
                await store.redis.rpush(store.keys.ingress_signal, "stop")
                await asyncio.wait_for(task, 10.0)
                await store.redis.aclose()
                await admin.aclose()

        run(scenario())


async def _stats_depth(store: Store, queue: str, depth: int) -> bool:
    stats = await store.stats([queue])
    return stats.queues[queue].depth == depth


class TestWatchdog:
    def test_a_stalled_router_is_reported_restarted_and_resumes(
        self, redis_server: EmbeddedRedis, settings: Settings, run: Runner
    ) -> None:
        """Redis stops answering (every command hangs, none fails): the router is reported
        stalled, the watchdog restarts it, and routing resumes when Redis answers again."""
        config = service_config(settings, health={"stall_after_s": 1.0})

        async def scenario() -> None:
            admin = client_from_url(redis_server.url)
            host = RoleHost(
                config, "router", redis_url=redis_server.url, name="t/router", leader_ttl_s=1.0
            )
            await host.start()
            try:
                async with AsyncClient(settings=settings) as client:
                    handle = await client.submit("embed", {"before": True})
                    await until(
                        lambda: _status_is(client.store, handle.id, JobStatus.QUEUED),
                        10.0,
                        "routing before the stall",
                    )
                    # Every client's commands hang for 4 s, as behind a dead network path.
                    await admin.execute_command("CLIENT", "PAUSE", 4000, "ALL")
                    seen_stalled = False
                    deadline = time.monotonic() + 3.5
                    while time.monotonic() < deadline:
                        seen_stalled |= host.health().state(time.time()) == "stalled"
                        await asyncio.sleep(0.05)
                    assert seen_stalled
                    assert host.restarts >= 1
                    late = await client.submit("embed", {"after": True})
                    await until(
                        lambda: _status_is(client.store, late.id, JobStatus.QUEUED),
                        10.0,
                        "routing after the stall",
                    )
                    # What status reads: the published record counts the restarts.
                    await until(
                        lambda: _published_restarts(client.store, "t/router"),
                        10.0,
                        "the record to show the restart",
                    )
            finally:
                await host.stop()
                await admin.aclose()

        run(scenario())


async def _published_restarts(store: Store, name: str) -> bool:
    records = await read_health(store.redis, store.keys)
    return any(r.name == name and r.restarts >= 1 for r in records)


async def _status_is(store: Store, job_id: str, status: JobStatus) -> bool:
    return (await store.get(job_id)).status is status
