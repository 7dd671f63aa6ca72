"""One simulation run: arrivals -> level 1 -> queues -> level-2 ticks -> workers -> completions.

`SimRun` exposes the level-2 tick as an explicit decision point, so a training loop can drive it:

    run = SimRun(spec, jobs, router, rng)
    while (view := run.advance_to_next_tick()) is not None:
        run.apply(policy(view))
    record = run.record()

`run.run(allocator)` is that loop with a heuristic `Allocator`.

Level 1 is consulted per arrival instant, with every job arriving at that instant in one batch. A job
type that exactly one queue accepts is routed there without asking the router: any router that
respects eligibility must choose that queue, and skipping the call keeps the hot loop free of views.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from policies.fairshare import FairQueue, TenantShare
from policies.sim.cluster import PRIORITY_ARRIVAL, REJECTED, UNROUTED, Cluster
from policies.sim.engine import Engine
from policies.sim.metrics import RunRecord, TimeSeries
from policies.sim.workloads import ArrivalTable
from policies.views import (
    Allocation,
    Allocator,
    ClusterView,
    JobView,
    QueueView,
    Rejection,
    Router,
)

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class QueueSpec:
    """One queue as the simulator needs it."""

    name: str
    job_types: frozenset[str]
    model_load_s: float = 0.0
    slo_s: float | None = None
    # Mean service seconds assumed before any job was routed here.
    nominal_service_s: float = 1.0


@dataclass(frozen=True)
class SimSpec:
    """Everything about a run except the jobs and the policies."""

    queues: tuple[QueueSpec, ...]
    budget: int
    # Workers per queue at time 0, models already loaded.
    initial_allocation: tuple[int, ...]
    tick_s: float
    # Arrivals stop here; without draining the run stops here too.
    horizon_s: float
    # Keep running after the horizon until every accepted job is done (or `max_drain_s` passes).
    drain: bool = True
    max_drain_s: float = math.inf
    # Time constant of the arrival-rate estimate the views carry.
    rate_window_s: float = 10.0
    slo_by_type_s: Mapping[str, float] = field(default_factory=dict)
    default_slo_s: float | None = None
    # Tenant shares ("*": the others): queues serve tenants by weighted fair queueing, as the
    # service does with its `tenants:` section; empty: arrival order.
    tenants: Mapping[str, TenantShare] = field(default_factory=dict)
    # Seconds from a job's arrival to its reaching its queue (the live service's dispatch, see
    # policies/sim/calibration.py); its JCT still counts from the arrival.
    dispatch_s: float = 0.0
    # How the views estimate a queue's service time: None, the mean size estimate of the jobs
    # routed there (the ideal); a weight in (0, 1], an EWMA of the queue's completed service
    # times with that weight per job, as the live workers measure it, `default_service_s` (else
    # the queue's nominal) before its first completion.
    service_ewma_alpha: float | None = None
    default_service_s: float | None = None

    def __post_init__(self) -> None:
        if len(self.initial_allocation) != len(self.queues):
            raise ValueError("initial_allocation needs one entry per queue")
        if self.tick_s <= 0 or self.budget < 0 or self.horizon_s < 0 or self.dispatch_s < 0:
            raise ValueError("tick_s must be > 0, budget, horizon_s and dispatch_s >= 0")
        if len({q.name for q in self.queues}) != len(self.queues):
            raise ValueError("queue names must be unique")


@dataclass(frozen=True, eq=False)
class Jobs:
    """The arrivals of a run with their drawn service times and a-priori size estimates."""

    arrivals: ArrivalTable
    service_s: FloatArray
    size_estimate_s: FloatArray

    def __post_init__(self) -> None:
        n = len(self.arrivals)
        if len(self.service_s) != n or len(self.size_estimate_s) != n:
            raise ValueError("service_s and size_estimate_s need one entry per arrival")
        if n and not (np.all(self.service_s > 0) and np.all(np.isfinite(self.service_s))):
            raise ValueError("service times must be finite and > 0")


class SimRun:
    """A run that stops at every level-2 tick; see the module docstring."""

    def __init__(self, spec: SimSpec, jobs: Jobs, router: Router, rng: np.random.Generator) -> None:
        self.spec = spec
        self.jobs = jobs
        self.router = router
        self.rng = rng
        self._started = time.perf_counter()
        arrivals = jobs.arrivals
        # When each job reaches level 1 (its arrival plus the dispatch delay, if modelled).
        self._arrival_s: list[float] = (arrivals.arrival_s + spec.dispatch_s).tolist()
        self._size_s: list[float] = jobs.size_estimate_s.tolist()
        self._queue_index = {q.name: i for i, q in enumerate(spec.queues)}
        self._eligible: list[list[int]] = [
            [i for i, q in enumerate(spec.queues) if job_type in q.job_types]
            for job_type in arrivals.job_types
        ]
        forced = np.array(
            [e[0] if len(e) == 1 else UNROUTED for e in self._eligible] or [UNROUTED],
            dtype=np.int64,
        )
        routes: list[int] = forced[arrivals.type_idx].tolist() if len(arrivals) else []
        self.engine = Engine()
        self.cluster = Cluster(
            self.engine,
            model_load_s=[q.model_load_s for q in spec.queues],
            budget=spec.budget,
            initial_allocation=spec.initial_allocation,
            service_s=jobs.service_s.tolist(),
            size_estimate_s=self._size_s,
            routes=routes,
            tenants=arrivals.tenants,
            shares=spec.tenants,
            service_ewma_alpha=spec.service_ewma_alpha or 0.0,
        )
        self.cluster.route_hook = self._route
        self.engine.set_stream(self._arrival_s, self.cluster.kind_arrival, PRIORITY_ARRIVAL)
        self.rejection_reasons: dict[str, int] = {}

        n_queues = len(spec.queues)
        self._rate_per_s = [0.0] * n_queues
        self._rate_known = False
        self._routed_count = np.zeros(n_queues)
        self._routed_size_s = np.zeros(n_queues)
        self._counted_upto = 0
        self._next_tick_s = spec.tick_s
        self._end_s: float | None = None
        self._ticks: list[tuple[float, list[int], list[int], list[int], list[int]]] = []

    # --- level 1 --------------------------------------------------------------------------------

    def _route(self, job: int) -> None:
        """Routes every unrouted job arriving at `job`'s instant, in one router call."""
        at_s = self._arrival_s[job]
        routes = self.cluster.routes
        batch = [job]
        k = job + 1
        while k < len(self._arrival_s) and self._arrival_s[k] == at_s:
            if routes[k] == UNROUTED:
                batch.append(k)
            k += 1
        arrivals = self.jobs.arrivals
        views = [self._job_view(i) for i in batch]
        eligible = sorted({q for i in batch for q in self._eligible[int(arrivals.type_idx[i])]})
        counts = self.cluster.ready_busy_loading()
        queue_views = [self._queue_view(q, counts) for q in eligible]
        decisions = self.router.route_batch(views, queue_views, self.rng)
        if len(decisions) != len(batch):
            raise ValueError(
                f"router {self.router.name!r} returned {len(decisions)} decisions "
                f"for {len(batch)} jobs"
            )
        for i, decision in zip(batch, decisions, strict=True):
            if isinstance(decision, Rejection):
                routes[i] = REJECTED
                self.rejection_reasons[decision.reason] = (
                    self.rejection_reasons.get(decision.reason, 0) + 1
                )
                continue
            q = self._queue_index.get(decision, -1)
            if q not in self._eligible[int(arrivals.type_idx[i])]:
                raise ValueError(
                    f"router {self.router.name!r} sent job {i} of type "
                    f"{arrivals.job_types[int(arrivals.type_idx[i])]!r} to {decision!r}, "
                    "which does not accept it"
                )
            routes[i] = q

    def _job_view(self, i: int) -> JobView:
        a = self.jobs.arrivals
        deadline = float(a.deadline_s[i])
        return JobView(
            job_id=str(i),
            job_type=a.job_types[int(a.type_idx[i])],
            arrival_s=self._arrival_s[i],
            size_estimate_s=self._size_s[i],
            priority=int(a.priority[i]),
            deadline_s=None if math.isnan(deadline) else self._arrival_s[i] + deadline,
            tenant=None if a.tenants is None else a.tenants[i],
        )

    # --- views ----------------------------------------------------------------------------------

    def _queue_view(self, q: int, counts: tuple[list[int], list[int], list[int]]) -> QueueView:
        spec = self.spec.queues[q]
        ready, busy, loading = counts
        fifo = self.cluster.fifos[q]
        now_s = self.engine.now_s
        if self.spec.service_ewma_alpha:
            measured = self.cluster.service_ewma[q]
            default_s = self.spec.default_service_s
            fallback_s = spec.nominal_service_s if default_s is None else default_s
            service_s = fallback_s if math.isnan(measured) else measured
        else:
            routed = self._routed_count[q]
            service_s = self._routed_size_s[q] / routed if routed > 0 else spec.nominal_service_s
        return QueueView(
            name=spec.name,
            job_types=spec.job_types,
            depth=len(fifo),
            backlog_s=max(self.cluster.backlog_s[q], 0.0),
            oldest_wait_s=now_s - self._arrival_s[fifo[0]] if fifo else 0.0,
            arrival_rate_per_s=self._rate_per_s[q],
            service_time_s=float(service_s),
            workers_ready=ready[q],
            workers_busy=busy[q],
            workers_loading=loading[q],
            model_load_s=spec.model_load_s,
            slo_s=spec.slo_s,
            tenant_depths=(
                {t or "": n for t, n in fifo.depths.items()} if isinstance(fifo, FairQueue) else {}
            ),
        )

    def view(self) -> ClusterView:
        """What level 2 sees now."""
        counts = self.cluster.ready_busy_loading()
        return ClusterView(
            now_s=self.engine.now_s,
            tick_s=self.spec.tick_s,
            budget=self.spec.budget,
            queues=tuple(self._queue_view(q, counts) for q in range(len(self.spec.queues))),
        )

    def _update_estimates(self, elapsed_s: float) -> None:
        """Folds the arrivals since the last tick into the per-queue rate and size estimates."""
        upto = self.engine.stream_pos
        start = self._counted_upto
        self._counted_upto = upto
        n_queues = len(self.spec.queues)
        routes = np.asarray(self.cluster.routes[start:upto], dtype=np.int64)
        accepted = routes >= 0
        routes = routes[accepted]
        counts = np.bincount(routes, minlength=n_queues).astype(float)
        sizes = self.jobs.size_estimate_s[start:upto][accepted]
        self._routed_count += counts
        self._routed_size_s += np.bincount(routes, weights=sizes, minlength=n_queues)
        if elapsed_s <= 0:
            return
        observed = counts / elapsed_s
        if not self._rate_known:
            self._rate_per_s = observed.tolist()
            self._rate_known = True
            return
        alpha = 1.0 - math.exp(-elapsed_s / self.spec.rate_window_s)
        self._rate_per_s = [
            r + alpha * (o - r) for r, o in zip(self._rate_per_s, observed.tolist(), strict=True)
        ]

    @property
    def routed_jobs(self) -> np.ndarray:
        """Jobs routed to each queue so far (up to the last tick), in queue order; a copy."""
        return self._routed_count.copy()

    # --- level 2 --------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the run has ended; `record()` is then final."""
        return self._end_s is not None

    @property
    def now_s(self) -> float:
        return self.engine.now_s

    def advance_to_next_tick(self) -> ClusterView | None:
        """Runs events up to the next tick and returns the view there; None when the run is over.

        Ticks fall at multiples of `tick_s`. Without draining the run ends at the horizon; with
        draining, at the first tick after the horizon at which no accepted job is left (or when
        `max_drain_s` has passed).
        """
        if self._end_s is not None:
            return None
        spec = self.spec
        tick_s = self._next_tick_s
        stop_s = spec.horizon_s if not spec.drain else spec.horizon_s + spec.max_drain_s
        before_s = self.engine.now_s
        if tick_s >= stop_s:
            self.engine.run(until=stop_s)
            self._finish(stop_s)
            return None
        self.engine.run(until=tick_s)
        self._next_tick_s = tick_s + spec.tick_s
        self._update_estimates(tick_s - before_s)
        arrivals_over = self.engine.stream_pos >= len(self._arrival_s)
        if (
            spec.drain
            and arrivals_over
            and tick_s >= spec.horizon_s
            and self.cluster.in_system == 0
        ):
            self._finish(tick_s)
            return None
        view = self.view()
        depth = [q.depth for q in view.queues]
        loading = [q.workers_loading for q in view.queues]
        serving = self.cluster.worker_counts()[3]
        self._ticks.append((tick_s, depth, serving, self.cluster.allocation(), loading))
        return view

    def apply(self, allocation: Allocation) -> int:
        """Sets level 2's target {queue: workers} (missing queues get 0); returns workers moved."""
        unknown = sorted(set(allocation) - set(self._queue_index))
        if unknown:
            raise ValueError(f"allocation names unknown queues {unknown}")
        target = [int(allocation.get(q.name, 0)) for q in self.spec.queues]
        moved = self.cluster.set_target(target)
        self.cluster.reconfigurations += moved
        if self._ticks:
            self._ticks[-1] = (*self._ticks[-1][:3], self.cluster.allocation(), self._ticks[-1][4])
        return moved

    def run(
        self, allocator: Allocator, progress: Callable[[float], None] | None = None
    ) -> RunRecord:
        """Drives the run to its end with `allocator` at every tick; `progress` gets sim time."""
        while (view := self.advance_to_next_tick()) is not None:
            self.apply(allocator.allocate(view))
            if progress is not None:
                progress(view.now_s)
        return self.record()

    def _finish(self, end_s: float) -> None:
        cluster = self.cluster
        cluster.area_job_s += cluster.in_system * (end_s - cluster.last_change_s)
        cluster.last_change_s = end_s
        self._end_s = end_s

    # --- outcome --------------------------------------------------------------------------------

    def slo_targets(self, queue_idx: NDArray[np.int64]) -> FloatArray:
        """Each job's JCT target (see `slo_targets`) given the queue it went to."""
        return slo_targets(self.spec, self.jobs.arrivals, queue_idx)

    def record(self, wall_s: float | None = None) -> RunRecord:
        """The run's raw outcome so far (final once `done`); wall time defaults to time since start."""
        end_s = self._end_s if self._end_s is not None else self.engine.now_s
        cluster = self.cluster
        queue_idx = np.asarray(cluster.routes, dtype=np.int64)
        delivered = self.engine.stream_pos
        # Jobs not yet delivered have not arrived; they must not count as routed.
        queue_idx[delivered:] = UNROUTED
        ticks = self._ticks
        n_queues = len(self.spec.queues)

        def column(i: int) -> NDArray[np.int64]:
            rows = [t[i] for t in ticks]
            return np.array(rows, dtype=np.int64).reshape(len(ticks), n_queues)

        series = TimeSeries(
            t_s=np.array([t[0] for t in ticks], dtype=float),
            depth=column(1),
            in_service=column(2),
            allocation=column(3),
            workers_loading=column(4),
        )
        arrival_s = self.jobs.arrivals.arrival_s
        # Arrivals after the end never happened in this run.
        arrival_view = np.where(np.arange(len(arrival_s)) < delivered, arrival_s, math.inf)
        return RunRecord(
            queue_names=tuple(q.name for q in self.spec.queues),
            arrival_s=arrival_view,
            completion_s=np.array(cluster.completion_s, dtype=float),
            queue_idx=queue_idx,
            slo_target_s=self.slo_targets(queue_idx),
            end_s=end_s,
            budget=self.spec.budget,
            busy_worker_s=cluster.busy_worker_s(),
            loading_worker_s=cluster.loading_worker_s_now(),
            reconfigurations=cluster.reconfigurations,
            model_loads=cluster.model_loads,
            rejected=cluster.rejected,
            area_job_s=cluster.area_job_s,
            timeseries=series,
            wall_s=time.perf_counter() - self._started if wall_s is None else wall_s,
        )


def slo_targets(spec: SimSpec, a: ArrivalTable, queue_idx: NDArray[np.int64]) -> FloatArray:
    """Each job's JCT target: deadline, else its type's SLO, else its queue's (per `queue_idx`,
    negative for none), else the default; NaN when none applies."""
    target = a.deadline_s.copy()
    by_type = np.array([spec.slo_by_type_s.get(t, math.nan) for t in a.job_types] or [math.nan])
    target = np.where(np.isnan(target), by_type[a.type_idx] if len(a) else target, target)
    by_queue = np.array(
        [math.nan if q.slo_s is None else q.slo_s for q in spec.queues] + [math.nan]
    )
    # Index -1 (and the rejected -2 wraps to the last queue) must not pick a queue's SLO.
    safe_q = np.where(queue_idx >= 0, queue_idx, len(spec.queues))
    target = np.where(np.isnan(target), by_queue[safe_q], target)
    default = math.nan if spec.default_slo_s is None else spec.default_slo_s
    return np.where(np.isnan(target), default, target)


def initial_split(budget: int, weights: Sequence[float]) -> tuple[int, ...]:
    """`budget` workers split in proportion to `weights` by largest remainder (ties: first)."""
    total = float(sum(weights))
    if total <= 0:
        weights = [1.0] * len(weights)
        total = float(len(weights))
    exact = [budget * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: budget - sum(counts)]:
        counts[i] += 1
    return tuple(counts)
