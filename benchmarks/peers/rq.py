"""RQ, its worker pool with one worker per core (each forking a work horse per job), results in
Redis."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks.peers import processes, procstat
from benchmarks.peers.base import Load, Session
from benchmarks.peers.harness import SyncSession

QUEUE = "bench"
_BLOCK_S = 1


class _Driver:
    def __init__(self, redis_url: str) -> None:
        import redis
        from rq import Queue

        from benchmarks.peers.rq_app import noop

        # One client shared by the threads: redis-py's connection pool is thread-safe.
        self._queue = Queue(QUEUE, connection=redis.Redis.from_url(redis_url))
        self._noop = noop

    def submit_batch(self, payloads: Sequence[int]) -> Any:
        from rq import Queue

        return self._queue.enqueue_many([Queue.prepare_data(self._noop, (x,)) for x in payloads])

    def wait_batch(self, handle: Any, timeout_s: float) -> list[Any]:
        return [self.wait(job, timeout_s) for job in handle]

    def submit(self, payload: int) -> Any:
        return self._queue.enqueue(self._noop, payload)

    def wait(self, handle: Any, timeout_s: float) -> Any:
        from rq.results import Result

        # Each call blocks on the job's result stream (XREAD) for a second: it returns as soon as
        # the result is written, and stays inside redis-py's default 5 s socket timeout.
        deadline = time.monotonic() + timeout_s
        while (result := handle.latest_result(timeout=_BLOCK_S)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"RQ job {handle.id}: no result within {timeout_s} s")
        if result.type != Result.Type.SUCCESSFUL:
            raise RuntimeError(f"RQ job {handle.id} ended {result.type.name}: {result.exc_string}")
        return result.return_value


class RqPeer:
    name = "rq"
    settings: Mapping[str, str] = {
        "workers": f"`rq worker-pool -n {processes.CORES}`: RQ's worker pool, one worker per core",
        "worker class": "rq.Worker, the default: forks a work horse per job (RQ's isolation "
        "model, and its main cost on a no-op)",
        "results": "RQ's result streams in Redis (result_ttl 500 s, the default), read by "
        "Job.latest_result(timeout=1) blocking on XREAD, repeated until the result is there",
        "delivery": "a job whose worker dies goes to the failed registry, not back to its queue "
        "(at-most-once unless Retry is set); not changed here",
        "clients": "16 threads sharing one Redis client",
        "batch API": "Queue.enqueue_many of 100 prepared jobs (one pipeline)",
    }
    # A fork per job caps RQ at a few hundred jobs/s here: a smaller round.
    load = Load(batched_jobs=1000, individual_jobs=800, round_trips=300)

    def unavailable(self) -> str | None:
        return None

    def start(self, redis_url: str, workdir: Path, stack: ExitStack) -> Session:
        args = [sys.executable, "-m", "rq.cli", "worker-pool", "--url", redis_url,
                "--num-workers", str(processes.CORES), "--logging-level", "WARNING",
                QUEUE]  # fmt: skip
        pool = processes.start(
            stack, args, env=processes.worker_env(redis_url), log=workdir / "rq.log"
        )
        return SyncSession(_Driver(redis_url), lambda: procstat.tree([pool.pid]))


PEER = RqPeer()
