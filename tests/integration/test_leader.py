"""Leader locks on a real Redis: acquire, renew, release, takeover, and a loop that loses its lock."""

from __future__ import annotations

import asyncio

from scheduler.connection import client_from_url
from scheduler.models import JobStatus
from scheduler.service.leader import LeaderLock
from scheduler.service.router_loop import RouterLoop
from scheduler.settings import Settings
from scheduler.store import Store
from tests.conftest import Runner
from tests.integration.helpers import new_job
from tests.integration.service_helpers import service_config


class TestLock:
    def test_acquire_renew_release(self, store: Store, run: Runner) -> None:
        """One holder at a time; only the holder renews or releases; release frees it at once."""

        async def scenario() -> list[bool]:
            a = LeaderLock(store.redis, store.keys, "router", ttl_s=5.0)
            b = LeaderLock(store.redis, store.keys, "router", ttl_s=5.0)
            steps = [await a.acquire(), await b.acquire(), await a.renew(), await b.renew()]
            steps += [await b.release(), a.held, await a.release(), await b.acquire()]
            steps.append(await a.holder() == b.token)
            return steps

        assert run(scenario()) == [True, False, True, False, False, True, True, True, True]

    def test_renewal_extends_the_ttl(self, store: Store, run: Runner) -> None:
        """A renewed lock outlives its first TTL."""

        async def scenario() -> bool:
            lock = LeaderLock(store.redis, store.keys, "controller", ttl_s=0.4)
            await lock.acquire()
            for _ in range(4):
                await asyncio.sleep(0.15)
                assert await lock.renew()
            return await lock.holder() == lock.token

        assert run(scenario())

    def test_roles_are_independent(self, store: Store, run: Runner) -> None:
        """The router's and the controller's locks do not exclude each other."""

        async def scenario() -> tuple[bool, bool]:
            router = LeaderLock(store.redis, store.keys, "router", ttl_s=2.0)
            controller = LeaderLock(store.redis, store.keys, "controller", ttl_s=2.0)
            return await router.acquire(), await controller.acquire()

        assert run(scenario()) == (True, True)


class TestFailover:
    def test_standby_takes_over_when_the_holder_stops_renewing(
        self, store: Store, run: Runner
    ) -> None:
        """A standby campaigning with keep() leads within TTL + one retry of the holder's silence."""

        async def scenario() -> tuple[bool, float]:
            holder = LeaderLock(store.redis, store.keys, "controller", ttl_s=0.6)
            standby = LeaderLock(store.redis, store.keys, "controller", ttl_s=0.6)
            await holder.acquire()  # and then never renews: a process that froze or died
            loop = asyncio.get_running_loop()
            silent_since = loop.time()
            stop = asyncio.Event()
            gained = asyncio.Event()
            task = asyncio.create_task(
                standby.keep(stop, on_change=lambda held: gained.set() if held else None)
            )
            held_early = standby.held
            await asyncio.wait_for(gained.wait(), 5.0)
            took_s = loop.time() - silent_since
            assert not holder.held
            assert not await holder.renew()
            stop.set()
            await task
            assert await standby.holder() is None  # keep() releases on the way out
            return held_early, took_s

        held_early, took_s = run(scenario())
        assert not held_early
        assert 0.5 <= took_s < 0.6 + 0.2 + 0.5

    def test_a_lost_lock_stops_the_loop_acting(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """When another process takes the lock, the router stops routing at its next renewal."""

        async def scenario() -> tuple[JobStatus, JobStatus]:
            lock = LeaderLock(store.redis, store.keys, "router", ttl_s=0.6)
            loop = RouterLoop(store, service_config(settings), leader=lock, wait_s=0.05)
            stop = asyncio.Event()
            keeper = asyncio.create_task(lock.keep(stop))
            runner = asyncio.create_task(loop.run(stop))
            [(_, first)] = await store.submit([new_job("embed", {"n": 1})])
            for _ in range(200):
                if (await store.outcome(first)).status is JobStatus.QUEUED:
                    break
                await asyncio.sleep(0.01)
            # Another process takes over (as if our renewals had been lost and our TTL lapsed).
            await store.redis.set(store.keys.leader("router"), "usurper", px=60_000)
            await asyncio.sleep(lock.renew_interval_s + 0.1)
            [(_, second)] = await store.submit([new_job("embed", {"n": 2})])
            await asyncio.sleep(0.3)
            statuses = ((await store.outcome(first)).status, (await store.outcome(second)).status)
            stop.set()
            await asyncio.gather(keeper, runner)
            # keep() must not have deleted the usurper's lock.
            assert await store.redis.get(store.keys.leader("router")) == "usurper"
            return statuses

        assert run(scenario()) == (JobStatus.QUEUED, JobStatus.PENDING)

    def test_a_lock_cut_off_from_redis_lapses_by_the_clock(
        self, settings: Settings, run: Runner
    ) -> None:
        """Without a successful renewal `held` turns False after the TTL, even with no round trip."""

        async def scenario() -> tuple[bool, bool]:
            url = settings.url()
            assert url is not None
            redis = client_from_url(url)
            lock = LeaderLock(redis, Store(redis, settings).keys, "router", ttl_s=0.3)
            await lock.acquire()
            before = lock.held
            await asyncio.sleep(0.35)
            after = lock.held
            await lock.release()
            await redis.aclose()
            return before, after

        assert run(scenario()) == (True, False)
