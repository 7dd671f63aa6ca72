"""What one simulation run measured, summaries of it, and the sanity checks every run must pass."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class TimeSeries:
    """Per tick (rows) and queue (columns): the state level 2 saw, and what it decided."""

    t_s: FloatArray
    depth: IntArray
    # Jobs of the queue in service.
    in_service: IntArray
    # Workers assigned to the queue after the tick's decision.
    allocation: IntArray
    workers_loading: IntArray


@dataclass(frozen=True, eq=False)
class RunRecord:
    """Raw outcome of one run; `summarize` turns it into numbers."""

    queue_names: tuple[str, ...]
    arrival_s: FloatArray
    # NaN for jobs not completed by `end_s`.
    completion_s: FloatArray
    # Queue index per job; negative for rejected (or never routed) jobs.
    queue_idx: IntArray
    # JCT target per job (its deadline, else its type's or queue's SLO); NaN when none.
    slo_target_s: FloatArray
    end_s: float
    budget: int
    busy_worker_s: float
    loading_worker_s: float
    reconfigurations: int
    model_loads: int
    rejected: int
    # Time integral of jobs in system, measured from event times.
    area_job_s: float
    timeseries: TimeSeries
    wall_s: float = 0.0

    @property
    def arrived(self) -> int:
        """Arrivals up to `end_s` (every arrival of the run's table that was delivered)."""
        return int(np.count_nonzero(self.arrival_s <= self.end_s))

    @property
    def completed_mask(self) -> NDArray[np.bool_]:
        return ~np.isnan(self.completion_s)

    @property
    def in_system(self) -> int:
        """Accepted jobs that arrived but did not complete."""
        arrived = self.arrival_s <= self.end_s
        return int(np.count_nonzero(arrived & (self.queue_idx >= 0) & np.isnan(self.completion_s)))


@dataclass(frozen=True)
class JctStats:
    """Job completion time statistics of a set of jobs (seconds; NaN when there are none)."""

    jobs: int
    mean_s: float
    p50_s: float
    p95_s: float
    p99_s: float
    # Fraction of jobs with a target that met it; None when no job has a target.
    slo_attainment: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "mean_jct_s": finite_or_none(self.mean_s),
            "p50_jct_s": finite_or_none(self.p50_s),
            "p95_jct_s": finite_or_none(self.p95_s),
            "p99_jct_s": finite_or_none(self.p99_s),
            "slo_attainment": self.slo_attainment,
        }


@dataclass(frozen=True)
class Summary:
    """The headline numbers of a run."""

    arrived: int
    completed: int
    in_system: int
    rejected: int
    jct: JctStats
    utilization: float
    loading_worker_s: float
    reconfigurations: int
    model_loads: int
    duration_s: float
    wall_s: float
    per_queue: dict[str, JctStats] = field(default_factory=dict)

    @property
    def sim_jobs_per_s(self) -> float:
        """Completed jobs per wall-clock second of simulation."""
        return self.completed / self.wall_s if self.wall_s > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the keys of `bilevel simulate --json`."""
        head = self.jct.to_dict()
        out: dict[str, Any] = {
            "jobs": self.completed,
            "mean_jct_s": head["mean_jct_s"],
            "p50_jct_s": head["p50_jct_s"],
            "p95_jct_s": head["p95_jct_s"],
            "p99_jct_s": head["p99_jct_s"],
            "slo_attainment": head["slo_attainment"],
            "utilization": self.utilization,
            "reconfigurations": self.reconfigurations,
            "wall_s": self.wall_s,
            "sim_jobs_per_s": finite_or_none(self.sim_jobs_per_s),
            "arrived": self.arrived,
            "in_system": self.in_system,
            "rejected": self.rejected,
            "loading_worker_s": self.loading_worker_s,
            "model_loads": self.model_loads,
            "duration_s": self.duration_s,
            "per_queue": {name: s.to_dict() for name, s in self.per_queue.items()},
        }
        return out


def finite_or_none(x: float) -> float | None:
    """`x`, or None where it is NaN or infinite (JSON has no word for those)."""
    return x if math.isfinite(x) else None


def jct_stats(
    jct_s: FloatArray, target_s: FloatArray, missed_unfinished: int = 0, missed_rejected: int = 0
) -> JctStats:
    """Stats of completed jobs' JCTs; unfinished jobs already past target and rejected jobs with a
    target count as SLO misses."""
    if len(jct_s):
        mean_s = float(jct_s.mean())
        p50_s, p95_s, p99_s = (float(x) for x in np.percentile(jct_s, [50, 95, 99]))
    else:
        mean_s = p50_s = p95_s = p99_s = math.nan
    has_target = ~np.isnan(target_s)
    judged = int(np.count_nonzero(has_target)) + missed_unfinished + missed_rejected
    attainment: float | None = None
    if judged:
        met = int(np.count_nonzero(jct_s[has_target] <= target_s[has_target]))
        attainment = met / judged
    return JctStats(len(jct_s), mean_s, p50_s, p95_s, p99_s, attainment)


def summarize(record: RunRecord) -> Summary:
    """Headline numbers, overall and per queue."""
    done = record.completed_mask
    jct = record.completion_s - record.arrival_s
    arrived = record.arrival_s <= record.end_s
    unfinished = arrived & (record.queue_idx >= 0) & ~done
    late = unfinished & (record.end_s - record.arrival_s > record.slo_target_s)
    rejected_with_target = arrived & (record.queue_idx < 0) & ~np.isnan(record.slo_target_s)
    overall = jct_stats(
        jct[done],
        record.slo_target_s[done],
        int(np.count_nonzero(late)),
        int(np.count_nonzero(rejected_with_target)),
    )
    per_queue = {}
    for q, name in enumerate(record.queue_names):
        mine = done & (record.queue_idx == q)
        per_queue[name] = jct_stats(
            jct[mine],
            record.slo_target_s[mine],
            int(np.count_nonzero(late & (record.queue_idx == q))),
        )
    capacity = record.budget * record.end_s
    return Summary(
        arrived=record.arrived,
        completed=int(np.count_nonzero(done)),
        in_system=record.in_system,
        rejected=record.rejected,
        jct=overall,
        utilization=record.busy_worker_s / capacity if capacity > 0 else 0.0,
        loading_worker_s=record.loading_worker_s,
        reconfigurations=record.reconfigurations,
        model_loads=record.model_loads,
        duration_s=record.end_s,
        wall_s=record.wall_s,
        per_queue=per_queue,
    )


def conservation_gap(record: RunRecord) -> int:
    """arrived - (completed + in system + rejected); zero for a consistent run."""
    completed = int(np.count_nonzero(record.completed_mask))
    return record.arrived - (completed + record.in_system + record.rejected)


def littles_law_gap(record: RunRecord) -> float:
    """Relative gap between L (time-average jobs in system, from event times) and lambda * W.

    W is the mean time in system of accepted jobs up to `end_s` (unfinished ones count up to
    `end_s`), lambda their arrival rate; over the whole run L = lambda * W holds exactly, so any
    gap beyond rounding means the per-job records and the event accounting disagree.
    """
    if record.end_s <= 0:
        return 0.0
    accepted = (record.arrival_s <= record.end_s) & (record.queue_idx >= 0)
    if not np.any(accepted):
        return 0.0
    finish_s = np.where(np.isnan(record.completion_s), record.end_s, record.completion_s)
    sojourn_s = (finish_s - record.arrival_s)[accepted]
    lam = len(sojourn_s) / record.end_s
    little_l = lam * float(sojourn_s.mean())
    measured_l = record.area_job_s / record.end_s
    return abs(measured_l - little_l) / max(little_l, 1e-12)
