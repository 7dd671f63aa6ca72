"""Chaos: processes die under load (model workers, the control plane) and every job is counted."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path
from typing import Any

import pytest

from scheduler.client import AsyncClient
from scheduler.service.runner import start_service
from scheduler.settings import Settings
from tests.chaos.harness import (
    Tracked,
    assert_every_job_accounted,
    chaos_config,
    completed_totals,
    percentile,
    report,
)

pytestmark = pytest.mark.slow


def _worker_names(namespace: str) -> list[str]:
    import ray

    prefix = f"bilevel:{namespace}:w"
    return [n for n in ray.util.list_named_actors() if n.startswith(prefix) and "worker-" in n]


async def _kill_workers_every(period_s: float, namespace: str, stop: asyncio.Event) -> int:
    """ray.kill a random ModelWorker of the namespace every `period_s` until `stop`."""
    import ray

    rng = random.Random(11)
    kills = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period_s)
        if stop.is_set():
            break
        names = await asyncio.to_thread(_worker_names, namespace)
        if not names:
            continue
        with contextlib.suppress(ValueError):
            victim = await asyncio.to_thread(ray.get_actor, rng.choice(names))
            await asyncio.to_thread(ray.kill, victim, no_restart=True)
            kills += 1
    return kills


def test_a_random_worker_killed_every_2_s_loses_and_doubles_nothing(
    services: list[Any], settings: Settings, run: Any, tmp_path: Path, report_dir: Path
) -> None:
    """5,000 jobs while a random ModelWorker is ray.kill'ed every 2 s: every job finishes with its
    own result, none completes twice, and the jobs the dead workers held ran again (reported)."""
    n = 5000
    config = chaos_config(settings)
    services.append(start_service(config, leader_ttl_s=2.0, wait_s=30.0))

    async def scenario() -> tuple[Tracked, int, int, float]:
        tracked = Tracked(tmp_path / "executions.log")
        async with AsyncClient(settings=config.store) as client:
            stop = asyncio.Event()
            killer = asyncio.create_task(_kill_workers_every(2.0, settings.namespace, stop))
            started = time.monotonic()
            await tracked.submit(client, n, batch=100, rate_per_s=500.0, work_s=0.005)
            await tracked.wait_all(timeout_s=85.0)
            elapsed_s = time.monotonic() - started
            stop.set()
            kills = await killer
            return tracked, kills, await completed_totals(client), elapsed_s

    tracked, kills, completed, elapsed_s = run(scenario())
    summary = tracked.summary()
    report(
        "worker_killed_every_2s",
        {**summary, "jobs": n, "workers_killed": kills, "completed_total": completed,
         "elapsed_s": round(elapsed_s, 1), "jobs_per_s": round(n / elapsed_s, 1)},
        report_dir,
    )  # fmt: skip
    assert kills >= 3, "the load ended before the faults did anything"
    assert_every_job_accounted(summary, completed, n=n)
    # Jobs a killed worker held while running them ran again (at least once): reported as
    # ran_more_than_once. How many depends on whether a kill caught a job running, which on a fast
    # machine with 5 ms jobs it may not; that no job completed twice is asserted above.


def test_the_control_plane_killed_three_times_under_load_loses_nothing(
    services: list[Any], settings: Settings, run: Any, tmp_path: Path, report_dir: Path
) -> None:
    """The control plane leading the controller (and with it its workers) is killed three times
    with standbys running: each role is led again each time, every job finishes."""
    import ray

    n = 3000
    config = chaos_config(settings)
    services.append(start_service(config, leader_ttl_s=1.0, wait_s=30.0))
    # A standby for each kill, all started before the load: starting one between kills takes
    # long on a busy machine, and the load could finish before the last kill.
    for _ in range(3):
        services.append(start_service(config, leader_ttl_s=1.0, wait_s=0.0))

    async def role_leaders() -> dict[str, Any]:
        """Role -> the live control plane leading it (with several standbys, the router and the
        controller may be taken up by different ones)."""
        leaders: dict[str, Any] = {}
        for handle in services:
            if handle.stopped:
                continue
            for role, leads in (await asyncio.to_thread(handle.leading)).items():
                if leads:
                    leaders[role] = handle
        return leaders

    async def serving(
        client: AsyncClient, since: int, since_s: float, patience_s: float = 60.0
    ) -> None:
        """Until the store counts a completion past `since` (the leader's workers serve)."""
        while await completed_totals(client) <= since:
            assert time.monotonic() - since_s < patience_s, f"no job completed past {since}"
            await asyncio.sleep(0.05)

    async def scenario() -> tuple[Tracked, list[float], list[float], int]:
        tracked = Tracked(tmp_path / "executions.log")
        takeovers_s: list[float] = []
        resumed_s: list[float] = []
        async with AsyncClient(settings=config.store) as client:
            load = asyncio.create_task(
                tracked.submit(client, n, batch=50, rate_per_s=120.0, work_s=0.005)
            )
            await serving(client, 0, time.monotonic())
            for k in range(3):
                # Kill a leader that has served a while (not one still starting its workers), at
                # 20%, 40% and 60% of the jobs done: every kill leaves work to resume.
                await asyncio.sleep(2.0)
                await serving(client, (k + 1) * n // 5 - 1, time.monotonic(), patience_s=120.0)
                roles = await role_leaders()
                # The control plane whose controller leads (it runs the workers), one per kill.
                leader = roles.get("controller")
                assert leader is not None, f"no control plane leads the controller: {roles}"
                done_before = await completed_totals(client)
                killed_at = time.monotonic()
                await asyncio.to_thread(ray.kill, leader.actor, no_restart=True)
                leader.stopped = True
                while set(await role_leaders()) != set(roles):
                    assert time.monotonic() - killed_at < 30.0, "no standby took over"
                    await asyncio.sleep(0.05)
                takeovers_s.append(time.monotonic() - killed_at)
                await serving(client, done_before, killed_at)
                resumed_s.append(time.monotonic() - killed_at)
            await load
            await tracked.wait_all(timeout_s=80.0)
            return tracked, takeovers_s, resumed_s, await completed_totals(client)

    tracked, takeovers_s, resumed_s, completed = run(scenario())
    summary = tracked.summary()
    report(
        "control_plane_killed_3x",
        {**summary, "jobs": n, "kills": 3, "completed_total": completed,
         "takeover_s": [round(t, 2) for t in takeovers_s],
         "first_completion_after_kill_s": [round(t, 2) for t in resumed_s],
         "takeover_s_max": round(max(takeovers_s), 2),
         "submit_p99_s": round(percentile([d for _, d in tracked.submit_s], 0.99), 3)},
        report_dir,
    )  # fmt: skip
    assert_every_job_accounted(summary, completed, n=n)
