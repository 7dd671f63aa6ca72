"""Simulator against live service: a live run's per-job times as a RunRecord, and the comparison.

A live replay yields, per submitted job, when the service received it, when a worker started it
and when it finished, and the queue it ran on; `live_record` turns those into the RunRecord the
simulator produces, so `policies.sim.metrics.summarize` computes the very same metrics for both.
`relative_errors` compares two summaries metric by metric, `rank` orders policies by a metric and
`rankings_agree` says whether live and simulated runs order them alike.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from policies.sim.calibration import Calibration, calibrated
from policies.sim.metrics import RunRecord, TimeSeries
from policies.sim.scenario import PreparedRun
from policies.sim.timescale import compress, cut

FloatArray = NDArray[np.float64]

# The metrics compared between simulated and live runs, in the order reports list them.
COMPARED_METRICS: tuple[str, ...] = (
    "mean_jct_s",
    "p50_jct_s",
    "p99_jct_s",
    "slo_attainment",
    "utilization",
    "reconfigurations",
)

# Keys of a summary (simulate --json) that are durations of the run, rescaled by a speed; wall_s
# is the simulator's own time and stays.
_DURATION_KEYS = frozenset(
    {"mean_jct_s", "p50_jct_s", "p95_jct_s", "p99_jct_s", "loading_worker_s", "duration_s"}
)


@dataclass(frozen=True)
class LiveEstimators:
    """How the live service estimates what its views carry, for the simulator to estimate alike
    (the ideal simulator knows each queue's mean service time and uses its own rate window)."""

    # Time constant of the arrival-rate EWMA, in real seconds (half-life / ln 2).
    rate_window_s: float
    # Weight of each completed job in a queue's service-time EWMA.
    service_ewma_alpha: float
    # Service seconds a view shows before a queue's first completion.
    default_service_s: float


@dataclass(frozen=True, eq=False)
class ReplayPlan:
    """One replay: the jobs the live service runs and the run the simulator predicts it by.

    Both are the scenario's jobs (drawn once, for one seed), cut to the replayed duration and
    compressed by `speed`, so their times are real seconds; `sim` also carries the calibration's
    overheads (real seconds too). Results go back to scenario seconds with `rescaled`.
    """

    speed: float
    live: PreparedRun
    sim: PreparedRun
    calibration: Calibration

    @property
    def arrivals(self) -> int:
        return len(self.live.jobs.arrivals)

    def starting_from(self, allocation: Mapping[str, int]) -> ReplayPlan:
        """This plan with both runs starting from `allocation` (workers per queue, models
        loaded; queues left out get none): where the live service settled before the first
        arrival, since its policy already acts on the empty system while the initial workers
        load, and the simulator has no time before its first arrival."""
        names = [q.name for q in self.live.spec.queues]
        unknown = sorted(set(allocation) - set(names))
        if unknown:
            raise ValueError(f"allocation names unknown queues {unknown}")
        initial = tuple(int(allocation.get(n, 0)) for n in names)
        if any(n < 0 for n in initial) or sum(initial) > self.live.spec.budget:
            raise ValueError(f"allocation {dict(allocation)} is negative or over the budget")

        def moved(p: PreparedRun) -> PreparedRun:
            spec = replace(p.spec, initial_allocation=initial)
            return PreparedRun(scenario=p.scenario, spec=spec, jobs=p.jobs, seed=p.seed)

        return ReplayPlan(self.speed, moved(self.live), moved(self.sim), self.calibration)

    def load_times_s(self) -> dict[str, float]:
        """Model-load seconds per job type of the live run, such that a worker loading a queue's
        job types takes that queue's model_load_s; ValueError when no such split exists (a job
        type shared by queues whose loads differ per type)."""
        out: dict[str, float] = {}
        for q in self.live.spec.queues:
            share_s = q.model_load_s / len(q.job_types)
            for t in sorted(q.job_types):
                if t in out and not math.isclose(out[t], share_s, rel_tol=1e-9, abs_tol=1e-12):
                    raise ValueError(
                        f"job type {t!r} is in queues whose model loads differ per job type; a "
                        "live replay loads one model per job type"
                    )
                out[t] = share_s
        return out

    def live_models(self) -> dict[str, str]:
        """The demo model each job type of a `live_model` queue runs; ValueError when a job
        type is in queues that name different ones (or one names none)."""
        models: dict[str, str | None] = {}
        for q in self.live.scenario.queues:
            for t in sorted(q.job_types):
                if t in models and models[t] != q.live_model:
                    raise ValueError(
                        f"job type {t!r} is in queues with different live_model "
                        f"({models[t]!r} and {q.live_model!r}); a live replay runs one model per "
                        "job type"
                    )
                models[t] = q.live_model
        return {t: m for t, m in models.items() if m is not None}

    def handlers(self) -> dict[str, float | str]:
        """What each job type's synthetic handler does (workers/synthetic.py): a number is the
        seconds its model load sleeps, a name the demo model it loads and computes with."""
        out: dict[str, float | str] = dict(self.load_times_s())
        out.update(self.live_models())
        return out


def real_model_loads(
    prepared: PreparedRun, load_s_by_model: Mapping[str, float]
) -> dict[str, float]:
    """Seconds a worker of each `live_model` queue takes to load its models (one per job type),
    from one load of each model as timed on this machine; ValueError naming a model not timed."""
    out: dict[str, float] = {}
    for q in prepared.scenario.queues:
        if q.live_model is None:
            continue
        if q.live_model not in load_s_by_model:
            raise ValueError(f"queue {q.name!r}: no load time of live_model {q.live_model!r}")
        out[q.name] = load_s_by_model[q.live_model] * len(q.job_types)
    return out


def plan_replay(
    prepared: PreparedRun,
    *,
    speed: float,
    calibration: Calibration,
    duration_s: float | None = None,
    estimators: LiveEstimators | None = None,
    model_loads_s: Mapping[str, float] | None = None,
) -> ReplayPlan:
    """The plan for replaying an ideal (uncalibrated) prepared run at `speed`, its arrivals cut
    at `duration_s` scenario seconds if given; with `estimators`, the simulator's views estimate
    rates and service times as the live service's do (real seconds, like the overheads).
    `model_loads_s` gives queues whose models really load (live_model, see real_model_loads)
    their load time in real seconds: a real load is not compressed by the speed."""
    if prepared.scenario.calibration is not None:
        raise ValueError("prepare the run without calibration: overheads are added after")
    if duration_s is not None:
        prepared = cut(prepared, duration_s)
    live = compress(prepared, speed)
    if model_loads_s:
        unknown = sorted(set(model_loads_s) - {q.name for q in live.spec.queues})
        if unknown:
            raise ValueError(f"model loads name unknown queues {unknown}")
        queues = tuple(
            replace(q, model_load_s=float(model_loads_s.get(q.name, q.model_load_s)))
            for q in live.spec.queues
        )
        live = PreparedRun(
            scenario=live.scenario, spec=replace(live.spec, queues=queues), jobs=live.jobs,
            seed=live.seed,
        )  # fmt: skip
    spec, jobs = calibrated(live.spec, live.jobs, calibration)
    if estimators is not None:
        spec = replace(
            spec,
            rate_window_s=estimators.rate_window_s,
            service_ewma_alpha=estimators.service_ewma_alpha,
            default_service_s=estimators.default_service_s,
        )
    sim = PreparedRun(scenario=live.scenario, spec=spec, jobs=jobs, seed=live.seed)
    return ReplayPlan(speed=speed, live=live, sim=sim, calibration=calibration)


def live_record(
    *,
    queue_names: Sequence[str],
    arrival_s: FloatArray,
    start_s: FloatArray,
    finish_s: FloatArray,
    queue_idx: NDArray[np.int64],
    slo_target_s: FloatArray,
    end_s: float,
    budget: int,
    reconfigurations: int,
    rejected: int = 0,
) -> RunRecord:
    """A RunRecord of live jobs: times in seconds since the run's start (NaN start or finish for
    jobs that did not get there by `end_s`), queue index per job (-1 for a job never routed or
    rejected). Busy time is each finished job's start -> finish, clipped to `end_s`; the model
    loads are counted as the reconfigurations (every move loads a model) and their time is not
    known live (0)."""
    n = len(arrival_s)
    for name, a in (("start_s", start_s), ("finish_s", finish_s), ("queue_idx", queue_idx)):
        if len(a) != n:
            raise ValueError(f"{name} has {len(a)} entries for {n} arrivals")
    done = ~np.isnan(finish_s)
    started = ~np.isnan(start_s)
    busy_until = np.where(done, np.minimum(finish_s, end_s), end_s)
    busy_s = float(np.sum((busy_until - start_s)[started].clip(min=0.0)))
    sojourn_until = np.where(done, finish_s, end_s)
    area_s = float(np.sum((sojourn_until - arrival_s)[queue_idx >= 0].clip(min=0.0)))
    q = len(queue_names)
    empty = np.zeros((0, q), dtype=np.int64)
    return RunRecord(
        queue_names=tuple(queue_names),
        arrival_s=np.asarray(arrival_s, dtype=float),
        completion_s=np.asarray(finish_s, dtype=float),
        queue_idx=np.asarray(queue_idx, dtype=np.int64),
        slo_target_s=np.asarray(slo_target_s, dtype=float),
        end_s=end_s,
        budget=budget,
        busy_worker_s=busy_s,
        loading_worker_s=0.0,
        reconfigurations=reconfigurations,
        model_loads=reconfigurations,
        rejected=rejected,
        area_job_s=area_s,
        timeseries=TimeSeries(
            t_s=np.zeros(0), depth=empty, in_service=empty, allocation=empty, workers_loading=empty
        ),
    )


def moves_in_history(history: Sequence[Mapping[str, int]]) -> int:
    """Workers that changed queue along a sequence of allocations: at each step, the workers one
    queue gained (each gain is one move, or one new worker)."""
    moves = 0
    for before, after in itertools.pairwise(history):
        moves += sum(max(0, n - before.get(q, 0)) for q, n in after.items())
    return moves


def rescaled(summary: Mapping[str, Any], speed: float) -> dict[str, Any]:
    """A summary (`Summary.to_dict()`) of a run `speed` times faster, in the original seconds:
    JCTs, durations and loading time times `speed`, per queue too; rates and counts unchanged."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if key in _DURATION_KEYS and isinstance(value, int | float) and value is not None:
            out[key] = value * speed
        elif key == "per_queue" and isinstance(value, Mapping):
            out[key] = {q: rescaled(v, speed) for q, v in value.items()}
        else:
            out[key] = value
    return out


def relative_error(sim: float | None, live: float | None) -> float | None:
    """(sim - live) / |live|: positive when the simulator overestimates. None when either is
    missing, and when live is 0 (then 0.0 if sim is 0 too)."""
    if sim is None or live is None or not (math.isfinite(sim) and math.isfinite(live)):
        return None
    if live == 0:
        return 0.0 if sim == 0 else None
    return (sim - live) / abs(live)


def relative_errors(
    sim: Mapping[str, Any], live: Mapping[str, Any], metrics: Sequence[str] = COMPARED_METRICS
) -> dict[str, float | None]:
    """Per metric, the simulator's relative error against the live run (see `relative_error`)."""
    return {m: relative_error(sim.get(m), live.get(m)) for m in metrics}


def within(errors: Mapping[str, float | None], bounds: Mapping[str, float]) -> dict[str, bool]:
    """Per bounded metric, whether |error| is within its bound (a missing error is not)."""
    out = {}
    for metric, bound in bounds.items():
        e = errors.get(metric)
        out[metric] = e is not None and abs(e) <= bound
    return out


def rank(results: Mapping[str, Mapping[str, Any]], metric: str = "mean_jct_s") -> list[str]:
    """Policy names ordered by `metric`, lowest first (missing values last; ties by name)."""

    def key(name: str) -> tuple[float, str]:
        value = results[name].get(metric)
        return (math.inf if value is None else float(value), name)

    return sorted(results, key=key)


def _ordered(a: Any, b: Any, tie: float) -> int:
    """-1 when a is clearly below b, 1 when clearly above, 0 when within `tie` (relative) or
    either is missing."""
    if a is None or b is None:
        return 0
    a, b = float(a), float(b)
    if abs(a - b) <= tie * max(abs(a), abs(b)):
        return 0
    return -1 if a < b else 1


def rankings_agree(
    sim: Mapping[str, Mapping[str, Any]],
    live: Mapping[str, Mapping[str, Any]],
    metric: str = "mean_jct_s",
    *,
    tie: float = 0.0,
) -> bool:
    """Whether no two policies (of those both runs have) are ordered one way by the simulator
    and the other way live, by `metric`. Values within `tie` of each other (relative) are a tie,
    which agrees with any order: two policies that make the same decisions simulate to the same
    number, and their live runs differ only by noise."""
    shared = sorted(set(sim) & set(live))
    for i, p in enumerate(shared):
        for q in shared[i + 1 :]:
            s = _ordered(sim[p].get(metric), sim[q].get(metric), tie)
            v = _ordered(live[p].get(metric), live[q].get(metric), tie)
            if s * v < 0:
                return False
    return True


__all__ = [
    "COMPARED_METRICS",
    "LiveEstimators",
    "ReplayPlan",
    "live_record",
    "moves_in_history",
    "plan_replay",
    "rank",
    "rankings_agree",
    "real_model_loads",
    "relative_error",
    "relative_errors",
    "rescaled",
    "within",
]
