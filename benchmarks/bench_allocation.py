"""Time one allocation tick of each heuristic (inside Guardrails) at 8, 64 and 256 queues.

Run `python -m benchmarks.bench_allocation`; prints one JSON object:
{"target_ms": ..., "results": {"<n_queues>": {"<allocator>": {"median_ms", "p99_ms", ...}}}}.
Views are random but seeded, and evolve tick by tick (now_s advances, allocations follow the
previous targets), so stateful allocators see a realistic sequence rather than one frozen view.
"""

from __future__ import annotations

import gc
import json
import sys
import time

import numpy as np

from policies.guardrails import Guardrails
from policies.registry import HEURISTIC_ALLOCATORS, make_allocator
from policies.views import AllocationBounds, Allocator, ClusterView, QueueView

QUEUE_COUNTS = (8, 64, 256)
WORKERS_PER_QUEUE = 4
TICKS = 400
WARMUP_TICKS = 20
TICK_S = 1.0
TARGET_MS = 2.0


def _random_view(
    rng: np.random.Generator, n_queues: int, now_s: float, allocation: list[int]
) -> ClusterView:
    """A plausible cluster state: skewed loads, some queues idle, allocations as last decided."""
    rates = rng.gamma(0.7, 1.0, size=n_queues) * (rng.random(n_queues) > 0.2)
    service_s = rng.uniform(0.2, 3.0, size=n_queues)
    depth = rng.poisson(rates * service_s * 3.0)
    load_s = rng.uniform(0.0, 20.0, size=n_queues)
    queues = []
    for i in range(n_queues):
        allocated = allocation[i]
        loading = int(rng.integers(0, allocated + 1)) if rng.random() < 0.1 else 0
        ready = allocated - loading
        queues.append(
            QueueView(
                name=f"q{i}",
                job_types=frozenset({f"t{i % 7}"}),
                depth=int(depth[i]),
                backlog_s=float(depth[i] * service_s[i]),
                oldest_wait_s=float(rng.exponential(5.0)) if depth[i] else 0.0,
                arrival_rate_per_s=float(rates[i]),
                service_time_s=float(service_s[i]),
                workers_ready=ready,
                workers_busy=min(ready, int(rng.integers(0, ready + 1))),
                workers_loading=loading,
                model_load_s=float(load_s[i]),
                slo_s=30.0 if i % 3 == 0 else None,
            )
        )
    return ClusterView(
        now_s=now_s, tick_s=TICK_S, budget=WORKERS_PER_QUEUE * n_queues, queues=tuple(queues)
    )


def time_ticks(allocator: Allocator, n_queues: int, seed: int) -> dict[str, float]:
    """Median, p99 and max ms of `allocator.allocate` over TICKS random views of `n_queues`,
    each view following the allocation the previous tick decided."""
    rng = np.random.default_rng(seed)
    allocation = [WORKERS_PER_QUEUE] * n_queues
    samples_ms: list[float] = []
    cpu_ms: list[float] = []
    for tick in range(WARMUP_TICKS + TICKS):
        view = _random_view(rng, n_queues, tick * TICK_S, allocation)
        # As timeit does: a collection landing inside one tick measures the benchmark, not the policy.
        gc.disable()
        start = time.perf_counter()
        start_cpu = time.thread_time()
        decided = allocator.allocate(view)
        elapsed_cpu_ms = (time.thread_time() - start_cpu) * 1e3
        elapsed_ms = (time.perf_counter() - start) * 1e3
        gc.enable()
        allocation = [decided[q.name] for q in view.queues]
        if tick >= WARMUP_TICKS:
            samples_ms.append(elapsed_ms)
            cpu_ms.append(elapsed_cpu_ms)
    samples = np.array(samples_ms)
    return {
        "median_ms": round(float(np.median(samples)), 4),
        "p99_ms": round(float(np.percentile(samples, 99)), 4),
        "max_ms": round(float(samples.max()), 4),
        # This thread's CPU time: on a machine whose cores are shared, the wall time above also
        # counts the time the tick waited for a core.
        "cpu_median_ms": round(float(np.median(cpu_ms)), 4),
    }


def _time_allocator(name: str, n_queues: int, seed: int) -> dict[str, float]:
    guarded = Guardrails(
        make_allocator(name),
        AllocationBounds(max_moves_per_tick=max(1, n_queues // 4)),
    )
    return {**time_ticks(guarded, n_queues, seed), "fallbacks": guarded.fallback_count}


def main() -> int:
    """Run every heuristic at every size and print the JSON report; exit 1 if a p99 misses target."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for n_queues in QUEUE_COUNTS:
        results[str(n_queues)] = {
            name: _time_allocator(name, n_queues, seed=n_queues) for name in HEURISTIC_ALLOCATORS
        }
    largest = results[str(max(QUEUE_COUNTS))]
    within = all(stats["median_ms"] <= TARGET_MS for stats in largest.values())
    report = {
        "ticks": TICKS,
        "budget_per_queue": WORKERS_PER_QUEUE,
        "target_ms": TARGET_MS,
        "median_within_target_at_256": within,
        "results": results,
    }
    print(json.dumps(report))
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
