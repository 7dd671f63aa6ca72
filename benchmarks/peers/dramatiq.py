"""Dramatiq, one worker process per core with 8 threads each, Redis broker and results."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks.peers import processes, procstat
from benchmarks.peers.base import Load, Session
from benchmarks.peers.harness import SyncSession

THREADS = 8
_BLOCK_MS = 1000


class _Driver:
    def __init__(self) -> None:
        import dramatiq

        from benchmarks.peers.dramatiq_app import noop

        self._noop = noop
        self._group = dramatiq.group

    def submit_batch(self, payloads: Sequence[int]) -> Any:
        return self._group(self._noop.message(x) for x in payloads).run()

    def wait_batch(self, handle: Any, timeout_s: float) -> list[Any]:
        # What group.get_results does, child by child, with wait's short blocks.
        return [self.wait(message, timeout_s) for message in handle.children]

    def submit(self, payload: int) -> Any:
        return self._noop.send(payload)

    def wait(self, handle: Any, timeout_s: float) -> Any:
        from dramatiq.results import ResultTimeout

        # Each call blocks on the result's list (BRPOPLPUSH) for a second: it returns as soon as
        # the result is stored, and stays inside redis-py's default 5 s socket timeout, which a
        # single long block would overrun.
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return handle.get_result(block=True, timeout=_BLOCK_MS)
            except ResultTimeout:
                if time.monotonic() > deadline:
                    raise


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
        "batch API": "dramatiq.group of 100 messages, .run(), then each child's result",
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
