"""Chaos: Redis itself fails under load (kill -9 and restart), and every job is counted."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from scheduler.client import AsyncClient
from scheduler.connection import client_from_url
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.service.runner import start_service
from scheduler.settings import Settings
from tests.chaos.harness import (
    QUEUES,
    Tracked,
    assert_every_job_accounted,
    chaos_config,
    completed_totals,
    percentile,
    report,
)

pytestmark = pytest.mark.slow

OUTAGE_S = 3.0


async def _enqueued_total(url: str, namespace: str) -> int | None:
    """Jobs routed so far (None while Redis does not answer), from a fresh connection."""
    from scheduler.keys import Keys

    redis = client_from_url(url)
    try:
        keys = Keys(namespace)
        counts = [await redis.hget(keys.counts(q["name"]), "enqueued") for q in QUEUES]
        return sum(int(c or 0) for c in counts)
    except Exception:
        return None
    finally:
        await redis.aclose()


def test_redis_killed_and_restarted_under_load_loses_nothing(
    services: list[Any], settings: Settings, run: Any, tmp_path: Path, report_dir: Path
) -> None:
    """kill -9 Redis (appendfsync always) under 100 jobs/s and restart it on its port and data
    dir 3 s later: no acknowledged job is lost, every waiting result() returns, routing resumes
    within 5 s of the restart, and no service restart is needed."""
    n = 2000
    server = EmbeddedRedis(data_dir=tmp_path / "redis", appendfsync="always").start()
    try:
        config = chaos_config(settings, redis_url=server.url)
        services.append(start_service(config, redis_url=server.url, leader_ttl_s=2.0, wait_s=30.0))

        async def scenario() -> dict[str, Any]:
            tracked = Tracked(tmp_path / "executions.log")
            async with AsyncClient(server.url, namespace=settings.namespace) as client:
                load = asyncio.create_task(
                    tracked.submit(client, n, batch=10, rate_per_s=100.0, work_s=0.005, wait_s=90.0)
                )
                await asyncio.sleep(6.0)
                routed_before = await _enqueued_total(server.url, settings.namespace)
                assert routed_before, "nothing was routed before the fault"
                killed_at = time.monotonic()
                assert server.pid is not None
                os.kill(server.pid, signal.SIGKILL)
                await asyncio.sleep(OUTAGE_S)
                await asyncio.to_thread(server.restart)
                restarted_at = time.monotonic()
                after_restart = await _enqueued_total(server.url, settings.namespace) or 0
                while (await _enqueued_total(server.url, settings.namespace) or 0) <= after_restart:
                    assert time.monotonic() - restarted_at < 30.0, "routing never resumed"
                    await asyncio.sleep(0.02)
                routing_resumed_s = time.monotonic() - restarted_at
                await load
                await tracked.wait_all(timeout_s=90.0)
                return {
                    "tracked": tracked,
                    "completed": await completed_totals(client),
                    "routing_resumed_s": routing_resumed_s,
                    "outage_s": restarted_at - killed_at,
                    "killed_at": killed_at,
                    "restarted_at": restarted_at,
                }

        out = run(scenario())
        tracked: Tracked = out["tracked"]
        summary = tracked.summary()
        stalls = [d for t, d in tracked.submit_s if t >= out["killed_at"] - 1.0]
        report(
            "redis_kill9_restart",
            {**summary, "jobs": n, "appendfsync": "always", "completed_total": out["completed"],
             "outage_s": round(out["outage_s"], 2),
             "routing_resumed_after_restart_s": round(out["routing_resumed_s"], 2),
             "longest_submit_s": round(max(stalls, default=0.0), 2),
             "submit_p50_s": round(percentile([d for _, d in tracked.submit_s], 0.5), 4),
             # Results per second: the 5 s before the kill, and the 5 s after the restart (jobs
             # acknowledged during the outage catch up there).
             "results_per_s_before": round(tracked.throughput_per_s(out["killed_at"] - 5, out["killed_at"]), 1),
             "results_per_s_after_restart": round(
                 tracked.throughput_per_s(out["restarted_at"], out["restarted_at"] + 5), 1)},
            report_dir,
        )  # fmt: skip
        assert_every_job_accounted(summary, out["completed"], n=n)
        assert out["routing_resumed_s"] < 5.0
    finally:
        for handle in services:
            handle.stop(timeout_s=20.0)
        services.clear()
        server.stop()


def test_sentinel_failover_under_load_finishes_every_job_once(
    services: list[Any], settings: Settings, run: Any, tmp_path: Path, report_dir: Path
) -> None:
    """kill -9 the master of a Sentinel deployment under load: the service and its clients follow
    the promotion by themselves, every acknowledged job finishes and none completes twice
    (replica_acks=1: a submit is acknowledged once a replica holds it, so the failover cannot take
    it back; two replicas, so the promoted master still has one to confirm submits)."""
    from tests.sentinel_cluster import SentinelCluster

    n = 1500
    with SentinelCluster(replicas=2) as cluster:
        url = cluster.url()
        # Leases longer than the failover, as in production: a job leased before it keeps its
        # worker (its heartbeats resume on the new master) instead of running again. And a
        # client retry window longer than the whole failover, also as in production: with
        # replica_acks a submit succeeds only once the surviving replica follows the new master,
        # which on a loaded 2-core machine once took more than 11 s from the kill.
        store = {"replica_acks": 1, "lease_s": 10.0, "outage_retry_s": 30.0}
        config = chaos_config(settings, redis_url=url, store=store)
        services.append(start_service(config, redis_url=url, leader_ttl_s=2.0, wait_s=30.0))

        async def scenario() -> dict[str, Any]:
            tracked = Tracked(tmp_path / "executions.log")
            async with AsyncClient(settings=config.store) as client:
                load = asyncio.create_task(
                    tracked.submit(client, n, batch=10, rate_per_s=100.0, work_s=0.005, wait_s=90.0)
                )
                await asyncio.sleep(5.0)
                old, killed_at = await asyncio.to_thread(cluster.kill_master)
                await asyncio.to_thread(cluster.wait_promoted, old)
                promoted_at = time.monotonic()
                before = await _enqueued_total(url, settings.namespace) or 0
                while (await _enqueued_total(url, settings.namespace) or 0) <= before:
                    assert time.monotonic() - killed_at < 30.0, "routing never resumed"
                    await asyncio.sleep(0.02)
                resumed_at = time.monotonic()
                await load
                await tracked.wait_all(timeout_s=90.0)
                return {
                    "tracked": tracked,
                    "completed": await completed_totals(client),
                    "promoted_s": promoted_at - killed_at,
                    "routing_resumed_s": resumed_at - killed_at,
                    "killed_at": killed_at,
                }

        try:
            out = run(scenario())
        finally:
            for handle in services:
                handle.stop(timeout_s=20.0)
            services.clear()
        logs = cluster.log_tails()
    tracked: Tracked = out["tracked"]
    summary = tracked.summary()
    stalls = [d for t, d in tracked.submit_s if t >= out["killed_at"] - 1.0]
    report(
        "sentinel_failover",
        {**summary, "jobs": n, "replica_acks": 1, "completed_total": out["completed"],
         "promoted_after_kill_s": round(out["promoted_s"], 2),
         "routing_resumed_after_kill_s": round(out["routing_resumed_s"], 2),
         "longest_submit_s": round(max(stalls, default=0.0), 2)},
        report_dir,
    )  # fmt: skip
    try:
        assert_every_job_accounted(summary, out["completed"], n=n)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs}") from None
