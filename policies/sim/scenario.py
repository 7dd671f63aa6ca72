"""Scenario files: a validated schema, and building a run from one.

Parsing takes a dict or YAML text (the CLI reads the file; nothing here does I/O). Every problem is
reported as a `ScenarioError` listing each bad field by its path, e.g.
`queues.2.service.mean_s: Input should be greater than 0`.

Randomness: one seed gives independent streams for arrivals, service times and the router, so runs
that differ only in their allocator see the same jobs (common random numbers).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from policies.fairshare import TenantShare
from policies.guardrails import guardrails_for
from policies.legacy_layout import LayoutDeprecationWarning, upgrade_scenario
from policies.registry import make_allocator, make_router
from policies.schema import Layout, Problem, QueueSection, format_problems, validation_problems
from policies.sim.calibration import Calibration, calibrated
from policies.sim.run import Jobs, QueueSpec, SimRun, SimSpec, initial_split
from policies.sim.service import ServiceModel
from policies.sim.trace_servegen import DEFAULT_MAX_ARRIVALS, ServegenOptions
from policies.sim.traces import TraceFormat, load_trace
from policies.sim.workloads import ArrivalTable, Generator, generate
from policies.views import Allocator, Router


class ScenarioError(ValueError):
    """A scenario that cannot be used; the message lists every problem with its field path."""

    def __init__(self, source: str, problems: Sequence[tuple[str, str]]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"invalid scenario {source}:\n" + format_problems(self.problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The built-in torch demo models (workers/demo_nets.py) a live replay can run for a queue.
LiveModel = Literal["embed", "classify", "generate"]
LIVE_MODELS: tuple[str, ...] = get_args(LiveModel)


class QueueConfig(QueueSection):
    """One task queue of the layout, with how long its jobs run and its model's load time."""

    service: ServiceModel
    model_load_s: float = Field(default=0.0, ge=0)
    # For `bilevel replay` only: this queue's workers load this built-in torch demo model (a
    # real load, which the replay times on this machine and gives the simulator in place of
    # model_load_s) and each job computes with it for its drawn service time instead of sleeping,
    # so the replay's CPUs are really busy. `simulate` and the service ignore it.
    live_model: LiveModel | None = None


class TraceConfig(_Section):
    """Trace replay; `path` may be left out and given on the command line instead."""

    format: TraceFormat
    # One file; for servegen also a list of arrivals files (one model each), relative to the
    # scenario file, or file names inside the directory given as --trace.
    path: str | list[str] | None = None
    # Durations file for azure_functions_2019 (its `*_run.csv`).
    run_path: str | None = None
    job_type: str | None = None
    window_s: tuple[float, float] | None = None
    # Offered load multiplier (2 = twice as many arrivals per second); or a target utilisation.
    load_scale: float | None = Field(default=None, gt=0)
    target_utilization: float | None = Field(default=None, gt=0, le=1.5)
    # azure_functions_2019 only.
    minutes: tuple[int, int] | None = None
    job_type_by: str | None = None
    top_functions: int | None = Field(default=None, ge=1)
    max_job_types: int | None = Field(default=None, ge=1)
    # servegen only: which clients to draw (ids, of every model), or each model's busiest N in the
    # window; a per-model factor on load_scale (which for servegen scales rates, not time); and
    # a cap on the expected arrivals, checked before drawing.
    clients: list[int] | None = None
    top_clients: int | None = Field(default=None, ge=1)
    load_scale_by_model: dict[str, float] | None = None
    max_arrivals: int | None = Field(default=None, ge=1)


class WorkloadConfig(_Section):
    """Synthetic generators (superposed), or one trace."""

    generators: list[Generator] = Field(default_factory=list)
    trace: TraceConfig | None = None


class SloConfig(_Section):
    """JCT targets by job type, and a default; a job's own deadline and its queue's slo_s win."""

    job_types: dict[str, float] = Field(default_factory=dict)
    default_s: float | None = Field(default=None, gt=0)

    @field_validator("job_types")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in value.items() if not v > 0]
        if bad:
            raise ValueError(f"SLOs must be > 0: {bad}")
        return value


class Scenario(Layout):
    """A whole scenario file: the layout (policies.schema) of its queues, routing and allocation,
    plus what the simulator needs to make jobs (service models, workload, SLOs, duration)."""

    name: str = "scenario"
    description: str = ""
    queues: tuple[QueueConfig, ...] = Field(min_length=1)
    workload: WorkloadConfig
    slos: SloConfig = Field(default_factory=SloConfig)
    duration_s: float | None = Field(default=None, gt=0)
    max_jobs: int | None = Field(default=None, ge=1)
    # Keep running after arrivals stop until every job is done, for at most max_drain_s (default:
    # as long again as the arrivals lasted, so a policy that starves a queue cannot run forever).
    drain: bool = True
    max_drain_s: float | None = Field(default=None, gt=0)
    # Tenant shares as in a service config's `tenants:` ("*": every other tenant): queues serve
    # the workload's tenants by weighted fair queueing (policies.fairshare).
    tenants: dict[str, TenantShare] = Field(default_factory=dict)
    # The live service's overheads to simulate (policies/sim/calibration.py); None: the ideal
    # simulator. `bilevel replay` uses the machine's measured values when a scenario gives none.
    calibration: Calibration | None = None

    @property
    def needs_trace(self) -> bool:
        """True when the workload replays a trace."""
        return self.workload.trace is not None

    def problems(self) -> list[Problem]:
        """The layout's problems, then the scenario's own."""
        return self.layout_problems() + _scenario_problems(self)


# Tags of the discriminated unions (service models, generators).
_UNION_TAGS = frozenset(
    {"constant", "exponential", "lognormal", "pareto", "tokens", "poisson", "mmpp", "diurnal"}
)


def _scenario_problems(s: Scenario) -> list[Problem]:
    """Cross-field checks of what only a scenario has: service models and workload."""
    problems: list[Problem] = []
    first_service: dict[str, tuple[int, Any]] = {}
    for i, q in enumerate(s.queues):
        for t in q.job_types:
            if t in first_service and first_service[t][1] != q.service:
                problems.append(
                    (
                        f"queues.{i}.service",
                        f"job type {t!r} also goes to queue {first_service[t][0]} with a "
                        "different service model; service time belongs to the job type",
                    )
                )
            first_service.setdefault(t, (i, q.service))
    accepted = set(first_service)
    w = s.workload
    if (w.trace is None) == (not w.generators):
        problems.append(("workload", "give either generators or a trace, not both or neither"))
    if w.generators and s.duration_s is None and s.max_jobs is None:
        problems.append(("duration_s", "generators need duration_s or max_jobs"))
    for g_i, g in enumerate(w.generators):
        for t in g.mix:
            if t not in accepted:
                problems.append(
                    (f"workload.generators.{g_i}.mix.{t}", "no queue accepts this job type")
                )
        for t in g.tokens:
            if t not in g.mix:
                problems.append((f"workload.generators.{g_i}.tokens.{t}", "job type not in mix"))
    for t, (q_i, service) in first_service.items():
        if not service.needs_tokens:
            continue
        for g_i, g in enumerate(w.generators):
            if t in g.mix and t not in g.tokens:
                problems.append(
                    (
                        f"workload.generators.{g_i}.tokens",
                        f"job type {t!r} has a token-based service model (queues.{q_i}) and "
                        "needs tokens",
                    )
                )
    tr = w.trace
    if tr is not None:
        # Both rescale the clock, except for servegen, whose load_scale thins its rates instead.
        both = tr.load_scale is not None and tr.target_utilization is not None
        if both and tr.format is not TraceFormat.SERVEGEN:
            problems.append(("workload.trace", "give load_scale or target_utilization, not both"))
        if tr.window_s is not None and not tr.window_s[0] < tr.window_s[1]:
            problems.append(("workload.trace.window_s", "needs start < end"))
        if tr.format is not TraceFormat.SERVEGEN:
            if isinstance(tr.path, list):
                problems.append(("workload.trace.path", "a list of files is for servegen only"))
            servegen_only = ("clients", "top_clients", "load_scale_by_model", "max_arrivals")
            for name in servegen_only:
                if getattr(tr, name) is not None:
                    problems.append((f"workload.trace.{name}", "applies to servegen only"))
        for model, factor in (tr.load_scale_by_model or {}).items():
            if not factor > 0:
                problems.append((f"workload.trace.load_scale_by_model.{model}", "must be > 0"))
            # The model is the job type (or trace.job_type renames it), so a typo shows here.
            if model not in accepted and tr.job_type is None:
                problems.append(
                    (f"workload.trace.load_scale_by_model.{model}", "no queue serves this model")
                )
    return problems


def parse_scenario(data: str | Mapping[str, Any], *, source: str = "<scenario>") -> Scenario:
    """A validated scenario from YAML text or a mapping; ScenarioError names every bad field.

    A file in the old layout (`cluster.workers`, a top-level `tick_s`, `allocator`, `router`,
    `guardrails`) is translated by `policies.legacy_layout`, with a LayoutDeprecationWarning
    saying what it now reads as; errors still name the keys the file wrote.
    """
    raw: Any = data
    if isinstance(data, str):
        try:
            raw = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise ScenarioError(source, [("", f"not valid YAML: {exc}")]) from None
    if not isinstance(raw, Mapping):
        raise ScenarioError(source, [("", "a scenario must be a mapping of sections")])
    upgrade = upgrade_scenario(raw)
    if upgrade.refusals:
        raise ScenarioError(source, upgrade.refusals)
    if upgrade.notes:
        warnings.warn(upgrade.message(source), LayoutDeprecationWarning, stacklevel=2)
    try:
        return Scenario.model_validate(upgrade.raw)
    except ValidationError as exc:
        problems = validation_problems(exc, union_tags=_UNION_TAGS, renamed=upgrade.renamed)
        raise ScenarioError(source, problems) from None


# --- building a run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Streams:
    """Independent random streams of one seed."""

    arrivals: np.random.Generator
    service: np.random.Generator
    router: np.random.Generator

    @classmethod
    def of(cls, seed: int) -> Streams:
        a, s, r = np.random.SeedSequence(seed).spawn(3)
        return cls(np.random.default_rng(a), np.random.default_rng(s), np.random.default_rng(r))


def _service_by_type(scenario: Scenario) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for q in scenario.queues:
        for t in q.job_types:
            out.setdefault(t, q.service)
    return out


def build_arrivals(
    scenario: Scenario,
    rng: np.random.Generator,
    *,
    trace_lines: Iterable[str] | None = None,
    trace_source: str = "<trace>",
    run_lines: Iterable[str] | None = None,
    extra_files: Mapping[str, Iterable[str]] | None = None,
) -> ArrivalTable:
    """The scenario's arrivals: drawn from its generators, or replayed from `trace_lines`.

    Load scaling of a trace (`target_utilization`) happens in `build_jobs`, once service times are
    known.
    """
    w = scenario.workload
    if w.trace is None:
        return generate(
            w.generators, rng, duration_s=scenario.duration_s, max_jobs=scenario.max_jobs
        )
    tr = w.trace
    if trace_lines is None:
        raise ScenarioError(
            scenario.name, [("workload.trace.path", "this scenario needs a trace file (--trace)")]
        )
    options: dict[str, Any] = {}
    if tr.format is TraceFormat.AZURE_FUNCTIONS_2019:
        options = {
            "run_lines": run_lines,
            "minutes": tr.minutes,
            "job_type_by": tr.job_type_by,
            "top_functions": tr.top_functions,
            "max_job_types": tr.max_job_types,
        }
    time_scale = None if tr.load_scale is None else 1.0 / tr.load_scale
    if tr.format is TraceFormat.SERVEGEN:
        # Servegen scales its rates instead of its clock, so a day stays a day.
        options = {
            "extra_files": extra_files or {},
            "servegen": ServegenOptions(
                clients=None if tr.clients is None else tuple(tr.clients),
                top_clients=tr.top_clients,
                load_scale=1.0 if tr.load_scale is None else tr.load_scale,
                load_scale_by_model=tr.load_scale_by_model,
                max_arrivals=DEFAULT_MAX_ARRIVALS if tr.max_arrivals is None else tr.max_arrivals,
            ),
        }
        time_scale = None
    arrivals = load_trace(
        tr.format,
        trace_lines,
        source=trace_source,
        job_type=tr.job_type,
        rng=rng,
        window_s=tr.window_s,
        time_scale=time_scale,
        **options,
    )
    table = ArrivalTable.from_arrivals(arrivals)
    if scenario.duration_s is not None:
        table = table.before(scenario.duration_s)
    if scenario.max_jobs is not None:
        table = table.head(scenario.max_jobs)
    return table


def build_jobs(scenario: Scenario, arrivals: ArrivalTable, rng: np.random.Generator) -> Jobs:
    """Service times (a trace's own where given, else drawn per job type) and size estimates.

    With a trace `target_utilization`, arrival times are then stretched so that total service
    work / (span of arrivals x workers) equals the target.
    """
    services = _service_by_type(scenario)
    n = len(arrivals)
    service_s = arrivals.service_s.copy()
    estimate_s = np.empty(n)
    for i, t in enumerate(arrivals.job_types):
        rows = np.flatnonzero(arrivals.type_idx == i)
        model = services.get(t)
        if model is None:
            # Nobody accepts this type: the router rejects it, its size never matters.
            service_s[rows] = np.where(np.isnan(service_s[rows]), 1.0, service_s[rows])
            estimate_s[rows] = 1.0
            continue
        t_in = arrivals.tokens_in[rows]
        t_out = arrivals.tokens_out[rows]
        missing = rows[np.isnan(service_s[rows])]
        if len(missing) and model.needs_tokens:
            no_tokens = np.isnan(arrivals.tokens_in[missing]) & np.isnan(
                arrivals.tokens_out[missing]
            )
            if np.any(no_tokens):
                raise ScenarioError(
                    scenario.name,
                    [("workload", f"job type {t!r} needs token counts the arrivals do not carry")],
                )
        drawn = model.sample_s(
            len(missing), rng, arrivals.tokens_in[missing], arrivals.tokens_out[missing]
        )
        service_s[missing] = drawn
        # A trace's own durations are what the job takes; the scheduler only knows the model.
        estimate_s[rows] = model.estimate_s(t_in, t_out)
    # Traces may carry zero durations; a microsecond keeps every completion after its start.
    service_s = np.maximum(service_s, 1e-6)
    tr = scenario.workload.trace
    if tr is not None and tr.target_utilization is not None and n >= 2:
        span_s = float(arrivals.arrival_s[-1] - arrivals.arrival_s[0])
        if span_s > 0:
            offered = float(service_s.sum()) / span_s / scenario.allocation.budget
            arrivals = ArrivalTable(
                arrival_s=arrivals.arrival_s * (offered / tr.target_utilization),
                type_idx=arrivals.type_idx,
                job_types=arrivals.job_types,
                service_s=arrivals.service_s,
                tokens_in=arrivals.tokens_in,
                tokens_out=arrivals.tokens_out,
                priority=arrivals.priority,
                deadline_s=arrivals.deadline_s,
                tenants=arrivals.tenants,
            )
    return Jobs(arrivals=arrivals, service_s=service_s, size_estimate_s=estimate_s)


def build_spec(scenario: Scenario, jobs: Jobs) -> SimSpec:
    """The run's fixed parameters; the default initial allocation follows each queue's share of
    the jobs' total service work (job types several queues accept split evenly among them)."""
    services = _service_by_type(scenario)
    queues = tuple(
        QueueSpec(
            name=q.name,
            job_types=frozenset(q.job_types),
            model_load_s=q.model_load_s,
            slo_s=q.slo_s,
            nominal_service_s=services[q.job_types[0]].nominal_mean_s,
        )
        for q in scenario.queues
    )
    a = jobs.arrivals
    allocation = scenario.allocation
    if allocation.initial is not None:
        initial = tuple(allocation.initial.get(q.name, 0) for q in queues)
    else:
        work_by_type = np.bincount(a.type_idx, weights=jobs.service_s, minlength=len(a.job_types))
        weights = [0.0] * len(queues)
        for t_i, t in enumerate(a.job_types):
            takers = [i for i, q in enumerate(queues) if t in q.job_types]
            for i in takers:
                weights[i] += float(work_by_type[t_i]) / len(takers)
        initial = initial_split(allocation.budget, weights)
    last_s = float(a.arrival_s[-1]) if len(a) else 0.0
    horizon_s = scenario.duration_s if scenario.duration_s is not None else last_s
    if scenario.workload.trace is not None and scenario.duration_s is not None:
        horizon_s = max(horizon_s, last_s)
    return SimSpec(
        queues=queues,
        budget=allocation.budget,
        initial_allocation=initial,
        tick_s=allocation.tick_s,
        horizon_s=horizon_s,
        drain=scenario.drain,
        max_drain_s=(
            scenario.max_drain_s if scenario.max_drain_s is not None else max(horizon_s, 60.0)
        ),
        rate_window_s=max(10.0 * allocation.tick_s, 10.0),
        slo_by_type_s=dict(scenario.slos.job_types),
        default_slo_s=scenario.slos.default_s,
        tenants=dict(scenario.tenants),
    )


def make_router_for(scenario: Scenario, name: str | None = None) -> Router:
    """The scenario's router, or `name` (with the scenario's params only if it names the same)."""
    routing = scenario.routing
    if name is None or name == routing.policy:
        return make_router(routing.policy, **routing.params)
    return make_router(name)


def scenario_allocator(scenario: Scenario, name: str | None = None) -> Allocator:
    """The scenario's allocator (or `name`, with the scenario's params only if it names the
    same), unguarded: `policies.episodes.run_episode` adds the guardrails."""
    allocation = scenario.allocation
    if name is None or name == allocation.policy:
        return make_allocator(allocation.policy, **allocation.params)
    return make_allocator(name)


def make_allocator_for(scenario: Scenario, name: str | None = None) -> Allocator:
    """`scenario_allocator` wrapped in the scenario's guardrails, for driving a `SimRun` by hand."""
    return guardrails_for(scenario, scenario_allocator(scenario, name))


@dataclass(frozen=True, eq=False)
class PreparedRun:
    """A scenario's jobs for one seed, reusable across policies (same seed, same jobs)."""

    scenario: Scenario
    spec: SimSpec
    jobs: Jobs
    seed: int

    def start(self, router: Router) -> SimRun:
        """A fresh run of these jobs; the router's stream restarts from the seed every time."""
        return SimRun(self.spec, self.jobs, router, Streams.of(self.seed).router)


def prepare(
    scenario: Scenario,
    seed: int,
    *,
    trace_lines: Iterable[str] | None = None,
    trace_source: str = "<trace>",
    run_lines: Iterable[str] | None = None,
    extra_files: Mapping[str, Iterable[str]] | None = None,
) -> PreparedRun:
    """Draws (or replays) the scenario's jobs for `seed`; `extra_files` (name -> lines) are a
    servegen trace's further arrivals files and its lengths files."""
    streams = Streams.of(seed)
    arrivals = build_arrivals(
        scenario,
        streams.arrivals,
        trace_lines=trace_lines,
        trace_source=trace_source,
        run_lines=run_lines,
        extra_files=extra_files,
    )
    jobs = build_jobs(scenario, arrivals, streams.service)
    spec = build_spec(scenario, jobs)
    if scenario.calibration is not None:
        spec, jobs = calibrated(spec, jobs, scenario.calibration)
    return PreparedRun(scenario, spec, jobs, seed)
