"""Dramatiq, one worker process per core with 8 threads each, Redis broker and results."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks.peers import processes, procstat
from benchmarks.peers.base import Load, Session
from benchmarks.peers.harness import SyncSession

THREADS = 8


class _Driver:
    def __init__(self) -> None:
        import dramatiq

        from benchmarks.peers.dramatiq_app import noop

        self._noop = noop
        self._group = dramatiq.group

    def submit_batch(self, payloads: Sequence[int]) -> Any:
        return self._group(self._noop.message(x) for x in payloads).run()

    def wait_batch(self, handle: Any, timeout_s: float) -> list[Any]:
        return list(handle.get_results(block=True, timeout=int(timeout_s * 1000)))

    def submit(self, payload: int) -> Any:
        return self._noop.send(payload)

    def wait(self, handle: Any, timeout_s: float) -> Any:
        return handle.get_result(block=True, timeout=int(timeout_s * 1000))


class DramatiqPeer:
    name = "dramatiq"
    settings: Mapping[str, str] = {
        "processes x threads": f"{processes.CORES} x {THREADS}: Dramatiq's own defaults (a "
        "process per core, 8 threads each)",
        "broker / results": "RedisBroker / Results middleware on RedisBackend (blocking result "
        "reads); default middleware otherwise, retries on",
        "delivery": "Dramatiq's Redis broker acks after the actor ran and requeues a dead "
        "worker's messages: at-least-once, as bilevel",
        "clients": "16 threads sharing the broker's connection pool",
        "batch API": "dramatiq.group of 100 messages, .run(), results by group.get_results",
    }
    load = Load()

    def unavailable(self) -> str | None:
        return None

    def start(self, redis_url: str, workdir: Path, stack: ExitStack) -> Session:
        args = [sys.executable, "-m", "dramatiq", "benchmarks.peers.dramatiq_app",
                "--processes", str(processes.CORES), "--threads", str(THREADS)]  # fmt: skip
        env = processes.worker_env(redis_url)
        worker = processes.start(stack, args, env=env, log=workdir / "dramatiq.log")
        os.environ["BENCH_REDIS_URL"] = redis_url
        return SyncSession(_Driver(), lambda: procstat.tree([worker.pid]))


PEER = DramatiqPeer()
