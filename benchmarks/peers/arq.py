"""arq, one worker process per core with its defaults (max_jobs 10), results kept in Redis."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks.peers import processes, procstat
from benchmarks.peers.base import AsyncDriver, Load, Session
from benchmarks.peers.harness import AsyncSession


class _Driver:
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def submit_batch(self, payloads: Sequence[int]) -> Any:
        # arq has no batch enqueue: its way to submit many is concurrent enqueue_job calls.
        import asyncio

        return await asyncio.gather(*(self.pool.enqueue_job("noop", x) for x in payloads))

    async def wait_batch(self, handle: Any, timeout_s: float) -> list[Any]:
        return [await self.wait(job, timeout_s) for job in handle]

    async def submit(self, payload: int) -> Any:
        return await self.pool.enqueue_job("noop", payload)

    async def wait(self, handle: Any, timeout_s: float) -> Any:
        from arq.jobs import ResultNotFound

        try:
            return await handle.result(timeout=timeout_s)
        except ResultNotFound:
            # arq 0.25's Job.result reads the result key and then the queue outside its
            # transaction, so a job finishing between the two reads looks lost; its result is in
            # Redis by then, and result_info reads it.
            info = await handle.result_info()
            if info is None:
                raise
            if not info.success:
                raise RuntimeError(f"arq job {handle.job_id} failed: {info.result!r}") from None
            return info.result


class ArqPeer:
    name = "arq"
    settings: Mapping[str, str] = {
        "workers": f"{processes.CORES} worker processes (`arq ...WorkerSettings` each): arq runs "
        "one asyncio loop per process, so one per core",
        "max_jobs": "10, arq's default",
        "poll_delay": "0.5 s, arq's default, for the worker's queue poll and Job.result's poll: "
        "it bounds arq's round trip (about 0.5 s) and its throughput (each poll starts at most "
        "queue_read_limit = 100 jobs)",
        "results": "kept in Redis (keep_result 3600 s, the default), read by Job.result",
        "delivery": "arq re-runs a job whose worker died once its in-progress key expires "
        "(at-least-once)",
        "clients": "16 asyncio tasks sharing one ArqRedis pool",
        "batch API": "none in arq: 100 concurrent enqueue_job calls (asyncio.gather) per batch",
    }
    # At 0.5 s per poll a round trip takes about 0.5 s and throughput is a few hundred jobs/s,
    # so arq's round is smaller to keep it under a minute and a half.
    load = Load(batched_jobs=2000, individual_jobs=1600, round_trips=100, warmup_round_trips=5)

    def unavailable(self) -> str | None:
        return None

    def start(self, redis_url: str, workdir: Path, stack: ExitStack) -> Session:
        env = processes.worker_env(redis_url)
        args = [sys.executable, "-m", "arq", "benchmarks.peers.arq_app.WorkerSettings"]
        workers = [
            processes.start(stack, args, env=env, log=workdir / f"arq-{i}.log")
            for i in range(processes.CORES)
        ]

        async def connect() -> AsyncDriver:
            from arq import create_pool
            from arq.connections import RedisSettings

            return _Driver(await create_pool(RedisSettings.from_dsn(redis_url)))

        async def close(driver: AsyncDriver) -> None:
            assert isinstance(driver, _Driver)
            await driver.pool.aclose()

        return AsyncSession(stack, connect, close, lambda: procstat.tree(w.pid for w in workers))


PEER = ArqPeer()
