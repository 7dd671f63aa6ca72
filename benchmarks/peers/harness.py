"""Times one round of a peer through its driver: the same protocol for every Python client.

- batched: `batched_jobs` submitted `batch_size` per call through the peer's batch API, then every
  result awaited; jobs/s from the first submission to the last result.
- individual: `clients` concurrent clients (threads for a blocking client, asyncio tasks for an
  async one), each submitting its share one call at a time and then awaiting its own results.
- round trip: one job at a time, submit to result, after a few unmeasured ones.

Every result is checked against its payload (the no-op returns it), so a job counts only once it
has been tracked to its own result.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

from benchmarks.peers.base import AsyncDriver, Load, RoundResult, SyncDriver
from benchmarks.peers.procstat import ProcStat

# Workers may take this long after their start to answer the first job.
READY_TIMEOUT_S = 90.0


def percentiles_ms(samples_s: Sequence[float]) -> tuple[float, float]:
    """p50 and p99 in ms, the p99 picked as bench_e2e picks it for bilevel (the sample at
    rank floor(0.99 n), one-based)."""
    if not samples_s:
        raise ValueError("no round-trip samples")
    ordered = sorted(samples_s)
    p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)]
    return round(statistics.median(ordered) * 1000, 3), round(p99 * 1000, 3)


def check_results(results: Sequence[Any], payloads: Sequence[int]) -> None:
    """Raise unless every result is its own payload echoed back."""
    if len(results) != len(payloads):
        raise RuntimeError(f"{len(results)} results for {len(payloads)} jobs")
    for result, payload in zip(results, payloads, strict=True):
        if result != payload:
            raise RuntimeError(f"job with payload {payload} returned {result!r}")


def _batches(load: Load) -> list[list[int]]:
    return [
        list(range(i, min(i + load.batch_size, load.batched_jobs)))
        for i in range(0, load.batched_jobs, load.batch_size)
    ]


def _client_payloads(load: Load) -> list[list[int]]:
    per_client = load.individual_jobs // load.clients
    return [list(range(c * per_client, (c + 1) * per_client)) for c in range(load.clients)]


# --- blocking clients -------------------------------------------------------------------------


def _sync_ready(driver: SyncDriver, load: Load) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            check_results([driver.wait(driver.submit(0), load.result_timeout_s)], [0])
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def measure_sync(driver: SyncDriver, load: Load) -> RoundResult:
    """One round through a blocking driver."""
    _sync_ready(driver, load)

    batches = _batches(load)
    started = time.perf_counter()
    handles = [driver.submit_batch(batch) for batch in batches]
    for handle, batch in zip(handles, batches, strict=True):
        check_results(driver.wait_batch(handle, load.result_timeout_s), batch)
    batched = load.batched_jobs / (time.perf_counter() - started)

    shares = _client_payloads(load)
    go = threading.Barrier(load.clients + 1, timeout=READY_TIMEOUT_S)

    def client(payloads: list[int]) -> None:
        go.wait()
        handles = [driver.submit(x) for x in payloads]
        check_results([driver.wait(h, load.result_timeout_s) for h in handles], payloads)

    with ThreadPoolExecutor(max_workers=load.clients) as pool:
        futures = [pool.submit(client, share) for share in shares]
        go.wait()
        started = time.perf_counter()
        for future in futures:
            future.result()
        individual = load.individual_jobs / (time.perf_counter() - started)

    samples = []
    for i in range(load.warmup_round_trips + load.round_trips):
        t0 = time.perf_counter()
        check_results([driver.wait(driver.submit(i), load.result_timeout_s)], [i])
        if i >= load.warmup_round_trips:
            samples.append(time.perf_counter() - t0)
    p50, p99 = percentiles_ms(samples)
    return RoundResult(round(batched), round(individual), p50, p99)


# --- asyncio clients --------------------------------------------------------------------------


async def _async_ready(driver: AsyncDriver, load: Load) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            check_results([await driver.wait(await driver.submit(0), load.result_timeout_s)], [0])
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def measure_async(driver: AsyncDriver, load: Load) -> RoundResult:
    """One round through an asyncio driver."""
    await _async_ready(driver, load)

    batches = _batches(load)
    started = time.perf_counter()
    handles = [await driver.submit_batch(batch) for batch in batches]
    for handle, batch in zip(handles, batches, strict=True):
        check_results(await driver.wait_batch(handle, load.result_timeout_s), batch)
    batched = load.batched_jobs / (time.perf_counter() - started)

    async def client(payloads: list[int]) -> None:
        handles = [await driver.submit(x) for x in payloads]
        check_results([await driver.wait(h, load.result_timeout_s) for h in handles], payloads)

    started = time.perf_counter()
    await asyncio.gather(*(client(share) for share in _client_payloads(load)))
    individual = load.individual_jobs / (time.perf_counter() - started)

    samples = []
    for i in range(load.warmup_round_trips + load.round_trips):
        t0 = time.perf_counter()
        check_results([await driver.wait(await driver.submit(i), load.result_timeout_s)], [i])
        if i >= load.warmup_round_trips:
            samples.append(time.perf_counter() - t0)
    p50, p99 = percentiles_ms(samples)
    return RoundResult(round(batched), round(individual), p50, p99)


# --- sessions over a driver -------------------------------------------------------------------


class SyncSession:
    """A Session whose rounds go through a blocking driver."""

    def __init__(self, driver: SyncDriver, idle_processes: Callable[[], list[ProcStat]]) -> None:
        self._driver = driver
        self._idle_processes = idle_processes

    def measure(self, load: Load) -> RoundResult:
        return measure_sync(self._driver, load)

    def idle_processes(self) -> list[ProcStat]:
        return self._idle_processes()


class AsyncSession:
    """A Session whose rounds go through an asyncio driver, on one event loop the session owns
    (an asyncio Redis pool belongs to the loop it was made on)."""

    def __init__(
        self,
        stack: ExitStack,
        connect: Callable[[], Awaitable[AsyncDriver]],
        close: Callable[[AsyncDriver], Awaitable[None]],
        idle_processes: Callable[[], list[ProcStat]],
    ) -> None:
        self._loop = asyncio.new_event_loop()
        stack.callback(self._loop.close)
        self._driver = self._loop.run_until_complete(connect())
        stack.callback(lambda: self._loop.run_until_complete(close(self._driver)))
        self._idle_processes = idle_processes

    def measure(self, load: Load) -> RoundResult:
        return self._loop.run_until_complete(measure_async(self._driver, load))

    def idle_processes(self) -> list[ProcStat]:
        return self._idle_processes()
