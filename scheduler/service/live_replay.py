"""Replay a scenario's exact jobs through the live service and the simulator, side by side.

    plan = plan_replay(prepare(scenario, seed), speed=10, calibration=MEASURED)
    with replay_service(plan, policy="switch_aware") as service:     # Ray, Redis, control plane
        plan = plan.starting_from(service.settled)
        live = asyncio.run(submit_and_collect(plan, service.settings))
    sim = simulate_plan(plan, policy="switch_aware")

The service serves the compressed scenario (policies/sim/timescale.py): its queues, routing and
allocation with every duration divided by the speed, and allocation.initial set to the
simulator's initial allocation. Its policy acts from its first tick, on the empty system, while
the initial workers load; `replay_service` returns once the allocation has settled with every
worker ready, and both runs start from that allocation (`ReplayPlan.starting_from`). Its handlers are workers/synthetic.py's: a job sleeps the
service time it carries in its payload (the simulator's own draw), a model load sleeps the
queue's load time.

Jobs are submitted at their arrival times in real time (all jobs due at one instant in one
round trip); the live JCT of a job is its record's finished_s - created_s (the service's own
times, so a late submit does not count against it). Reconfigurations come from the controller's
allocation history.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from policies.guardrails import guardrails_for
from policies.registry import ALLOCATORS, ROUTERS
from policies.sim.metrics import RunRecord, summarize
from policies.sim.run import slo_targets
from policies.sim.scenario import PreparedRun, make_allocator_for, make_router_for
from policies.sim2real import LiveEstimators, ReplayPlan, live_record, moves_in_history
from policies.views import Allocator, Router
from scheduler.checkpoints import resolve_allocator, resolve_router
from scheduler.client import AsyncClient, JobRequest
from scheduler.config import ServiceConfig
from scheduler.errors import BilevelError, JobTimeout
from scheduler.keys import Keys
from scheduler.models import Job, JobStatus
from scheduler.settings import Settings

FloatArray = NDArray[np.float64]

# Seconds between the service's start and the first arrival, so the first submit is on time.
LEAD_S = 0.2
# Longest wait for the initial workers to start and load their models, beyond the loads
# themselves: starting a worker actor takes seconds, and over a minute on a busy small machine.
READY_TIMEOUT_S = 180.0
# The published allocation must hold this many ticks (and at least SETTLE_MIN_S) before a replay
# starts from it.
SETTLE_TICKS = 5
SETTLE_MIN_S = 0.5
# Job records read per round of concurrent reads.
READ_CHUNK = 256


def live_estimators() -> LiveEstimators:
    """How this service's views estimate arrival rates (scheduler.service.views) and service
    times (the workers' EWMA), for the simulator to estimate alike."""
    from scheduler.service.views import DEFAULT_RATE_HALF_LIFE_S, DEFAULT_SERVICE_TIME_S
    from workers.model_worker import SERVICE_EWMA_ALPHA

    return LiveEstimators(
        rate_window_s=DEFAULT_RATE_HALF_LIFE_S / math.log(2),
        service_ewma_alpha=SERVICE_EWMA_ALPHA,
        default_service_s=DEFAULT_SERVICE_TIME_S,
    )


class ReplayError(BilevelError):
    """The replay could not run (a service that never got ready, a Redis that went away)."""


def allocator_for(prepared: PreparedRun, policy: str | None) -> Allocator:
    """The simulator's allocator for `policy` as `bilevel simulate` builds it: a heuristic via the
    scenario (its params and guardrails), or a learned policy under the same guardrails."""
    scenario = prepared.scenario
    if policy is None or policy in ALLOCATORS:
        return make_allocator_for(scenario, policy)
    return guardrails_for(scenario, resolve_allocator(policy, bounds=scenario.bounds()))


def router_for(prepared: PreparedRun, router: str | None) -> Router:
    if router is None or router in ROUTERS:
        return make_router_for(prepared.scenario, router)
    return resolve_router(router)


def simulate_plan(
    plan: ReplayPlan, policy: str | None, router: str | None
) -> tuple[RunRecord, dict[str, Any]]:
    """The simulator's run of the plan (calibrated, compressed) and its summary dict."""
    started = time.perf_counter()
    run = plan.sim.start(router_for(plan.sim, router))
    record = run.run(allocator_for(plan.sim, policy))
    record = run.record(wall_s=time.perf_counter() - started)
    return record, summarize(record).to_dict()


def live_config(
    plan: ReplayPlan,
    *,
    store: Mapping[str, Any],
    policy: str | None = None,
    router: str | None = None,
) -> ServiceConfig:
    """The service config that serves the plan's compressed scenario with synthetic handlers,
    starting from the simulator's initial allocation; `policy` and `router` replace the
    scenario's (with their default parameters, as `simulate --policy` does)."""
    from workers.synthetic import SYNTHETIC_HANDLERS_ENV

    scenario = plan.live.scenario
    allocation = scenario.allocation
    spec = plan.live.spec
    initial = {q.name: n for q, n in zip(spec.queues, spec.initial_allocation, strict=True)}
    update: dict[str, Any] = {"initial": initial}
    if policy is not None and policy != allocation.policy:
        update |= {"policy": policy, "params": {}}
    routing = scenario.routing
    if router is not None and router != routing.policy:
        routing = routing.model_copy(update={"policy": router, "params": {}})
    scenario = scenario.model_copy(
        update={"allocation": allocation.model_copy(update=update), "routing": routing}
    )
    handlers = json.dumps(plan.handlers())
    return ServiceConfig.from_scenario(
        scenario,
        source=f"replay of {plan.live.scenario.name}",
        store=dict(store),
        handlers=["workers.synthetic"],
        runtime_env={"env_vars": {SYNTHETIC_HANDLERS_ENV: handlers}},
        # One job per lease, as the simulator's workers take them.
        worker={"max_batch": 1},
        # Every tick a full one, as in the simulator.
        allocation={"idle_tick_s": min(25.0, scenario.allocation.tick_s)},
    )


def register_here(plan: ReplayPlan) -> None:
    """Register the plan's synthetic handlers in this process (the workers register theirs from
    the runtime_env when they import workers.synthetic)."""
    from workers.registry import REGISTRY
    from workers.synthetic import SYNTHETIC_HANDLERS_ENV, register_synthetic

    handlers = plan.handlers()
    os.environ[SYNTHETIC_HANDLERS_ENV] = json.dumps(handlers)
    register_synthetic(REGISTRY, handlers)


@dataclass
class ReplayService:
    """The service a replay runs against: started here (then `handle` stops it) or found at a
    Redis URL."""

    settings: Settings
    handle: Any = None
    started_ray: bool = False
    # Workers per queue the service settled at before the first arrival (see ReplayPlan.
    # starting_from); empty until it has.
    settled: dict[str, int] = field(default_factory=dict)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop what this replay started (control plane, workers, embedded Redis, Ray)."""
        if self.handle is not None:
            self.handle.stop(timeout_s=timeout_s)
            self.handle = None
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False


@contextlib.contextmanager
def replay_service(
    plan: ReplayPlan,
    *,
    policy: str | None = None,
    router: str | None = None,
    namespace: str | None = None,
    redis_url: str | None = None,
    stop_timeout_s: float = 30.0,
) -> Iterator[ReplayService]:
    """Start the service for `plan` (Ray if not running, an embedded Redis unless `redis_url`),
    wait until its initial workers serve, yield it, and stop everything it started, also when
    the body raises or is interrupted."""
    import ray

    from scheduler.service.handler_code import prepare_handler_code
    from scheduler.service.runner import ensure_ray, start_service

    register_here(plan)
    store: dict[str, Any] = {
        "namespace": namespace or f"replay{os.urandom(4).hex()}",
        # A lease outlives any one sleeping job (jobs are at most synthetic.MAX_SERVICE_S).
        "lease_s": 30.0,
        "require_service": False,
    }
    if redis_url is not None:
        store["redis_url"] = redis_url
    config = live_config(plan, store=store, policy=policy, router=router)
    code = prepare_handler_code(config)
    service = ReplayService(settings=config.store)
    service.started_ray = not ray.is_initialized()
    try:
        if service.started_ray:
            # The actors log every tick and job: a replay's report must not drown in them.
            ensure_ray(runtime_env=code.runtime_env, log_to_driver=False)
        handle = start_service(code.config, redis_url=redis_url, handler_code=code, wait_s=30.0)
        service.handle = handle
        service.settings = handle.config.store
        service.settled = asyncio.run(wait_ready(plan, service.settings))
        yield service
    finally:
        service.stop(stop_timeout_s)


async def _published(client: AsyncClient) -> dict[str, Any] | None:
    raw = await client.store.redis.get(client.store.keys.allocation)
    if raw is None:
        return None
    state: dict[str, Any] = json.loads(raw)
    return state


async def wait_ready(plan: ReplayPlan, settings: Settings) -> dict[str, int]:
    """Until the controller's published allocation has settled: every queue's workers ready
    (models loaded, none loading or draining) and unchanged for SETTLE_TICKS ticks (at least
    SETTLE_MIN_S). Returns that allocation; ReplayError after the slowest load plus
    READY_TIMEOUT_S."""
    spec = plan.live.spec
    slowest_s = max((q.model_load_s for q in spec.queues), default=0.0)
    deadline = time.monotonic() + READY_TIMEOUT_S + slowest_s
    settle_s = max(SETTLE_TICKS * spec.tick_s, SETTLE_MIN_S)
    stable: dict[str, int] | None = None
    since = time.monotonic()
    state: dict[str, Any] | None = None
    async with AsyncClient(settings=settings) as client:
        while time.monotonic() < deadline:
            state = await _published(client)
            now = _settled(state)
            if now is None or now != stable:
                stable, since = now, time.monotonic()
            elif time.monotonic() - since >= settle_s:
                return now
            await asyncio.sleep(min(0.05, spec.tick_s / 2))
    raise ReplayError(
        f"the service's workers did not settle, all ready, within "
        f"{READY_TIMEOUT_S + slowest_s:.0f} s (last published state: {state})"
    )


def _settled(state: Mapping[str, Any] | None) -> dict[str, int] | None:
    """The published workers per queue when all of them are ready, else None."""
    if state is None:
        return None
    out = {}
    for name, q in (state.get("queues") or {}).items():
        if q.get("loading") or q.get("draining") or q.get("ready") != q.get("workers"):
            return None
        out[name] = int(q.get("workers") or 0)
    return out


@dataclass
class LiveOutcome:
    """What the live run measured, in real seconds since its start."""

    record: RunRecord
    submitted: int
    # Jobs whose record says failed or dead-lettered, and jobs unfinished when waiting stopped.
    failed: int
    unfinished: int
    submit_lag_s: list[float] = field(default_factory=list)
    # Per job: started -> finished minus the service time it slept (NaN if it did not finish).
    run_overhead_s: FloatArray = field(default_factory=lambda: np.zeros(0))

    @property
    def summary(self) -> dict[str, Any]:
        out = summarize(self.record).to_dict()
        out["submitted"] = self.submitted
        out["failed"] = self.failed
        out["unfinished"] = self.unfinished
        lag = np.asarray(self.submit_lag_s or [0.0])
        out["submit_lag_p99_s"] = float(np.percentile(lag, 99))
        overhead = self.run_overhead_s[~np.isnan(self.run_overhead_s)]
        # Real seconds, whatever the speed: what the handler's own time cost on top, this run.
        out["observed_overheads"] = {
            "run_overhead_mean_s": float(overhead.mean()) if len(overhead) else None,
            "run_overhead_p99_s": float(np.percentile(overhead, 99)) if len(overhead) else None,
        }
        return out


def _requests(plan: ReplayPlan) -> list[JobRequest]:
    a = plan.live.jobs.arrivals
    service_s = plan.live.jobs.service_s
    out = []
    for i in range(len(a)):
        out.append(
            JobRequest(
                a.job_types[int(a.type_idx[i])],
                {"service_s": round(float(service_s[i]), 6), "i": i},
                priority=int(a.priority[i]),
                tenant=None if a.tenants is None else a.tenants[i],
            )
        )
    return out


async def submit_and_collect(
    plan: ReplayPlan,
    settings: Settings,
    *,
    progress: Callable[[int, int], None] | None = None,
    max_wait_s: float | None = None,
) -> LiveOutcome:
    """Submit the plan's jobs at their (compressed) arrival times, wait for them, read their
    records. `progress(submitted, finished_or_total)` is called as jobs go out. Waiting ends
    when every job has finished or `max_wait_s` after the last submit (default: the run's
    max_drain_s); what is unfinished then counts as in the system."""
    arrival_s = plan.live.jobs.arrivals.arrival_s
    requests = _requests(plan)
    n = len(requests)
    ids: list[str] = []
    lags: list[float] = []
    history_key = Keys(settings.namespace).allocation_history
    async with AsyncClient(settings=settings) as client:
        wall0 = _on_tick_grid(await _published(client), plan.live.spec.tick_s)
        loop = asyncio.get_running_loop()
        t0 = loop.time() + (wall0 - time.time())
        i = 0
        while i < n:
            now = loop.time() - t0
            due = int(np.searchsorted(arrival_s, now, side="right"))
            if due > i:
                handles = await client.submit_many(requests[i:due])
                ids.extend(h.id for h in handles)
                lags.extend((now - arrival_s[i:due]).tolist())
                i = due
                if progress is not None:
                    progress(i, n)
                continue
            await asyncio.sleep(min(float(arrival_s[i]) - now, 0.05))
        wait_s = plan.live.spec.max_drain_s if max_wait_s is None else max_wait_s
        handles = [client.handle(job_id) for job_id in ids]
        with contextlib.suppress(JobTimeout):
            await client.gather(handles, timeout=wait_s, return_exceptions=True)
        end_wall = time.time()
        jobs: list[Job] = []
        for k in range(0, len(ids), READ_CHUNK):
            jobs.extend(await asyncio.gather(*(client.get(j) for j in ids[k : k + READ_CHUNK])))
        raw_history = await client.store.redis.lrange(history_key, 0, -1)
    history = [json.loads(h) for h in raw_history]
    # The allocation in force at the start (the initial one), then every change until the end.
    before = [h["workers"] for h in history if h["t_s"] < wall0][-1:]
    during = [h["workers"] for h in history if wall0 <= h["t_s"] <= end_wall]
    return _outcome(plan, jobs, wall0, end_wall, moves_in_history(before + during), lags)


def _on_tick_grid(state: Mapping[str, Any] | None, tick_s: float) -> float:
    """The wall time to start the arrivals at: LEAD_S from now or a little later, on the grid of
    the controller's ticks, so that its ticks fall where the simulator's do (at multiples of
    tick_s after the start) and see the same arrivals. The published state's t_s is when a
    tick read its view; the controller paces ticks tick_s apart from their starts."""
    earliest = time.time() + LEAD_S
    if state is None or not isinstance(state.get("t_s"), int | float):
        return earliest
    last = float(state["t_s"])
    # While the service is idle, the controller runs its full tick (the one that reads the view,
    # and so the rate estimates) every other tick: an even number of ticks after the last full
    # one, the full tick just before the start measures the arrivals from there, as the
    # simulator's first tick does (an odd one would make the first rate estimate half the rate).
    ticks = math.ceil((earliest - last) / tick_s)
    ticks += ticks % 2
    # Just after a tick: the simulator's tick at tick_s sees the arrivals up to it.
    return last + ticks * tick_s + min(0.002, tick_s / 100)


def _outcome(
    plan: ReplayPlan,
    jobs: list[Job],
    wall0: float,
    end_wall: float,
    moves: int,
    lags: list[float],
) -> LiveOutcome:
    names = [q.name for q in plan.live.spec.queues]
    index = {name: i for i, name in enumerate(names)}
    n = len(jobs)
    arrival = np.full(n, math.nan)
    start = np.full(n, math.nan)
    finish = np.full(n, math.nan)
    queue_idx = np.full(n, -1, dtype=np.int64)
    failed = unfinished = rejected = 0
    for k, job in enumerate(jobs):
        arrival[k] = job.created_s - wall0
        if job.queue is not None and job.queue in index:
            queue_idx[k] = index[job.queue]
        if job.started_s is not None:
            start[k] = job.started_s - wall0
        if job.status is JobStatus.SUCCEEDED and job.finished_s is not None:
            finish[k] = job.finished_s - wall0
        elif job.status.finished:
            failed += 1
            if queue_idx[k] < 0:
                rejected += 1
        else:
            unfinished += 1
    done = ~np.isnan(finish)
    end_s = max(float(np.max(finish[done])) if np.any(done) else 0.0, 0.0)
    if unfinished:
        end_s = max(end_s, end_wall - wall0)
    targets = slo_targets(plan.live.spec, plan.live.jobs.arrivals, queue_idx)
    record = live_record(
        queue_names=names,
        arrival_s=arrival,
        start_s=start,
        finish_s=finish,
        queue_idx=queue_idx,
        slo_target_s=targets,
        end_s=end_s,
        budget=plan.live.spec.budget,
        reconfigurations=moves,
        rejected=rejected,
    )
    run_overhead = finish - start - plan.live.jobs.service_s
    return LiveOutcome(record, n, failed, unfinished, lags, run_overhead)


__all__ = [
    "LiveOutcome",
    "ReplayError",
    "ReplayService",
    "allocator_for",
    "live_config",
    "live_estimators",
    "replay_service",
    "router_for",
    "simulate_plan",
    "submit_and_collect",
    "wait_ready",
]
