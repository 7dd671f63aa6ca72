"""The same no-op load through Celery and Dramatiq, as references for bench_e2e.

Each runs its own worker processes against the given Redis (started here, stopped here by PID).
Throughput: N individual submissions from one client, then every result awaited. Round trip: one
job at a time, submit to result, at low load.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis


def _percentiles_ms(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000, 3),
    }


@contextmanager
def _worker(args: list[str], url: str) -> Iterator[None]:
    env = {**os.environ, "BENCH_REDIS_URL": url}
    # Its own session, so its pool children are stopped with it and nothing else is touched.
    process = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        yield
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _measure(
    submit: Callable[[int], Any], wait: Callable[[Any], Any], n_throughput: int, n_latency: int
) -> dict[str, Any]:
    # Warm up until the workers answer.
    deadline = time.monotonic() + 60
    while True:
        try:
            wait(submit(0))
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
    started = time.perf_counter()
    handles = [submit(i) for i in range(n_throughput)]
    for handle in handles:
        wait(handle)
    throughput = n_throughput / (time.perf_counter() - started)
    round_trips = []
    for i in range(n_latency):
        t0 = time.perf_counter()
        wait(submit(i))
        round_trips.append(time.perf_counter() - t0)
    return {"jobs_per_s": round(throughput), "round_trip": _percentiles_ms(round_trips)}


def celery_reference(url: str, n_throughput: int = 5000, n_latency: int = 300) -> dict[str, Any]:
    """Celery: Redis broker and backend, prefork pool with concurrency 2."""
    redis.Redis.from_url(url).flushdb()
    args = [sys.executable, "-m", "celery", "-A", "benchmarks.celery_app", "worker",
            "--pool", "prefork", "--concurrency", "2", "--loglevel", "WARNING", "--without-gossip",
            "--without-mingle", "--without-heartbeat"]  # fmt: skip
    with _worker(args, url):
        os.environ["BENCH_REDIS_URL"] = url
        from benchmarks.celery_app import noop

        result = _measure(
            lambda i: noop.delay(i), lambda r: r.get(timeout=60), n_throughput, n_latency
        )
    return {"setup": "celery prefork, concurrency 2, redis broker", **result}


def dramatiq_reference(url: str, n_throughput: int = 5000, n_latency: int = 300) -> dict[str, Any]:
    """Dramatiq: Redis broker and results backend, one process with 2 threads."""
    redis.Redis.from_url(url).flushdb()
    args = [sys.executable, "-m", "dramatiq", "benchmarks.dramatiq_app", "--processes", "1",
            "--threads", "2"]  # fmt: skip
    with _worker(args, url):
        os.environ["BENCH_REDIS_URL"] = url
        from benchmarks.dramatiq_app import noop

        result = _measure(
            lambda i: noop.send(i),
            lambda m: m.get_result(block=True, timeout=60_000),
            n_throughput,
            n_latency,
        )
    return {"setup": "dramatiq, 1 process x 2 threads, redis broker", **result}


if __name__ == "__main__":
    import json

    from scheduler.embedded_redis import EmbeddedRedis

    with EmbeddedRedis() as server:
        print(json.dumps({"celery": celery_reference(server.url),
                          "dramatiq": dramatiq_reference(server.url)}))  # fmt: skip
