"""Queues and workers: the mechanics the simulator runs between decision points.

Each queue is a FIFO of job indices, or, when tenants have shares, a weighted fair queue over
the jobs' tenants (policies.fairshare.FairQueue: the service's rule and integers). Each of the `budget` homogeneous workers is assigned to at most
one queue and holds at most one loaded model. A worker serves only jobs of the queue whose model it
holds. When level 2 moves a worker, a busy worker first finishes its job (no preemption), then loads
the destination's model for that queue's `model_load_s`, then serves. While it loads (or drains
towards its new queue) it counts as loading for the destination.

The hot path (arrival, completion) touches only Python lists and one heap push; everything a policy
needs is computed on demand at ticks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from policies.fairshare import FairQueue, TenantShare
from policies.sim.engine import Engine

IDLE = 0
BUSY = 1
LOADING = 2

# At one instant: completions and finished loads first (they free capacity), then arrivals, then
# the level-2 tick, which therefore sees everything that happened at its time.
PRIORITY_WORKER = 0
PRIORITY_ARRIVAL = 1

# Route of a job: a queue index, or one of these.
UNROUTED = -1
REJECTED = -2

# Called with a job index whose route is UNROUTED; must set routes for it (and may for others).
RouteHook = Callable[[int], None]


class JobQueue(Protocol):
    """What the cluster needs of a queue's waiting jobs (a deque, or a FairQueue)."""

    def append(self, job: int, /) -> None: ...
    def popleft(self) -> int: ...
    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> int: ...


def _no_router(job: int) -> None:
    raise RuntimeError(f"job {job} needs routing but no router is attached")


class Cluster:
    """Queue and worker state, with the engine handlers that change it."""

    def __init__(
        self,
        engine: Engine,
        *,
        model_load_s: Sequence[float],
        budget: int,
        initial_allocation: Sequence[int],
        service_s: list[float],
        size_estimate_s: list[float],
        routes: list[int],
        tenants: tuple[str | None, ...] | None = None,
        shares: Mapping[str, TenantShare] | None = None,
        service_ewma_alpha: float = 0.0,
    ) -> None:
        """Workers of `initial_allocation` start with their queue's model loaded, at time 0.

        `service_s` and `routes` are per job (indexed like the arrival stream); the cluster writes
        the routes of jobs routed by the hook, and completion times into `completion_s`. With
        `shares` (tenant name or "*" -> share), each queue serves `tenants` (per job) by weighted
        fair queueing instead of in arrival order.
        """
        n_queues = len(model_load_s)
        if len(initial_allocation) != n_queues:
            raise ValueError("initial allocation needs one entry per queue")
        if any(a < 0 for a in initial_allocation) or sum(initial_allocation) > budget:
            raise ValueError(
                f"initial allocation {list(initial_allocation)} exceeds budget {budget}"
            )
        self.engine = engine
        self.model_load_s = list(model_load_s)
        self.budget = budget
        self.service_s = service_s
        self.size_estimate_s = size_estimate_s
        self.routes = routes
        # With a weight > 0, `service_ewma` follows each queue's completed service times as the
        # live workers measure theirs (NaN before the first completion).
        self.service_ewma_alpha = service_ewma_alpha
        self.service_ewma: list[float] = [float("nan")] * n_queues
        self.completion_s: list[float] = [float("nan")] * len(service_s)
        self.route_hook: RouteHook = _no_router

        self.fifos: list[JobQueue]
        if shares:
            job_tenants = tenants if tenants is not None else (None,) * len(service_s)
            self.fifos = [FairQueue(shares, job_tenants) for _ in range(n_queues)]
        else:
            self.fifos = [deque() for _ in range(n_queues)]
        # Sum of the size estimates waiting in each FIFO, kept as jobs come and go because level 1
        # reads it for every routed job; reset to 0 when a FIFO empties so rounding cannot drift.
        self.backlog_s: list[float] = [0.0] * n_queues
        # Bumped by every change of which worker is ready or loading where (never on the hot path),
        # so per-queue worker counts can be cached between such changes.
        self.topology_version = 0
        self._counts_cache: tuple[int, list[int], list[int]] = (-1, [], [])
        # Idle workers ready to serve queue q (assigned to q, model q loaded).
        self.idle: list[list[int]] = [[] for _ in range(n_queues)]
        self.w_assigned: list[int] = []
        self.w_model: list[int] = []
        self.w_state: list[int] = []
        self.w_job: list[int] = [-1] * budget
        self.w_load_start_s: list[float] = [0.0] * budget
        # Bumped whenever a load is cancelled, so its stale completion event is recognised.
        self.w_load_gen: list[int] = [0] * budget
        for q, count in enumerate(initial_allocation):
            for _ in range(count):
                self.idle[q].append(len(self.w_assigned))
                self.w_assigned.append(q)
                self.w_model.append(q)
                self.w_state.append(IDLE)
        while len(self.w_assigned) < budget:
            self.w_assigned.append(-1)
            self.w_model.append(-1)
            self.w_state.append(IDLE)

        self.kind_arrival = engine.register(self.on_arrival)
        self.kind_complete = engine.register(self.on_complete)
        self.kind_loaded = engine.register(self.on_loaded)

        # Accounting. Busy seconds are added when service starts; `busy_worker_s()` removes the
        # part of in-flight jobs that lies in the future.
        self._busy_s = 0.0
        self.loading_worker_s = 0.0
        self.model_loads = 0
        self.reconfigurations = 0
        self.rejected = 0
        self.completed = 0
        self.in_system = 0
        # Integral of jobs-in-system over time, kept from event times only: checked against the
        # per-job completion records by Little's law.
        self.area_job_s = 0.0
        self.last_change_s = 0.0

    # --- hot path -------------------------------------------------------------------------------

    def on_arrival(self, job: int) -> None:
        """A job arrives: route it if needed, then start it on an idle worker or enqueue it."""
        q = self.routes[job]
        if q < 0:
            if q == UNROUTED:
                self.route_hook(job)
                q = self.routes[job]
            if q < 0:
                self.rejected += 1
                return
        now_s = self.engine.now_s
        self.area_job_s += self.in_system * (now_s - self.last_change_s)
        self.last_change_s = now_s
        self.in_system += 1
        idle = self.idle[q]
        if idle:
            w = idle.pop()
            self._start(w, job, now_s)
        else:
            self.fifos[q].append(job)
            self.backlog_s[q] += self.size_estimate_s[job]

    def on_complete(self, w: int) -> None:
        """Worker `w` finishes its job, then takes the next job of its queue or moves on."""
        now_s = self.engine.now_s
        job = self.w_job[w]
        self.completion_s[job] = now_s
        self.completed += 1
        if self.service_ewma_alpha:
            m = self.w_model[w]
            e = self.service_ewma[m]
            svc = self.service_s[job]
            self.service_ewma[m] = svc if e != e else e + self.service_ewma_alpha * (svc - e)
        self.area_job_s += self.in_system * (now_s - self.last_change_s)
        self.last_change_s = now_s
        self.in_system -= 1
        q = self.w_model[w]
        if self.w_assigned[w] != q:
            self._leave(w, now_s)
            return
        self._serve_next(w, now_s)

    # --- worker moves ---------------------------------------------------------------------------

    def _serve_next(self, w: int, now_s: float) -> None:
        """Ready worker `w` takes the next job of its queue, or goes idle."""
        q = self.w_model[w]
        fifo = self.fifos[q]
        if fifo:
            job = fifo.popleft()
            self.backlog_s[q] = self.backlog_s[q] - self.size_estimate_s[job] if fifo else 0.0
            self._start(w, job, now_s)
        else:
            self.w_state[w] = IDLE
            self.idle[q].append(w)

    def _start(self, w: int, job: int, now_s: float) -> None:
        """Worker `w` starts `job` now; its completion is scheduled."""
        self.w_state[w] = BUSY
        self.w_job[w] = job
        svc = self.service_s[job]
        self._busy_s += svc
        self.engine.schedule_at(now_s + svc, PRIORITY_WORKER, self.kind_complete, w)

    def _leave(self, w: int, now_s: float) -> None:
        """Idle worker `w` (not in any idle list) heads for its assigned queue, or waits unassigned."""
        dest = self.w_assigned[w]
        self.w_state[w] = IDLE
        self.topology_version += 1
        if dest < 0:
            return
        if self.w_model[w] == dest:
            self._serve_next(w, now_s)
            return
        load_s = self.model_load_s[dest]
        self.model_loads += 1
        self.w_model[w] = -1
        if load_s <= 0:
            self.w_model[w] = dest
            self._serve_next(w, now_s)
            return
        self.w_state[w] = LOADING
        self.w_load_start_s[w] = now_s
        self.w_load_gen[w] += 1
        arg = self.w_load_gen[w] * self.budget + w
        self.engine.schedule_at(now_s + load_s, PRIORITY_WORKER, self.kind_loaded, arg)

    def on_loaded(self, arg: int) -> None:
        """A worker finished loading its destination's model (unless that load was cancelled)."""
        gen, w = divmod(arg, self.budget)
        if gen != self.w_load_gen[w] or self.w_state[w] != LOADING:
            return
        now_s = self.engine.now_s
        self.topology_version += 1
        self.loading_worker_s += now_s - self.w_load_start_s[w]
        self.w_model[w] = self.w_assigned[w]
        self._serve_next(w, now_s)

    def _cancel_load(self, w: int, now_s: float) -> None:
        self.loading_worker_s += now_s - self.w_load_start_s[w]
        self.w_load_gen[w] += 1
        self.w_state[w] = IDLE

    def set_target(self, target: Sequence[int]) -> int:
        """Moves workers so queue q has `target[q]` assigned; returns how many changed queue.

        Workers leave a queue in this order: idle, committed but not yet loading (still busy on
        another queue's job), loading, busy (they finish their job first). A queue that gains
        workers takes, in order: free workers that still hold its model (no load), other idle
        workers (they start loading now), then busy ones (they load after their job). Ties go to
        the lowest worker index, so moves are deterministic.
        """
        n_queues = len(self.fifos)
        if len(target) != n_queues:
            raise ValueError(f"target needs {n_queues} entries, got {len(target)}")
        if any(t < 0 for t in target) or sum(target) > self.budget:
            raise ValueError(f"target {list(target)} is negative or exceeds budget {self.budget}")
        now_s = self.engine.now_s
        self.topology_version += 1
        assigned = self.w_assigned
        state = self.w_state
        model = self.w_model
        counts = [0] * n_queues
        for a in assigned:
            if a >= 0:
                counts[a] += 1
        previous = list(assigned)

        def release_rank(w: int) -> int:
            q = assigned[w]
            if state[w] == IDLE and model[w] == q:
                return 0
            if state[w] == BUSY and model[w] != q:
                return 1
            if state[w] == LOADING:
                return 2
            return 3

        for q in range(n_queues):
            surplus = counts[q] - target[q]
            if surplus <= 0:
                continue
            members = sorted((w for w in range(self.budget) if assigned[w] == q), key=release_rank)
            for w in members[:surplus]:
                if state[w] == IDLE and model[w] == q:
                    self.idle[q].remove(w)
                elif state[w] == LOADING:
                    self._cancel_load(w, now_s)
                    model[w] = -1
                assigned[w] = -1

        free = [w for w in range(self.budget) if assigned[w] < 0]
        for q in range(n_queues):
            deficit = target[q] - counts[q]
            if deficit <= 0:
                continue

            def gain_rank(w: int, q: int = q) -> int:
                if model[w] == q:
                    return 0
                return 1 if state[w] == IDLE else 2

            free.sort(key=gain_rank)
            chosen, free = free[:deficit], free[deficit:]
            for w in chosen:
                assigned[w] = q
                if state[w] == IDLE:
                    self._leave(w, now_s)
                # A busy worker moves on from on_complete; a busy one serving q just stays.
        return sum(1 for w in range(self.budget) if assigned[w] >= 0 and assigned[w] != previous[w])

    # --- observation ----------------------------------------------------------------------------

    def busy_worker_s(self) -> float:
        """Worker-seconds spent serving jobs up to now."""
        future_s = 0.0
        now_s = self.engine.now_s
        for time_s, kind, _ in self.engine.pending():
            if kind == self.kind_complete and time_s > now_s:
                future_s += time_s - now_s
        return self._busy_s - future_s

    def loading_worker_s_now(self) -> float:
        """Worker-seconds spent loading models up to now, counting loads still in progress."""
        now_s = self.engine.now_s
        partial = sum(
            now_s - self.w_load_start_s[w] for w in range(self.budget) if self.w_state[w] == LOADING
        )
        return self.loading_worker_s + partial

    def ready_busy_loading(self) -> tuple[list[int], list[int], list[int]]:
        """Per queue: workers ready, busy (subset of ready) and loading, as in `QueueView`.

        Cheap between topology changes: ready and loading are cached, and busy = ready - idle.
        """
        version, ready, loading = self._counts_cache
        if version != self.topology_version:
            ready, _, loading, _ = self.worker_counts()
            self._counts_cache = (self.topology_version, ready, loading)
        busy = [r - len(idle) for r, idle in zip(ready, self.idle, strict=True)]
        return ready, busy, loading

    def worker_counts(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """Per queue: workers ready (model loaded), busy (subset of ready), loading, in service.

        Loading includes workers committed to the queue but still finishing another queue's job.
        In service counts jobs of the queue being served, by any worker (also ones moving away).
        """
        n_queues = len(self.fifos)
        ready = [0] * n_queues
        busy = [0] * n_queues
        loading = [0] * n_queues
        serving = [0] * n_queues
        for w in range(self.budget):
            a = self.w_assigned[w]
            m = self.w_model[w]
            s = self.w_state[w]
            if s == BUSY:
                serving[m] += 1
            if a < 0:
                continue
            if m == a and s != LOADING:
                ready[a] += 1
                if s == BUSY:
                    busy[a] += 1
            else:
                loading[a] += 1
        return ready, busy, loading, serving

    def allocation(self) -> list[int]:
        """Workers assigned to each queue."""
        counts = [0] * len(self.fifos)
        for a in self.w_assigned:
            if a >= 0:
                counts[a] += 1
        return counts
