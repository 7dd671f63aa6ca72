"""A recording (scheduler.recording) as a generic trace CSV and a scenario that replays it.

The trace holds one row per job that arrived in the window and ran to an end on a queue
(succeeded, or dead after its attempts): its arrival, job type, the service seconds its worker
measured, the tokens its handler reported, tenant, priority and deadline (the columns of
policies.sim.traces.parse_generic_csv). Cancelled jobs are left out (the simulator has no
cancellation), and so are jobs that never reached a queue.

The scenario (policies.sim.scenario) has the recorded queues with the job types each served, a
service-time model per job type fitted to the measured run times, each queue's model-load time
from the workers' load reports, and the trace as its workload. The layout beyond that (each
queue's min/max workers and SLO, routing, allocation and its guardrails) comes from the service
config when one is given, else from the defaults, with the budget the controller was seen to use.

Nothing here does I/O.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from policies.schema import AllocationSection, Layout, RoutingSection
from policies.sim.scenario import Scenario
from policies.sim.traces import GENERIC_COLUMNS
from scheduler.models import JobStatus
from scheduler.recording import ModelLoad, ServedJob

TRACE_FILE: Final = "trace.csv"
SCENARIO_FILE: Final = "scenario.yaml"
# The generic trace CSV's columns (policies.sim.traces), so the loader reads what is written.
TRACE_COLUMNS: Final = GENERIC_COLUMNS
_TRACED: Final = frozenset({JobStatus.SUCCEEDED, JobStatus.DEAD})
# Below this spread a job type's run times are taken as constant (a lognormal needs cv > 0).
_MIN_CV: Final = 1e-3
# Mean service seconds of a job type no worker measured (all its jobs died without a report):
# the mean of every measured job, or this when nothing at all was measured.
_UNMEASURED_MEAN_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class Fit:
    """A job type's service-time model as a scenario's `service` mapping, and what it is from."""

    service: dict[str, Any]
    samples: int


def traced(jobs: Iterable[ServedJob]) -> list[ServedJob]:
    """The jobs a trace replays, in arrival order: those that ran to an end on a queue."""
    return sorted(
        (j for j in jobs if j.status in _TRACED and j.queue is not None),
        key=lambda j: (j.created_ms, j.job_id),
    )


def _cell(value: float | int | str | None, fmt: str = "") -> str:
    if value is None:
        return ""
    return format(value, fmt) if fmt else str(value)


def trace_csv(jobs: Sequence[ServedJob]) -> str:
    """The generic trace CSV of `jobs` (arrival order), arrivals from 0.000 s."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(TRACE_COLUMNS)
    first_ms = jobs[0].created_ms if jobs else 0
    for j in jobs:
        writer.writerow(
            (
                f"{(j.created_ms - first_ms) / 1000:.3f}",
                j.job_type,
                _cell(j.run_s, ".6f"),
                _cell(j.tokens_in),
                _cell(j.tokens_out),
                _cell(j.tenant),
                j.priority,
                _cell(j.deadline_s, ".6g"),
            )
        )
    return out.getvalue()


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def fit_service(samples_s: Sequence[float], fallback_mean_s: float) -> Fit:
    """A service model for run times `samples_s`: lognormal with their mean and coefficient of
    variation; constant when there is one sample or no spread; constant at `fallback_mean_s`
    when there are none."""
    if not samples_s:
        return Fit({"kind": "constant", "mean_s": _round(fallback_mean_s)}, 0)
    # A model's mean must be > 0; handlers faster than a microsecond are measured as 0.
    mean_s = max(statistics.fmean(samples_s), 1e-6)
    cv = statistics.stdev(samples_s) / mean_s if len(samples_s) >= 2 else 0.0
    if cv < _MIN_CV:
        return Fit({"kind": "constant", "mean_s": _round(mean_s)}, len(samples_s))
    return Fit({"kind": "lognormal", "mean_s": _round(mean_s), "cv": _round(cv)}, len(samples_s))


def _groups(queue_types: Mapping[str, set[str]]) -> list[set[str]]:
    """Job types joined when one queue serves them together or one type goes to several queues:
    a scenario gives each queue one service model, and a job type the same one everywhere."""
    groups: list[set[str]] = []
    for types in queue_types.values():
        joined = set(types)
        rest = []
        for g in groups:
            if g & joined:
                joined |= g
            else:
                rest.append(g)
        groups = [*rest, joined]
    return groups


def fit_services(jobs: Sequence[ServedJob], queue_types: Mapping[str, set[str]]) -> dict[str, Fit]:
    """The fitted model of each job type (types sharing a queue share one model)."""
    measured = [j.run_s for j in jobs if j.run_s is not None]
    fallback_s = statistics.fmean(measured) if measured else _UNMEASURED_MEAN_S
    fits: dict[str, Fit] = {}
    for group in _groups(queue_types):
        samples = [j.run_s for j in jobs if j.job_type in group and j.run_s is not None]
        fit = fit_service(samples, fallback_s)
        for t in group:
            fits[t] = fit
    return fits


def model_load_s(job_types: Iterable[str], loads: Sequence[ModelLoad]) -> float:
    """What a worker moving to a queue with these job types pays: the sum over the types of the
    median load seconds the workers reported for each (0 for a type with no report)."""
    total_s = 0.0
    for t in job_types:
        seen = [load.load_s_by_type[t] for load in loads if t in load.load_s_by_type]
        if seen:
            total_s += statistics.median(seen)
    return _round(total_s)


def _queue_section(name: str, layout: Layout | None) -> dict[str, Any]:
    """min_workers, max_workers and slo_s of queue `name` in the service's layout, if it has it."""
    if layout is None:
        return {}
    for q in layout.queues:
        if q.name == name:
            return {
                k: v
                for k, v in q.model_dump().items()
                if k in ("min_workers", "max_workers", "slo_s") and v is not None
            }
    return {}


def _section(model: Any, fields: Iterable[str], drop: Iterable[str] = ()) -> dict[str, Any]:
    dumped: dict[str, Any] = model.model_dump()
    dropped = set(drop)
    return {
        k: dumped[k] for k in fields if k in dumped and k not in dropped and dumped[k] is not None
    }


def scenario_mapping(
    jobs: Sequence[ServedJob],
    loads: Sequence[ModelLoad],
    *,
    name: str,
    description: str,
    layout: Layout | None = None,
    budget: int | None = None,
) -> dict[str, Any]:
    """The scenario of traced `jobs` (see `traced`) as a YAML-ready mapping, validated as a
    Scenario (ValueError with its problems when it is not one). `layout` is the service's
    (its queues' bounds and SLOs, routing, allocation); `budget` replaces its budget, and is the
    budget when there is no layout (default: one worker per queue)."""
    queue_types: dict[str, set[str]] = {}
    for j in jobs:
        assert j.queue is not None  # traced() keeps only jobs with a queue
        queue_types.setdefault(j.queue, set()).add(j.job_type)
    fits = fit_services(jobs, queue_types)
    queues = []
    for q in sorted(queue_types):
        types = sorted(queue_types[q])
        queues.append(
            {
                "name": q,
                "job_types": types,
                **_queue_section(q, layout),
                "service": fits[types[0]].service,
                "model_load_s": model_load_s(types, loads),
            }
        )
    allocation: dict[str, Any] = {}
    routing: dict[str, Any] = {}
    if layout is not None:
        routing = _section(layout.routing, RoutingSection.model_fields)
        # `initial` names the service's queues, which the recording may not all have.
        allocation = _section(layout.allocation, AllocationSection.model_fields, drop=("initial",))
    minimum = sum(int(q.get("min_workers", 0)) for q in queues)
    chosen = budget if budget is not None else allocation.get("budget", len(queues))
    allocation["budget"] = max(int(chosen), minimum, 1)
    mapping: dict[str, Any] = {
        "name": name,
        "description": description,
        "queues": queues,
        **({"routing": routing} if routing else {}),
        "allocation": allocation,
        "workload": {"trace": {"format": "generic_csv", "path": TRACE_FILE}},
    }
    Scenario.model_validate(mapping)
    return mapping


def budget_seen(history: Iterable[Mapping[str, int]]) -> int | None:
    """The most workers the controller placed at once, from its allocation history (targets per
    queue); None when it has none."""
    totals = [sum(v for v in workers.values() if v > 0) for workers in history]
    return max(totals) if totals and max(totals) > 0 else None


__all__ = [
    "SCENARIO_FILE",
    "TRACE_COLUMNS",
    "TRACE_FILE",
    "Fit",
    "budget_seen",
    "fit_service",
    "fit_services",
    "model_load_s",
    "scenario_mapping",
    "trace_csv",
    "traced",
]
