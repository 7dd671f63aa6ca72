"""Scenarios made smaller and faster, for replaying them live on one machine.

`shrink` keeps a scenario's shape on fewer workers: every arrival rate is scaled by the ratio of
budgets (so utilisation stays what it was), worker bounds are clamped to the new budget, and an
optional shorter duration cuts the arrivals (a diurnal cycle is compressed with it, so the shorter
run still sees whole cycles).

`compress` runs a scenario K times faster: every duration (arrival times, service times, model
loads, ticks, SLOs, deadlines, and the policies' parameters in seconds, the keys ending in `_s`) is
divided by K. A live replay at speed K runs the compressed scenario in real time, and the
simulator runs the same compressed jobs, so both see the very same numbers and the policies the
very same views; results are reported back in scenario seconds (times K). Queueing is invariant
under this change of time unit; what is not invariant is the live service's own overhead, which
stays the same in real seconds and so grows K-fold in scenario seconds (policies/sim/calibration.py
models it).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from policies.sim.run import Jobs, QueueSpec, SimSpec
from policies.sim.scenario import PreparedRun, Scenario
from policies.sim.workloads import (
    ArrivalTable,
    DiurnalWorkload,
    Generator,
    MmppWorkload,
    PoissonWorkload,
)


def _scaled_params(params: dict[str, Any], speed: float) -> dict[str, Any]:
    """Policy parameters with every `*_s` number divided by `speed` (they are seconds)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        out[key] = value / speed if key.endswith("_s") and is_number else value
    return out


def _check_speed(speed: float) -> None:
    if not (speed > 0 and math.isfinite(speed)):
        raise ValueError(f"speed must be a finite number > 0, got {speed}")


def shrink(
    scenario: Scenario, budget: int, *, duration_s: float | None = None, load_scale: float = 1.0
) -> Scenario:
    """`scenario` on `budget` workers at the same utilisation times `load_scale`, and cut to
    `duration_s` if given. (On a handful of workers a queue gets whole workers only, so a queue
    that had 1.0 Erlang of 32 workers' 22 may have exactly one worker for it: `load_scale` below 1
    keeps every queue stable.)

    ValueError when the budget cannot hold the queues' minimum workers.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if not (load_scale > 0 and math.isfinite(load_scale)):
        raise ValueError(f"load_scale must be a finite number > 0, got {load_scale}")
    old = scenario.allocation.budget
    ratio = budget / old * load_scale
    minimums = sum(q.min_workers for q in scenario.queues)
    if minimums > budget:
        raise ValueError(
            f"{scenario.name}: its queues' min_workers add up to {minimums}, over a budget of "
            f"{budget}"
        )
    stretch = 1.0
    if duration_s is not None and scenario.duration_s is not None:
        stretch = min(1.0, duration_s / scenario.duration_s)
    generators: list[Generator] = []
    for g in scenario.workload.generators:
        if isinstance(g, PoissonWorkload):
            generators.append(g.model_copy(update={"rate_per_s": g.rate_per_s * ratio}))
        elif isinstance(g, MmppWorkload):
            states = [s.model_copy(update={"rate_per_s": s.rate_per_s * ratio}) for s in g.states]
            generators.append(g.model_copy(update={"states": states}))
        elif isinstance(g, DiurnalWorkload):
            generators.append(
                g.model_copy(
                    update={
                        "base_rate_per_s": g.base_rate_per_s * ratio,
                        "period_s": g.period_s * stretch,
                        "phase_s": g.phase_s * stretch,
                    }
                )
            )
        else:  # pragma: no cover - every generator kind is listed above
            raise ValueError(f"cannot shrink a {type(g).__name__}")
    queues = tuple(
        q.model_copy(
            update={
                "min_workers": min(q.min_workers, budget),
                "max_workers": None if q.max_workers is None else min(q.max_workers, budget),
            }
        )
        for q in scenario.queues
    )
    allocation = scenario.allocation
    initial = None
    workers_ratio = budget / old
    if allocation.initial is not None:
        initial = {q: round(n * workers_ratio) for q, n in allocation.initial.items()}
    max_moves = allocation.max_moves_per_tick
    allocation = allocation.model_copy(
        update={
            "budget": budget,
            "initial": initial,
            "max_moves_per_tick": (
                None if max_moves is None else max(1, round(max_moves * workers_ratio))
            ),
        }
    )
    workload = scenario.workload.model_copy(update={"generators": generators})
    trace = scenario.workload.trace
    if trace is not None:
        if trace.target_utilization is not None:
            # Already relative to the budget: only the requested share is applied.
            scaled = {"target_utilization": min(trace.target_utilization * load_scale, 1.5)}
        else:
            scaled = {"load_scale": (trace.load_scale or 1.0) * ratio}
        workload = workload.model_copy(update={"trace": trace.model_copy(update=scaled)})
    update: dict[str, Any] = {
        "name": f"{scenario.name}@{budget}",
        "queues": queues,
        "allocation": allocation,
        "workload": workload,
    }
    if duration_s is not None:
        update["duration_s"] = min(duration_s, scenario.duration_s or duration_s)
    if scenario.max_jobs is not None:
        update["max_jobs"] = max(1, round(scenario.max_jobs * ratio * stretch))
    return scenario.model_copy(update=update)


def compress_scenario(scenario: Scenario, speed: float) -> Scenario:
    """The layout of `scenario` with its seconds divided by `speed`: queue SLOs, the tick, the
    policies' `*_s` parameters, SLO tables, durations. (Service models and workloads are left:
    jobs are drawn from the original and compressed after, see `compress`.)"""
    _check_speed(speed)
    queues = tuple(
        q.model_copy(
            update={
                "slo_s": None if q.slo_s is None else q.slo_s / speed,
                "model_load_s": q.model_load_s / speed,
            }
        )
        for q in scenario.queues
    )
    allocation = scenario.allocation.model_copy(
        update={
            "tick_s": scenario.allocation.tick_s / speed,
            "params": _scaled_params(scenario.allocation.params, speed),
        }
    )
    routing = scenario.routing.model_copy(
        update={"params": _scaled_params(scenario.routing.params, speed)}
    )
    slos = scenario.slos.model_copy(
        update={
            "job_types": {t: s / speed for t, s in scenario.slos.job_types.items()},
            "default_s": None
            if scenario.slos.default_s is None
            else scenario.slos.default_s / speed,
        }
    )
    update: dict[str, Any] = {
        "queues": queues,
        "allocation": allocation,
        "routing": routing,
        "slos": slos,
    }
    if scenario.duration_s is not None:
        update["duration_s"] = scenario.duration_s / speed
    if scenario.max_drain_s is not None:
        update["max_drain_s"] = scenario.max_drain_s / speed
    return scenario.model_copy(update=update)


def _compress_arrivals(a: ArrivalTable, speed: float) -> ArrivalTable:
    return replace(
        a,
        arrival_s=a.arrival_s / speed,
        service_s=a.service_s / speed,
        deadline_s=a.deadline_s / speed,
    )


def compress_spec(spec: SimSpec, speed: float) -> SimSpec:
    """`spec` with every duration divided by `speed`."""
    _check_speed(speed)
    queues = tuple(
        QueueSpec(
            name=q.name,
            job_types=q.job_types,
            model_load_s=q.model_load_s / speed,
            slo_s=None if q.slo_s is None else q.slo_s / speed,
            nominal_service_s=q.nominal_service_s / speed,
        )
        for q in spec.queues
    )
    return replace(
        spec,
        queues=queues,
        tick_s=spec.tick_s / speed,
        horizon_s=spec.horizon_s / speed,
        max_drain_s=spec.max_drain_s / speed,
        rate_window_s=spec.rate_window_s / speed,
        slo_by_type_s={t: s / speed for t, s in spec.slo_by_type_s.items()},
        default_slo_s=None if spec.default_slo_s is None else spec.default_slo_s / speed,
    )


def cut(prepared: PreparedRun, duration_s: float) -> PreparedRun:
    """`prepared` with only the arrivals before `duration_s`, which becomes the horizon. The jobs
    kept are exactly those the whole run has (a shorter scenario would draw others)."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if duration_s >= prepared.spec.horizon_s:
        return prepared
    a = prepared.jobs.arrivals
    n = int(np.searchsorted(a.arrival_s, duration_s, side="left"))
    arrivals = replace(
        a,
        arrival_s=a.arrival_s[:n],
        type_idx=a.type_idx[:n],
        service_s=a.service_s[:n],
        tokens_in=a.tokens_in[:n],
        tokens_out=a.tokens_out[:n],
        priority=a.priority[:n],
        deadline_s=a.deadline_s[:n],
        tenants=None if a.tenants is None else a.tenants[:n],
    )
    jobs = Jobs(
        arrivals=arrivals,
        service_s=prepared.jobs.service_s[:n],
        size_estimate_s=prepared.jobs.size_estimate_s[:n],
    )
    spec = replace(
        prepared.spec,
        horizon_s=duration_s,
        max_drain_s=min(prepared.spec.max_drain_s, max(duration_s, 60.0)),
    )
    scenario = prepared.scenario.model_copy(update={"duration_s": duration_s})
    return PreparedRun(scenario=scenario, spec=spec, jobs=jobs, seed=prepared.seed)


def compress(prepared: PreparedRun, speed: float) -> PreparedRun:
    """`prepared` run `speed` times faster: the same jobs (same draws), every duration / speed.
    Compress an ideal run (no calibration): overheads are real seconds and are added after."""
    _check_speed(speed)
    if speed == 1:
        return prepared
    jobs = Jobs(
        arrivals=_compress_arrivals(prepared.jobs.arrivals, speed),
        service_s=np.asarray(prepared.jobs.service_s / speed, dtype=float),
        size_estimate_s=np.asarray(prepared.jobs.size_estimate_s / speed, dtype=float),
    )
    return PreparedRun(
        scenario=compress_scenario(prepared.scenario, speed),
        spec=compress_spec(prepared.spec, speed),
        jobs=jobs,
        seed=prepared.seed,
    )


__all__ = ["compress", "compress_scenario", "compress_spec", "cut", "shrink"]
