"""What another allocator would have done to job completion times over a window that already
happened: the window's arrivals replayed in the simulator from the state it started in, once under
each allocator, with the same jobs and the same service times.

The live controller (scheduler.service.shadow) records, tick by tick, how many jobs each queue
received, and keeps the view of the tick the window starts at. From them:

- the jobs: those in system at the start (waiting or in service) arrive at time 0, and each tick's
  arrivals are spread evenly over the interval before it (the store counts arrivals per queue, not
  their instants); each job type is its queue's own, so routing is what it was live;
- the service time of every job is drawn from an exponential with its queue's measured mean, one
  draw per job and seed, shared by both runs;
- the cluster starts with the window's first allocation, models loaded, and each queue's measured
  model-load time; both allocators decide every tick inside the same guardrails as live.

The estimate is the mean time in system of the window's jobs under each allocator (jobs still in
system when a run stops count up to then; a run drains for at most `drain_factor` window lengths),
averaged over the seeds. Its error against the real run is the simulator's (docs/shadow.md): the
difference between two runs on the same jobs is what it is for.

Nothing here does I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from policies.guardrails import guardrails_for
from policies.registry import make_router
from policies.schema import Layout
from policies.sim.run import Jobs, QueueSpec, SimRun, SimSpec
from policies.sim.workloads import ArrivalTable
from policies.views import Allocator, ClusterView

# A run drains its leftover jobs for at most this many window lengths: enough for a backlog the
# window built up, and a bound on the CPU a hopeless allocation can cost.
DEFAULT_DRAIN_FACTOR = 2.0


@dataclass(frozen=True, slots=True)
class WindowTick:
    """One tick of the window: at `t_s`, `arrivals[i]` jobs had reached queue i since the tick
    before."""

    t_s: float
    arrivals: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ReplayWindow:
    """A stretch of live history: the view at its start and the arrivals of each tick after it."""

    start: ClusterView
    ticks: tuple[WindowTick, ...]

    def __post_init__(self) -> None:
        n = len(self.start.queues)
        last_s = self.start.now_s
        for i, tick in enumerate(self.ticks):
            if len(tick.arrivals) != n:
                raise ValueError(f"ticks[{i}]: {len(tick.arrivals)} arrival counts for {n} queues")
            if tick.t_s < last_s:
                raise ValueError(f"ticks[{i}]: at {tick.t_s} s, before the tick before it")
            if any(a < 0 for a in tick.arrivals):
                raise ValueError(f"ticks[{i}]: arrival counts must be >= 0")
            last_s = tick.t_s

    @property
    def length_s(self) -> float:
        return self.ticks[-1].t_s - self.start.now_s if self.ticks else 0.0

    def arrival_table(self) -> ArrivalTable:
        """The window's jobs on a clock starting at 0: the start's jobs in system at 0, each
        tick's arrivals spread evenly over the interval before it. Job type i is queue i's."""
        times: list[np.ndarray] = []
        types: list[np.ndarray] = []
        for i, q in enumerate(self.start.queues):
            times.append(np.zeros(q.in_system))
            types.append(np.full(q.in_system, i, dtype=np.int64))
        before_s = 0.0
        for tick in self.ticks:
            at_s = tick.t_s - self.start.now_s
            span_s = at_s - before_s
            for i, count in enumerate(tick.arrivals):
                if count:
                    times.append(before_s + span_s * (np.arange(count) + 0.5) / count)
                    types.append(np.full(count, i, dtype=np.int64))
            before_s = at_s
        arrival_s = np.concatenate(times) if times else np.empty(0)
        type_idx = np.concatenate(types) if types else np.empty(0, dtype=np.int64)
        order = np.argsort(arrival_s, kind="stable")
        names = tuple(q.name for q in self.start.queues)
        return ArrivalTable._of(arrival_s[order], type_idx[order], names)


@dataclass(frozen=True, slots=True)
class CounterfactualEstimate:
    """Mean time in system of a window's jobs under the acting and the other allocator."""

    acting_mean_jct_s: float
    shadow_mean_jct_s: float
    jobs: int
    window_s: float
    seeds: int
    # Wall time the replays took, all seeds and both allocators.
    wall_ms: float

    @property
    def difference_s(self) -> float:
        """Shadow minus acting: negative when the shadow would have been faster."""
        return self.shadow_mean_jct_s - self.acting_mean_jct_s

    @property
    def gain(self) -> float:
        """The shadow's saving as a fraction of the acting policy's mean (0 without jobs)."""
        if self.jobs == 0 or self.acting_mean_jct_s <= 0:
            return 0.0
        return -self.difference_s / self.acting_mean_jct_s

    def to_dict(self) -> dict[str, float | int]:
        return {
            "acting_mean_jct_s": round(self.acting_mean_jct_s, 4),
            "shadow_mean_jct_s": round(self.shadow_mean_jct_s, 4),
            "difference_s": round(self.difference_s, 4),
            "gain": round(self.gain, 4),
            "jobs": self.jobs,
            "window_s": round(self.window_s, 3),
            "seeds": self.seeds,
            "wall_ms": round(self.wall_ms, 2),
        }


def _spec(window: ReplayWindow, rate_window_s: float, drain_factor: float) -> SimSpec:
    start = window.start
    return SimSpec(
        queues=tuple(
            QueueSpec(
                name=q.name,
                job_types=frozenset({q.name}),
                model_load_s=max(q.model_load_s, 0.0),
                slo_s=q.slo_s,
                nominal_service_s=max(q.service_time_s, 1e-6),
            )
            for q in start.queues
        ),
        budget=start.budget,
        initial_allocation=tuple(q.allocated for q in start.queues),
        tick_s=start.tick_s,
        horizon_s=window.length_s,
        drain=True,
        max_drain_s=drain_factor * max(window.length_s, start.tick_s),
        rate_window_s=rate_window_s,
    )


def replay_window(
    layout: Layout,
    window: ReplayWindow,
    acting: Callable[[], Allocator],
    shadow: Callable[[], Allocator],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    rate_window_s: float = 10.0,
    drain_factor: float = DEFAULT_DRAIN_FACTOR,
) -> CounterfactualEstimate:
    """Both allocators (fresh ones from the factories, for every run) on the window's jobs, inside
    `layout`'s guardrails; see the module docstring. `rate_window_s` is the time constant of the
    arrival-rate estimate the simulated views carry (the live one's, for a like-for-like view)."""
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    started = time.perf_counter()
    spec = _spec(window, rate_window_s, drain_factor)
    arrivals = window.arrival_table()
    n_jobs = len(arrivals)
    mean_service_s = np.array([q.nominal_service_s for q in spec.queues])
    router = make_router("rule")
    totals = {"acting": 0.0, "shadow": 0.0}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        means = mean_service_s[arrivals.type_idx] if n_jobs else np.empty(0)
        service_s = np.maximum(rng.exponential(1.0, n_jobs) * means, 1e-9)
        jobs = Jobs(arrivals, service_s, means.astype(float))
        for role, factory in (("acting", acting), ("shadow", shadow)):
            run = SimRun(spec, jobs, router, np.random.default_rng(seed))
            record = run.run(guardrails_for(layout, factory()))
            totals[role] += 0.0 if n_jobs == 0 else record.area_job_s / n_jobs
    k = len(seeds)
    return CounterfactualEstimate(
        acting_mean_jct_s=totals["acting"] / k,
        shadow_mean_jct_s=totals["shadow"] / k,
        jobs=n_jobs,
        window_s=window.length_s,
        seeds=k,
        wall_ms=(time.perf_counter() - started) * 1e3,
    )


__all__ = [
    "DEFAULT_DRAIN_FACTOR",
    "CounterfactualEstimate",
    "ReplayWindow",
    "WindowTick",
    "replay_window",
]
