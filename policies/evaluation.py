"""Running allocators over seeds on the same arrivals, and the statistics `bilevel evaluate` prints.

Pure: scenarios arrive parsed and traces as lines (the CLI reads files). Every policy of a comparison
runs on the same prepared jobs per seed (common random numbers), inside the scenario's guardrails,
so differences between policies are differences in decisions, not in luck. Which seeds and which
part of a trace are held out is decided in `policies.seeds`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import Any

import numpy as np

from policies.episodes import run_episode
from policies.guardrails import Guardrails, guardrails_for
from policies.seeds import TRAIN_WINDOW_FRACTION, TracePart
from policies.sim.metrics import RunRecord, finite_or_none, summarize
from policies.sim.run import Jobs
from policies.sim.scenario import (
    PreparedRun,
    Scenario,
    build_spec,
    prepare,
)
from policies.views import Allocator, Router

# Builds a fresh, unguarded allocator for one run (allocators may keep state across ticks).
PolicyFactory = Callable[[], Allocator]
# Builds a fresh router for one run (routers may keep state, e.g. round-robin turns).
RouterFactory = Callable[[], Router]


# --- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceInput:
    """A trace's text, already read: the lines of its file, and the durations file's if any."""

    lines: tuple[str, ...]
    source: str = "<trace>"
    # The `*_run.csv` beside an Azure Functions 2019 invocations file.
    run_lines: tuple[str, ...] | None = None
    # A servegen trace's further files (its other arrivals files, its lengths files): name, lines.
    extra_files: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def digest(self) -> str:
        """A short hash of the trace's content, so tuned values are tied to the trace they saw."""
        h = hashlib.sha256()
        parts = [self.lines, self.run_lines or ()]
        # Base names only: a servegen model is named by its file, wherever the file lies.
        parts += [(PurePath(name).name, *lines) for name, lines in self.extra_files]
        for part in parts:
            for line in part:
                h.update(line.encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()[:16]


def scenario_fingerprint(scenario: Scenario, trace: TraceInput | None = None) -> str:
    """A short hash of everything about a scenario that changes its runs (and the trace's content).

    The description, the shadow policy (which decides only in the live service) and the queues'
    live_model (which only a live replay reads) are left out: none changes a run. Tuned parameters
    are stored with this, so a user's scenario that merely reuses a shipped name is tuned afresh,
    not given foreign values. Sections a scenario does not
    give (tenants, calibration) are left out too, so scenarios hash as they did before those existed.
    """
    shadow = {"shadow": True, "shadow_params": True, "shadow_promote": True}
    exclude: dict[str, Any] = {
        "description": True,
        "allocation": shadow,
        "queues": {"__all__": {"live_model": True}},
    }
    if not scenario.tenants:
        exclude["tenants"] = True
    if scenario.calibration is None:
        exclude["calibration"] = True
    data = scenario.model_dump(mode="json", exclude=exclude)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    if trace is not None:
        text += "|trace:" + trace.digest()
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --- held-out windows ---------------------------------------------------------------------------


def split_window(
    prepared: PreparedRun, part: TracePart, train_fraction: float = TRAIN_WINDOW_FRACTION
) -> PreparedRun:
    """The jobs of one part of a prepared run, split by arrival time.

    "train" keeps the arrivals in the first `train_fraction` of the span from the first to the last
    arrival; "test" keeps the rest, shifted so that the window starts at time 0 (the run then starts
    like any other, with the initial allocation fitted to the window's own work).
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    jobs = prepared.jobs
    arrival_s = jobs.arrivals.arrival_s
    if len(arrival_s) == 0:
        return prepared
    first_s, last_s = float(arrival_s[0]), float(arrival_s[-1])
    split_s = first_s + train_fraction * (last_s - first_s)
    cut = int(np.searchsorted(arrival_s, split_s, side="left"))
    if part == "train":
        idx = np.arange(0, cut, dtype=np.int64)
        shift_s = 0.0
    else:
        idx = np.arange(cut, len(arrival_s), dtype=np.int64)
        shift_s = split_s
    table = jobs.arrivals.take(idx)
    table = replace(table, arrival_s=table.arrival_s - shift_s)
    window = Jobs(
        arrivals=table, service_s=jobs.service_s[idx], size_estimate_s=jobs.size_estimate_s[idx]
    )
    scenario = prepared.scenario
    if scenario.duration_s is not None and part == "test":
        # The scenario's duration counts from the trace's start; the test window starts at 0.
        scenario = scenario.model_copy(update={"duration_s": None})
    return PreparedRun(prepared.scenario, build_spec(scenario, window), window, prepared.seed)


def prepare_part(
    scenario: Scenario,
    seed: int,
    *,
    part: TracePart,
    trace: TraceInput | None = None,
    max_jobs: int | None = None,
) -> PreparedRun:
    """The jobs of `scenario` for `seed`: all of them for a generator workload (held-out there
    means held-out seeds), the `part` window of the trace for a trace replay.

    `max_jobs` caps the arrivals (before the window split), to keep tuning and tests short.
    """
    if max_jobs is not None:
        cap = max_jobs if scenario.max_jobs is None else min(max_jobs, scenario.max_jobs)
        scenario = scenario.model_copy(update={"max_jobs": cap})
    if not scenario.needs_trace:
        return prepare(scenario, seed)
    if trace is None:
        raise ValueError(f"scenario {scenario.name!r} replays a trace: its lines are needed")
    prepared = prepare(
        scenario,
        seed,
        trace_lines=trace.lines,
        trace_source=trace.source,
        run_lines=trace.run_lines,
        extra_files=dict(trace.extra_files) or None,
    )
    return split_window(prepared, part)


# --- one run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOutcome:
    """The numbers of one run that evaluation and tuning compare."""

    # Over completed jobs (as `bilevel simulate` reports); NaN when none completed.
    mean_jct_s: float
    p99_jct_s: float
    # Time in system per accepted job, unfinished jobs counted up to the end of the run: equal to
    # mean_jct_s when every job completes, and never flattered by jobs a policy left waiting.
    mean_sojourn_s: float
    completed: int
    unfinished: int
    reconfigurations: int
    slo_attainment: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean_jct_s": finite_or_none(self.mean_jct_s),
            "p99_jct_s": finite_or_none(self.p99_jct_s),
            "mean_sojourn_s": finite_or_none(self.mean_sojourn_s),
            "completed": self.completed,
            "unfinished": self.unfinished,
            "reconfigurations": self.reconfigurations,
            "slo_attainment": self.slo_attainment,
        }


def outcome_of(record: RunRecord) -> RunOutcome:
    """The comparison numbers of a finished run."""
    summary = summarize(record)
    accepted = summary.arrived - summary.rejected
    sojourn_s = record.area_job_s / accepted if accepted > 0 else math.nan
    return RunOutcome(
        mean_jct_s=summary.jct.mean_s,
        p99_jct_s=summary.jct.p99_s,
        mean_sojourn_s=sojourn_s,
        completed=summary.completed,
        unfinished=summary.in_system,
        reconfigurations=summary.reconfigurations,
        slo_attainment=summary.jct.slo_attainment,
    )


def guarded(scenario: Scenario, inner: Allocator) -> Guardrails:
    """`inner` inside the scenario's guardrails, as every allocator runs in the simulator."""
    return guardrails_for(scenario, inner)


def run_policy(
    prepared: PreparedRun, factory: PolicyFactory, router: RouterFactory | None = None
) -> RunOutcome:
    """One episode (`policies.episodes.run_episode`) of a fresh allocator from `factory`, guarded,
    with a fresh router from `router` (default: the scenario's)."""
    level_1 = router() if router is not None else None
    return outcome_of(run_episode(prepared, factory(), level_1).record)


@dataclass(frozen=True)
class EpisodeTask:
    """One (policy x seed) episode of an evaluation or a tuning, as a task an executor can ship
    to another process (the factories go along; Ray pickles closures)."""

    scenario: Scenario
    seed: int
    factory: PolicyFactory
    router: RouterFactory | None = None
    part: TracePart = "test"
    trace: TraceInput | None = None
    max_jobs: int | None = None


def run_episode_task(task: EpisodeTask) -> RunOutcome:
    """`run_policy` on the task's prepared jobs: the same numbers wherever it runs, since the
    jobs depend only on the scenario and the seed."""
    prepared = prepare_part(
        task.scenario, task.seed, part=task.part, trace=task.trace, max_jobs=task.max_jobs
    )
    return run_policy(prepared, task.factory, task.router)


# Runs episode tasks and returns their outcomes in task order, calling `done(i)` as task i
# finishes (in any order): `map_episodes_serial` here, Ray tasks in `scheduler.episode_tasks`.
MapEpisodes = Callable[[Sequence[EpisodeTask], Callable[[int], None] | None], list[RunOutcome]]


def map_episodes_serial(
    tasks: Sequence[EpisodeTask], done: Callable[[int], None] | None = None
) -> list[RunOutcome]:
    """The in-process executor: one task after another."""
    outcomes = []
    for i, task in enumerate(tasks):
        outcomes.append(run_episode_task(task))
        if done is not None:
            done(i)
    return outcomes


def evaluate_scenario(
    scenario: Scenario,
    factories: Mapping[str, PolicyFactory],
    seeds: Sequence[int],
    *,
    part: TracePart = "test",
    trace: TraceInput | None = None,
    max_jobs: int | None = None,
    progress: Callable[[str, int], None] | None = None,
    routers: Mapping[str, RouterFactory] | None = None,
    map_episodes: MapEpisodes | None = None,
) -> dict[str, list[RunOutcome]]:
    """Every policy of `factories` on the same jobs for each seed: {policy: outcomes in seed order}.

    A policy named in `routers` routes with that router, the others with the scenario's (so a
    comparison of routers gives every name the same allocator factory and its own router).
    `progress(policy, seed)` is called before each run in-process, and as each finishes with
    `map_episodes` (which runs every (policy, seed) episode as one task; the same numbers).
    """
    routers = routers or {}
    results: dict[str, list[RunOutcome]] = {name: [] for name in factories}
    if map_episodes is not None:
        tasks = [
            EpisodeTask(scenario, seed, factory, routers.get(name), part, trace, max_jobs)
            for seed in seeds
            for name, factory in factories.items()
        ]
        names = [name for _ in seeds for name in factories]

        def done(i: int) -> None:
            if progress is not None:
                progress(names[i], tasks[i].seed)

        for name, outcome in zip(names, map_episodes(tasks, done), strict=True):
            results[name].append(outcome)
        return results
    for seed in seeds:
        prepared = prepare_part(scenario, seed, part=part, trace=trace, max_jobs=max_jobs)
        for name, factory in factories.items():
            if progress is not None:
                progress(name, seed)
            results[name].append(run_policy(prepared, factory, routers.get(name)))
    return results


# --- statistics ---------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    # The continued fraction converges fast only on this side of the mean; use symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (bisection on `t_cdf`).

    numpy has no t distribution and scipy is not a dependency; bisection to 1e-12 is exact enough
    for a confidence interval and costs microseconds.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    while high - low > 1e-12 * max(1.0, high):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


@dataclass(frozen=True)
class MeanCI:
    """A sample mean with the half-width of its confidence interval (t distribution over samples)."""

    mean: float
    half_width: float
    n: int
    confidence: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": finite_or_none(self.mean),
            "ci95": finite_or_none(self.half_width),
            "n": self.n,
        }


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> MeanCI:
    """Mean and t-based confidence half-width, t_{(1+c)/2, n-1} * s / sqrt(n).

    NaN values (a run with no completed job) make the result NaN rather than silently dropping a
    seed; one value gives an infinite half-width, since one sample says nothing about spread.
    """
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return MeanCI(math.nan, math.nan, 0, confidence)
    mean = float(x.mean())
    if n == 1:
        return MeanCI(mean, math.inf, 1, confidence)
    std = float(x.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return MeanCI(mean, half, n, confidence)


@dataclass(frozen=True)
class PolicyStats:
    """One policy's results over the evaluation seeds."""

    mean_jct_s: MeanCI
    p99_jct_s: MeanCI
    unfinished: int
    reconfigurations: MeanCI

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean_jct_s": self.mean_jct_s.to_dict(),
            "p99_jct_s": self.p99_jct_s.to_dict(),
            "unfinished": self.unfinished,
            "reconfigurations": self.reconfigurations.to_dict(),
        }


def policy_stats(outcomes: Sequence[RunOutcome]) -> PolicyStats:
    """Mean ± 95% CI over seeds of mean and p99 JCT (and of reconfigurations)."""
    return PolicyStats(
        mean_jct_s=mean_ci([o.mean_jct_s for o in outcomes]),
        p99_jct_s=mean_ci([o.p99_jct_s for o in outcomes]),
        unfinished=sum(o.unfinished for o in outcomes),
        reconfigurations=mean_ci([float(o.reconfigurations) for o in outcomes]),
    )


@dataclass(frozen=True)
class Comparison:
    """How a policy fares against the best of a set of baselines (by mean JCT over seeds).

    Gains are relative reductions, 1 - policy / baseline: positive means the policy is better.
    """

    policy: str
    best_baseline: str
    # From the means over seeds.
    gain_mean_jct: float
    gain_p99_jct: float
    # Per-seed gains on the same arrivals (paired), with their CI: tighter than comparing CIs.
    paired_gain_mean_jct: MeanCI

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "best_heuristic": self.best_baseline,
            "gain_mean_jct": finite_or_none(self.gain_mean_jct),
            "gain_p99_jct": finite_or_none(self.gain_p99_jct),
            "paired_gain_mean_jct": self.paired_gain_mean_jct.to_dict(),
        }


def _rank_value(x: float) -> float:
    return math.inf if math.isnan(x) else x


def compare(
    results: Mapping[str, Sequence[RunOutcome]], policy: str, baselines: Sequence[str]
) -> Comparison:
    """`policy` against the baseline with the lowest mean (over seeds) mean JCT; ties: first listed."""
    if not baselines:
        raise ValueError("need at least one baseline")
    means = {name: policy_stats(results[name]).mean_jct_s.mean for name in baselines}
    best = min(baselines, key=lambda name: _rank_value(means[name]))
    mine = policy_stats(results[policy])
    theirs = policy_stats(results[best])
    paired = [
        1.0 - p.mean_jct_s / b.mean_jct_s
        for p, b in zip(results[policy], results[best], strict=True)
    ]
    return Comparison(
        policy=policy,
        best_baseline=best,
        gain_mean_jct=_gain(mine.mean_jct_s.mean, theirs.mean_jct_s.mean),
        gain_p99_jct=_gain(mine.p99_jct_s.mean, theirs.p99_jct_s.mean),
        paired_gain_mean_jct=mean_ci(paired),
    )


def _gain(policy_value: float, baseline_value: float) -> float:
    if not baseline_value > 0:
        return math.nan
    return 1.0 - policy_value / baseline_value
