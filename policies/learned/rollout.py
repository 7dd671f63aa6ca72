"""One simulated episode as a picklable task in, a picklable result out.

Training and evaluation describe every episode as a `RolloutTask` (scenario, arrival seed, load
scale, episode length, and either learned weights or a heuristic's name) and hand batches of them to
an injected executor: `scheduler.training` runs them as Ray tasks, or serially in-process. Nothing
here starts processes or touches files; `run_rollout` is a pure function of its task.

Rewards. Tick t's decision is credited with the interval up to tick t+1 (the last one with the time
to the end of the run): reward_t = -(integral of jobs in system over that interval), in job-seconds.
Summed over the episode this is minus the total time jobs spent in the system, i.e. minus total JCT
(plus the unfinished jobs' time so far, so starving a queue is never free). An optional penalty per
worker moved prices reconfiguration beyond the model load the simulator already charges, and an
optional penalty per SLO miss is charged to the tick interval in which the job's time in system
passed its JCT target (its deadline, else its type's or queue's SLO), finished or not: that is
when the miss became certain, so the decisions just before it get the blame.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policies.allocation import largest_remainder
from policies.episodes import BaseRecorder, run_episode
from policies.evaluation import TraceInput, prepare_part
from policies.guardrails import Guardrails, guardrails_for
from policies.learned.allocator import LearnedAllocator, TickDecision, moves_toward
from policies.learned.forecast import ForecastSample
from policies.learned.policy import LearnedPolicy
from policies.learned.router import LearnedRouter, RouteChoice
from policies.regime import RegimeTargetsAllocator
from policies.registry import make_allocator
from policies.sim.metrics import RunRecord, summarize
from policies.sim.run import SimRun, SimSpec
from policies.sim.scenario import Scenario, make_router_for, parse_scenario
from policies.views import Allocation, Allocator, ClusterView, Router

# Generator fields that carry an arrival rate, by generator kind; `scale_scenario` multiplies them.
_RATE_FIELDS = {"poisson": ("rate_per_s",), "diurnal": ("base_rate_per_s",)}


def scale_scenario(
    scenario: Scenario, *, load_scale: float = 1.0, duration_s: float | None = None
) -> Scenario:
    """`scenario` with every generator's arrival rates times `load_scale` (a trace's load_scale or
    target utilisation too) and, when given, another `duration_s`; the result is validated like a
    scenario file."""
    if load_scale == 1.0 and duration_s is None:
        return scenario
    data: dict[str, Any] = scenario.model_dump(mode="json")
    for generator in data["workload"]["generators"]:
        for name in _RATE_FIELDS.get(generator["kind"], ()):
            generator[name] *= load_scale
        for state in generator.get("states", ()):  # MMPP: every state's rate
            state["rate_per_s"] *= load_scale
    trace = data["workload"]["trace"]
    if trace is not None and load_scale != 1.0:
        # A trace sets its load either way; scaling the arrival rate scales a target utilisation
        # just as it does a multiplier (the two may not be given together).
        if trace.get("target_utilization") is not None:
            trace["target_utilization"] *= load_scale
        else:
            trace["load_scale"] = (trace.get("load_scale") or 1.0) * load_scale
    if duration_s is not None:
        data["duration_s"] = duration_s
    return parse_scenario(data, source=scenario.name)


def random_initial_allocation(spec: SimSpec, seed: int) -> SimSpec:
    """`spec` with the whole budget split over the queues by random (Dirichlet) weights."""
    weights = np.random.default_rng(seed).dirichlet(np.ones(len(spec.queues)))
    initial = largest_remainder(weights, spec.budget)
    return dataclasses.replace(spec, initial_allocation=tuple(int(c) for c in initial))


def capped_duration(scenario: Scenario, max_duration_s: float | None) -> float | None:
    """`max_duration_s` when the scenario runs longer than it, else None (its own duration)."""
    if max_duration_s is not None and (scenario.duration_s or math.inf) > max_duration_s:
        return max_duration_s
    return None


def training_starts(seeds: Sequence[int]) -> list[tuple[int, int | None]]:
    """(arrival seed, initial-allocation seed) of the episodes a candidate policy is scored on
    during training: every other one starts from a random split of the workers (seeded by its
    arrival seed), so a candidate must also recover from a poor allocation."""
    return [(seed, seed if i % 2 else None) for i, seed in enumerate(seeds)]


def has_routing_choice(scenario: Scenario) -> bool:
    """True when some job type is accepted by two or more queues (so level 1 has a real choice)."""
    seen: set[str] = set()
    for queue in scenario.queues:
        for job_type in queue.job_types:
            if job_type in seen:
                return True
            seen.add(job_type)
    return False


@dataclass(frozen=True)
class RolloutTask:
    """One episode to run. Exactly one of `policy` (learned) and `heuristic` is set."""

    scenario: Scenario
    arrival_seed: int
    load_scale: float = 1.0
    # Overrides the scenario's duration (episode length); None keeps it.
    duration_s: float | None = None
    policy: LearnedPolicy | None = None
    # A registry allocator name, run under the scenario's guardrails with `heuristic_params`
    # (its constructor parameters, e.g. the tuned ones of `policies.tuned`; None: defaults).
    heuristic: str | None = None
    heuristic_params: Mapping[str, Any] | None = None
    # Seed of the learned policy's sampling; None means deterministic (the mode).
    policy_seed: int | None = None
    # Route with the learned router where the scenario has a routing choice.
    learned_router: bool = False
    # Keep every decision (needed for training, not for evaluation).
    record: bool = False
    # Which group of replays of the same arrivals this episode belongs to (for the baseline).
    group: int = 0
    # Seed of a random initial allocation (a random split of the budget) instead of the
    # scenario's; None keeps the scenario's. The default split follows each queue's share of the
    # run's total work, which a policy could learn to merely keep; random starts make it learn to
    # correct an allocation instead.
    initial_seed: int | None = None
    # With a recording learned policy: a heuristic (registry name, and its parameters) asked at
    # every recorded tick what it would do in the learned policy's situation (DAgger), without
    # acting; its answer, as moves, is kept for an imitation term in training.
    teacher: str | None = None
    teacher_params: Mapping[str, Any] | None = None
    # With a teacher: apply the teacher's allocation instead of the learned policy's, which still
    # runs and records (the first rounds of DAgger visit the teacher's states).
    teacher_acts: bool = False
    # The lines of the trace a trace-replay scenario replays. Episodes use only its training
    # window (policies.seeds.TRAIN_WINDOW_FRACTION); the rest is held out for `bilevel evaluate`.
    trace: TraceInput | None = None
    # With a learned policy and `policy_seed`: False makes the allocator act by its mode while the
    # router samples (training the router alone, against a fixed allocator).
    allocator_samples: bool = True
    # With a learned policy: always take this base heuristic's proposal, uncorrected (no moves),
    # with the policy's forecast; scores each base as the residual policy would run it.
    force_base: int | None = None
    # With a learned policy that has a forecaster: keep its inputs and what then arrived, for
    # fitting it (`RolloutResult.forecast_samples`); other episodes skip that bookkeeping.
    record_forecast: bool = False

    def __post_init__(self) -> None:
        if (self.policy is None) == (self.heuristic is None):
            raise ValueError("a rollout task needs exactly one of policy and heuristic")


@dataclass(frozen=True, eq=False)
class RolloutResult:
    """What an episode produced: per-tick rewards and decisions, and its headline numbers."""

    scenario: str
    arrival_seed: int
    group: int
    # (T,) job-seconds; reward of tick t's decision (see module docstring).
    rewards: np.ndarray
    # (T,) workers moved by tick t's decision (after guardrails).
    moved: np.ndarray
    # (T,) jobs whose time in system passed their JCT target during tick t's interval.
    slo_misses: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    decisions: list[TickDecision] = field(default_factory=list)
    # Per decision, the teacher's decision as moves (same form as TickDecision.moves), if asked.
    teacher_moves: list[np.ndarray] = field(default_factory=list)
    # Per decision, a target-setting teacher's (`RegimeTargetsAllocator`) targets before its hold
    # rule, in workers per queue; empty for other teachers.
    teacher_targets: list[np.ndarray] = field(default_factory=list)
    route_choices: list[RouteChoice] = field(default_factory=list)
    # (len(route_choices),) tick index each routing choice is credited to.
    route_ticks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # The recorded forecast inputs whose window ended before arrivals stopped, and per sample the
    # mean arrival rate per queue over that window (what the forecaster learns to predict).
    forecast_samples: list[ForecastSample] = field(default_factory=list)
    forecast_targets: list[np.ndarray] = field(default_factory=list)
    mean_jct_s: float = math.nan
    p99_jct_s: float = math.nan
    jobs: int = 0
    unfinished: int = 0
    reconfigurations: int = 0
    fallbacks: int = 0


def _area_now(run: SimRun) -> float:
    """Job-seconds in system from time 0 to now (the cluster integrates only up to its last event)."""
    cluster = run.cluster
    return cluster.area_job_s + cluster.in_system * (run.now_s - cluster.last_change_s)


def run_rollout(task: RolloutTask) -> RolloutResult:
    """Runs one episode of `task` and returns its rewards, decisions and summary."""
    scenario = scale_scenario(task.scenario, load_scale=task.load_scale, duration_s=task.duration_s)
    prepared = prepare_part(scenario, task.arrival_seed, part="train", trace=task.trace)
    if task.initial_seed is not None:
        prepared = dataclasses.replace(
            prepared, spec=random_initial_allocation(prepared.spec, task.initial_seed)
        )
    bounds = scenario.bounds()
    learned: LearnedAllocator | None = None
    router: Router
    learned_router: LearnedRouter | None = None
    inner: Allocator
    if task.policy is not None:
        rng = None if task.policy_seed is None else np.random.default_rng(task.policy_seed)
        learned = task.policy.allocator(
            bounds=bounds,
            rng=rng if task.allocator_samples else None,
            record=task.record,
            force_base=task.force_base,
            max_moves=0 if task.force_base is not None else None,
            record_forecast=task.record_forecast,
        )
        inner = learned
        if task.learned_router and has_routing_choice(scenario):
            learned_router = task.policy.router(rng=rng, record=task.record)
    else:
        assert task.heuristic is not None
        inner = make_allocator(task.heuristic, **dict(task.heuristic_params or {}))
    router = learned_router if learned_router is not None else make_router_for(scenario)
    teacher: Guardrails | None = None
    if task.teacher is not None and learned is not None and task.record:
        teacher = guardrails_for(
            scenario, make_allocator(task.teacher, **dict(task.teacher_params or {}))
        )
    transitions = _Transitions(
        learned=learned,
        learned_router=learned_router,
        teacher=teacher,
        forecasting=learned is not None and learned.forecaster is not None and task.record_forecast,
    )
    act = transitions.teacher_acts if teacher is not None and task.teacher_acts else None
    episode = run_episode(prepared, inner, router, recorders=[transitions], act=act)
    record = episode.record
    summary = summarize(record)
    areas = transitions.areas
    route_marks = transitions.route_marks
    forecaster = learned.forecaster if learned is not None else None
    forecasting = transitions.forecasting

    route_choices: list[RouteChoice] = []
    route_ticks = np.zeros(0, dtype=np.int64)
    if learned_router is not None:
        route_choices = learned_router.choices
        # A choice made on the way to tick t+1 is credited to tick t (whose interval it fell in).
        made_by = np.asarray(route_marks, dtype=np.int64)
        route_ticks = np.maximum(
            np.searchsorted(made_by, np.arange(len(route_choices)), side="right") - 1, 0
        )
    forecast_samples: list[ForecastSample] = []
    forecast_targets: list[np.ndarray] = []
    if forecasting and forecaster is not None:
        forecast_samples, forecast_targets = forecast_targets_of(
            forecaster.samples, transitions.routed_marks, prepared.spec.horizon_s
        )
    return RolloutResult(
        scenario=scenario.name,
        arrival_seed=task.arrival_seed,
        group=task.group,
        rewards=-np.diff(np.asarray(areas, dtype=np.float64)),
        moved=np.asarray(transitions.moved, dtype=np.int64),
        slo_misses=slo_misses_per_tick(record, transitions.tick_times),
        decisions=learned.decisions if learned is not None else [],
        teacher_moves=transitions.teacher_moves,
        teacher_targets=transitions.teacher_targets,
        route_choices=route_choices,
        route_ticks=route_ticks,
        forecast_samples=forecast_samples,
        forecast_targets=forecast_targets,
        mean_jct_s=summary.jct.mean_s,
        p99_jct_s=summary.jct.p99_s,
        jobs=summary.completed,
        unfinished=summary.in_system,
        reconfigurations=summary.reconfigurations,
        fallbacks=episode.fallbacks,
    )


class _Transitions(BaseRecorder):
    """The training rollout's recorder: per tick the area under jobs in system (the rewards are
    its differences), the workers moved, the tick times, the routing choices made by then, the
    routed counts (for the forecast targets) and, with a teacher, what it would have done in the
    learned policy's situation (DAgger), asked before the policy decides."""

    def __init__(
        self,
        *,
        learned: LearnedAllocator | None,
        learned_router: LearnedRouter | None,
        teacher: Guardrails | None,
        forecasting: bool,
    ) -> None:
        self.learned = learned
        self.learned_router = learned_router
        self.teacher = teacher
        self.forecasting = forecasting
        self.areas: list[float] = []
        self.moved: list[int] = []
        # Number of routing choices made by the time each tick was reached.
        self.route_marks: list[int] = []
        # (time, jobs routed per queue so far) at every tick, for the forecast targets.
        self.routed_marks: list[tuple[float, np.ndarray]] = []
        self.tick_times: list[float] = []
        self.teacher_moves: list[np.ndarray] = []
        self.teacher_targets: list[np.ndarray] = []
        self._wanted: Allocation = {}
        self._recorded = 0

    def tick(self, run: SimRun, view: ClusterView) -> None:
        if self.forecasting:
            self.routed_marks.append((view.now_s, run.routed_jobs))
        if self.learned_router is not None:
            self.route_marks.append(len(self.learned_router.choices))
        self.areas.append(_area_now(run))
        self.tick_times.append(view.now_s)
        if self.teacher is not None and self.learned is not None:
            self._wanted = self.teacher.allocate(view)
            self._recorded = len(self.learned.decisions)

    def teacher_acts(self, view: ClusterView, allocation: Allocation) -> Allocation:
        """The teacher's allocation in place of the policy's (the first rounds of DAgger)."""
        return self._wanted

    def decided(self, run: SimRun, view: ClusterView, allocation: Allocation, moved: int) -> None:
        learned, teacher = self.learned, self.teacher
        if teacher is not None and learned is not None and len(learned.decisions) > self._recorded:
            d = learned.decisions[-1]
            target = np.fromiter(
                (self._wanted.get(q.name, q.allocated) for q in view.queues),
                np.int64,
                len(d.counts),
            )
            self.teacher_moves.append(
                moves_toward(d.counts, d.free, target, d.low, d.high, d.moves.shape[0])
            )
            if isinstance(teacher.inner, RegimeTargetsAllocator):
                assert teacher.inner.last_targets is not None
                self.teacher_targets.append(teacher.inner.last_targets)
        self.moved.append(moved)

    def end(self, run: SimRun, record: RunRecord) -> None:
        self.areas.append(record.area_job_s)


def slo_misses_per_tick(record: RunRecord, tick_times: Sequence[float]) -> np.ndarray:
    """(T,) per tick interval, the accepted jobs whose time in system passed their JCT target in
    it (misses before the first tick count in the first interval); jobs without a target never
    miss."""
    counts = np.zeros(len(tick_times), dtype=np.int64)
    if not tick_times:
        return counts
    accepted = record.queue_idx >= 0
    target = record.slo_target_s
    finished_s = np.where(np.isnan(record.completion_s), record.end_s, record.completion_s)
    missed = accepted & ~np.isnan(target) & (finished_s - record.arrival_s > target)
    at_s = (record.arrival_s + target)[missed]
    ticks = np.clip(np.searchsorted(np.asarray(tick_times), at_s, side="right") - 1, 0, None)
    np.add.at(counts, ticks, 1)
    return counts


def forecast_targets_of(
    samples: Sequence[ForecastSample],
    routed_marks: Sequence[tuple[float, np.ndarray]],
    arrivals_end_s: float,
) -> tuple[list[ForecastSample], list[np.ndarray]]:
    """The samples whose window [t, t + window] ends by `arrivals_end_s` and, for each, the mean
    arrival rate per queue over its window, from the routed counts at the ticks (interpolated
    between ticks). Samples past the end are dropped: the drain after the last arrival would read
    as a collapse of every rate."""
    if not samples or not routed_marks:
        return [], []
    times = np.array([t for t, _ in routed_marks])
    counts = np.stack([c for _, c in routed_marks])
    end_s = min(arrivals_end_s, float(times[-1]))
    kept: list[ForecastSample] = []
    targets: list[np.ndarray] = []
    for sample in samples:
        if sample.now_s + sample.window_s > end_s or sample.window_s <= 0:
            continue
        at = np.array([sample.now_s, sample.now_s + sample.window_s])
        ahead = np.stack([np.interp(at, times, counts[:, q]) for q in range(counts.shape[1])])
        kept.append(sample)
        targets.append((ahead[:, 1] - ahead[:, 0]) / sample.window_s)
    return kept, targets


# How a batch of rollouts gets run: serially, in a process pool, or as Ray tasks.
MapRollouts = Callable[[Sequence[RolloutTask]], list[RolloutResult]]


def with_traces(map_rollouts: MapRollouts, traces: Mapping[str, TraceInput]) -> MapRollouts:
    """`map_rollouts` that first gives each task of a trace scenario its trace (`traces` by
    scenario name), so training code that builds tasks from scenarios needs no trace plumbing."""
    if not traces:
        return map_rollouts

    def attach(tasks: Sequence[RolloutTask]) -> list[RolloutResult]:
        return map_rollouts(
            [
                dataclasses.replace(t, trace=traces[t.scenario.name])
                if t.trace is None and t.scenario.name in traces
                else t
                for t in tasks
            ]
        )

    return attach


def map_serial(tasks: Sequence[RolloutTask]) -> list[RolloutResult]:
    """Runs the tasks one after another in this process (tests, debugging)."""
    return [run_rollout(task) for task in tasks]
