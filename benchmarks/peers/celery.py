"""Celery, prefork pool with one child per core, Redis broker and result backend."""

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


class _Driver:
    def __init__(self) -> None:
        from celery import group

        from benchmarks.peers.celery_app import noop

        self._noop = noop
        self._group = group

    def submit_batch(self, payloads: Sequence[int]) -> Any:
        return self._group(self._noop.s(x) for x in payloads).apply_async()

    def wait_batch(self, handle: Any, timeout_s: float) -> list[Any]:
        # GroupResult.get joins natively on the Redis backend (one subscription for the group).
        return list(handle.get(timeout=timeout_s))

    def submit(self, payload: int) -> Any:
        return self._noop.delay(payload)

    def wait(self, handle: Any, timeout_s: float) -> Any:
        return handle.get(timeout=timeout_s)


class CeleryPeer:
    name = "celery"
    settings: Mapping[str, str] = {
        "pool": f"prefork, concurrency {processes.CORES}: one child process per core, Celery's "
        "default concurrency and the pool it recommends for CPU-bound work",
        "worker_prefetch_multiplier": "64: Celery's optimizing guide asks for a large multiplier "
        "when tasks are many and short and throughput matters (the default, 4, is for a mix)",
        "task_acks_late": "True, with task_reject_on_worker_lost: a task is acked after it ran, so "
        "a crashed worker's task is redelivered (at-least-once, as bilevel's leases); the default "
        "acks on receipt and loses it",
        "broker / result backend": "Redis / Redis (results read by subscription, Celery's Redis "
        "backend's native join)",
        "worker flags": "--without-gossip --without-mingle --without-heartbeat: worker-to-worker "
        "events this bench does not use, commonly turned off on a Redis broker",
        "clients": "16 threads (Celery's result backend is per thread by default)",
        "batch API": "group(...).apply_async() of 100 signatures",
    }
    load = Load()

    def unavailable(self) -> str | None:
        return None

    def start(self, redis_url: str, workdir: Path, stack: ExitStack) -> Session:
        args = [sys.executable, "-m", "celery", "-A", "benchmarks.peers.celery_app", "worker",
                "--pool", "prefork", "--concurrency", str(processes.CORES),
                "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
                "--without-heartbeat"]  # fmt: skip
        env = processes.worker_env(redis_url)
        worker = processes.start(stack, args, env=env, log=workdir / "celery.log")
        # The client reads the same URL as the worker when the app module is imported.
        os.environ["BENCH_REDIS_URL"] = redis_url
        return SyncSession(_Driver(), lambda: procstat.tree([worker.pid]))


PEER = CeleryPeer()
