"""Level 2's loop on a real Redis with a bookkeeping pool: views, guardrails, fallback, logs,
published state and history. (The real WorkerPool on Ray is exercised in test_service.py.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest
import structlog
from structlog.testing import CapturingLogger

from policies.views import ClusterView
from scheduler.service.autoscaling import AutoscaleRequester, WorkerShape
from scheduler.service.controller_loop import ControllerLoop
from scheduler.service.views import PublishedState
from scheduler.settings import Settings
from scheduler.store import Store
from tests.conftest import ManualClock, Runner
from tests.integration.helpers import new_job, submit_to_queue
from tests.integration.service_helpers import Broken, Greedy, PoolDouble, service_config


class TestTick:
    def test_tick_builds_the_view_and_applies_the_target(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """Depth and arrival rate come from the store; the target goes to the pool and is published."""
        pool = PoolDouble(service_time_s=0.5, model_load_s=2.0)
        config = service_config(settings, allocation={"budget": 4, "policy": "proportional"})
        loop = ControllerLoop(store, config, pool, clock=clock)

        async def scenario() -> tuple[ClusterView, dict[str, int], Any, list[Any]]:
            await loop.tick()
            await submit_to_queue(store, "embeddings", *[new_job("embed") for _ in range(6)])
            clock.advance(2.0)
            report = await loop.tick()
            state = await store.redis.get(store.keys.allocation)
            history = await store.redis.lrange(store.keys.allocation_history, 0, -1)
            return report.view, report.target, state, history

        view, target, state, history = run(scenario())
        emb = view.queues[0]
        assert (emb.name, emb.depth) == ("embeddings", 6)
        assert emb.arrival_rate_per_s == pytest.approx(3.0)
        assert emb.backlog_s == pytest.approx(6 * 0.5)
        assert sum(target.values()) <= 4
        assert target["embeddings"] >= 1
        assert pool.applied[-1] == target
        assert state is not None
        published = PublishedState.from_json(state)
        assert {n: q.workers for n, q in published.queues.items()} == target
        assert json.loads(history[-1])["workers"] == target
        assert [c.workers for c in loop.history][-1] == target

    def test_housekeeping_runs_every_tick(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """Expired leases go back to their queue and dead workers are replaced, each tick."""
        pool = PoolDouble()
        loop = ControllerLoop(store, service_config(settings), pool, clock=clock)

        async def scenario() -> tuple[int, int]:
            await submit_to_queue(store, "classifier", new_job("classify"))
            await store.lease("classifier", 1, lease_s=1.0)
            clock.advance(5.0)
            pool.dead = 2
            report = await loop.tick()
            return report.requeue.requeued, report.replaced

        assert run(scenario()) == (1, 2)


class TestGuardrails:
    def test_bounds_and_move_cap_hold_against_a_greedy_policy(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """A policy that wants everything on one queue gets its max, the others keep their min,
        and no tick moves more than the cap."""
        config = service_config(
            settings,
            queues=[
                {"name": "embeddings", "job_types": ["embed"], "min_workers": 1},
                {"name": "classifier", "job_types": ["classify"]},
                {"name": "generator", "job_types": ["generate"], "max_workers": 3},
            ],
            allocation={"budget": 5, "max_moves_per_tick": 1},
        )
        pool = PoolDouble()
        loop = ControllerLoop(store, config, pool, allocator=Greedy("generator"), clock=clock)

        async def scenario() -> list[dict[str, int]]:
            targets = []
            for _ in range(5):
                targets.append((await loop.tick()).target)
                clock.advance(1.0)
            return targets

        targets = run(scenario())
        assert targets[-1] == {"embeddings": 1, "classifier": 0, "generator": 3}
        previous = {"embeddings": 0, "classifier": 0, "generator": 0}
        for target in targets:
            moves = sum(max(0, target[q] - previous[q]) for q in target)
            # The first tick must also raise embeddings to its minimum, which the cap gives way to.
            assert moves <= (2 if previous["embeddings"] == 0 else 1)
            previous = target

    def test_each_change_records_the_proposal_the_guardrails_and_the_inputs(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """An allocation change in the history says what the policy proposed, which guardrails
        changed it and what the policy saw of each queue (the log event names the guardrails)."""
        config = service_config(settings, allocation={"budget": 3, "max_moves_per_tick": 1})
        captured = CapturingLogger()
        loop = ControllerLoop(
            store,
            config,
            PoolDouble(service_time_s=0.5),
            allocator=Greedy("generator"),
            clock=clock,
            logger=structlog.wrap_logger(captured, processors=[]),
        )

        async def scenario() -> list[Any]:
            await submit_to_queue(store, "generator", *[new_job("generate") for _ in range(3)])
            await loop.tick()
            clock.advance(1.0)
            await loop.tick()
            return await store.redis.lrange(store.keys.allocation_history, 0, -1)

        first, second = [json.loads(e) for e in run(scenario())]
        assert first["workers"] == {"embeddings": 0, "classifier": 0, "generator": 1}
        assert first["policy"] == "greedy"
        assert first["proposal"] == {"embeddings": 0, "classifier": 0, "generator": 3}
        assert first["constraints"] == ["move_cap"]
        assert first["fallback"] is None
        assert first["inputs"]["generator"]["depth"] == 3
        assert set(first["inputs"]["generator"]) == {
            "depth",
            "rate_per_s",
            "oldest_wait_s",
            "service_s",
        }
        assert second["workers"]["generator"] == 2
        events = [c.kwargs for c in captured.calls if c.kwargs.get("event") == "allocation_tick"]
        assert [e.get("constraints") for e in events] == ["move_cap", "move_cap"]

    def test_a_controller_without_workers_starts_from_the_initial_allocation(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """allocation.initial is the first decision of a controller with no workers (inside the
        guardrails: the min of embeddings is kept), then the policy decides."""
        config = service_config(
            settings,
            queues=[
                {"name": "embeddings", "job_types": ["embed"], "min_workers": 1},
                {"name": "classifier", "job_types": ["classify"]},
                {"name": "generator", "job_types": ["generate"]},
            ],
            allocation={"budget": 4, "initial": {"classifier": 2, "generator": 1}},
        )
        captured = CapturingLogger()
        pool = PoolDouble()
        loop = ControllerLoop(
            store,
            config,
            pool,
            allocator=Greedy("generator"),
            clock=clock,
            logger=structlog.wrap_logger(captured, processors=[]),
        )

        async def scenario() -> list[Any]:
            first = await loop.tick()
            clock.advance(1.0)
            return [first, await loop.tick()]

        first, second = run(scenario())
        assert first.target == {"embeddings": 1, "classifier": 2, "generator": 1}
        assert first.policy == "initial"
        assert second.target == {"embeddings": 1, "classifier": 0, "generator": 3}
        assert second.policy == "greedy"
        events = [c.kwargs for c in captured.calls if c.kwargs.get("event") == "allocation_tick"]
        assert [e["policy"] for e in events] == ["initial", "greedy"]

    def test_falls_back_when_the_allocator_raises_and_logs_why(
        self,
        store: Store,
        settings: Settings,
        clock: ManualClock,
        run: Runner,
    ) -> None:
        """A raising policy is replaced by the fallback; the tick's log event names the error."""
        captured = CapturingLogger()
        pool = PoolDouble()
        loop = ControllerLoop(
            store,
            service_config(settings),
            pool,
            allocator=Broken(),
            clock=clock,
            logger=structlog.wrap_logger(captured, processors=[]),
        )

        async def scenario() -> tuple[str | None, dict[str, int]]:
            await submit_to_queue(store, "generator", *[new_job("generate") for _ in range(4)])
            report = await loop.tick()
            return report.fallback, report.target

        fallback, target = run(scenario())
        assert fallback is not None
        assert "RuntimeError: checkpoint has the wrong shape" in fallback
        assert target["generator"] >= 1
        events = [c.kwargs for c in captured.calls if c.kwargs.get("event") == "allocation_tick"]
        assert len(events) == 1, "one allocation_tick event per tick"
        assert captured.calls[-1].method_name == "warning"
        assert "checkpoint has the wrong shape" in events[-1]["fallback"]
        assert "generator depth=4" in events[-1]["queues"]
        assert "workers 0->" in events[-1]["queues"]


class TestRun:
    def test_run_ticks_every_tick_while_there_is_work(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """run() paces ticks by the injected sleep (no real waiting) and returns once stopped."""
        stop = asyncio.Event()
        pool = PoolDouble()
        slept: list[float] = []

        async def sleep(seconds: float) -> None:
            slept.append(seconds)
            clock.advance(seconds)
            if len(slept) >= 3:
                stop.set()

        loop = ControllerLoop(store, service_config(settings), pool, clock=clock, sleep=sleep)
        run(submit_to_queue(store, "embeddings", new_job("embed")))  # queued: never idle
        run(asyncio.wait_for(loop.run(stop), 5.0))
        assert loop.ticks == 3
        assert slept == [pytest.approx(0.2)] * 3

    def test_an_idle_service_ticks_fully_every_idle_tick_and_at_once_on_a_job(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """Once a tick finds nothing queued, running or changing, the next full ticks come every
        idle_tick_s; a job arriving in between brings the full tick back at the next tick_s."""
        stop = asyncio.Event()
        config = service_config(
            settings, allocation={"budget": 3, "tick_s": 0.25, "idle_tick_s": 1.0}
        )
        loop = ControllerLoop(store, config, PoolDouble(), clock=clock)
        ticks_after: list[int] = []

        async def sleep(seconds: float) -> None:
            ticks_after.append(loop.ticks)
            clock.advance(seconds)
            if len(ticks_after) == 7:
                await store.submit([new_job("embed")])  # into the ingress; no router runs
            if len(ticks_after) == 9:
                stop.set()

        loop._sleep = sleep
        run(asyncio.wait_for(loop.run(stop), 5.0))
        # t=0 finds all quiet (no load: no workers wanted); t=0.25..0.75 only look at Redis; t=1.0
        # is the idle full tick; the job submitted after t=1.5 is seen at t=1.75 and after.
        assert ticks_after == [1, 1, 1, 1, 2, 2, 2, 3, 4]


class FullCluster(PoolDouble):
    """A pool on a cluster with no room: it records targets but places no worker."""

    async def apply(self, target: Mapping[str, int]) -> dict[str, int]:
        self.applied.append(dict(target))
        return {}


class TestAutoscalerRequests:
    def test_shortfall_requests_resources_and_falling_load_withdraws_them(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """A target the cluster cannot hold asks the autoscaler for it once; the request is
        withdrawn when the resources are there, and when the loop stops."""
        requests: list[list[dict[str, float]]] = []
        free_cpus = {"CPU": 0.0}
        shapes = {q: WorkerShape(num_cpus=1.0) for q in ("embeddings", "classifier", "generator")}
        autoscaler = AutoscaleRequester(
            shapes,
            request=lambda bundles: requests.append([dict(b) for b in bundles]),
            available=lambda: dict(free_cpus),
        )
        config = service_config(settings, allocation={"budget": 3, "policy": "proportional"})
        loop = ControllerLoop(store, config, FullCluster(), clock=clock, autoscaler=autoscaler)

        async def scenario() -> None:
            await submit_to_queue(store, "embeddings", *[new_job("embed") for _ in range(30)])
            clock.advance(1.0)
            await loop.tick()  # nothing placed, no CPU free: ask for the target's bundles
            assert len(requests) == 1
            assert len(requests[0]) == 3
            await loop.tick()  # same target, same shortfall: no second call
            assert len(requests) == 1
            free_cpus["CPU"] = 8.0  # nodes arrived: the shortfall is gone
            await loop.tick()
            assert requests[-1] == []
            free_cpus["CPU"] = 0.0
            await loop.tick()
            assert len(requests[-1]) == 3
            stop = asyncio.Event()
            stop.set()
            await loop.run(stop)  # stopping withdraws the standing request
            assert requests[-1] == []

        run(scenario())
