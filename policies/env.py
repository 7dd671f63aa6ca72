"""The simulator as a Gymnasium environment, for users who train level 2 with their own RL library.

Importing this module registers it as `bilevel/Allocation-v0`:

    import gymnasium, policies.env
    env = gymnasium.make("bilevel/Allocation-v0", scenario=yaml_text, max_ticks=500)

One step is one level-2 tick of a scenario run (`policies.sim.run.SimRun`).

Observation, a `Dict` with static shapes whatever the scenario, for at most `n_max_queues` queues:
  - "features": Box(0, FEATURE_HIGH, (n_max_queues, N_QUEUE_FEATURES), float32), row i the
    `policies.features.queue_features` of queue i (the featurisation every learned policy uses,
    schema `FEATURE_SCHEMA_VERSION`); rows past the scenario's queues are zeros;
  - "mask": MultiBinary(n_max_queues), 1 for the rows that are real queues.

Action: Box(-1, 1, (n_max_queues,), float32), one number per queue row. Queue i's share of the
budget is (a_i + 1) / 2 normalised over the real queues (padded rows are ignored), rounded to whole
workers by largest remainder so the whole budget is assigned; the scenario's guardrails (min/max
workers, move cap, hysteresis) then apply as to any allocator. Every a_i = -1 (all shares zero)
keeps the current allocation: the one way to say "move nothing", since a move costs a model load.
`allocation_to_action` gives the action that reproduces a given allocation.

Reward of a step: -(jobs in system x seconds) over the tick, so an episode's return is minus the
total time all jobs spent in the system; optionally minus `slo_miss_penalty_job_s` per job whose
JCT target passes unmet during the tick, and minus `reconfiguration_penalty_job_s` per worker moved;
times `reward_scale`.

Episodes: `reset(seed=s)` seeds the environment's generator, which picks the episode's scenario
seed from `seeds` (the training seeds by default; see `policies.seeds`), so the same reset seed
gives the same arrivals, service times and router draws. `options={"scenario_seed": k}` pins the
scenario seed instead. An episode terminates when the run ends (arrivals over and drained) and is
truncated after `max_ticks` steps. A trace scenario replays its training window by default
(`trace_part`). No file is read here: scenarios come parsed or as YAML text, traces as lines.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from policies.allocation import hold_allocation, largest_remainder
from policies.evaluation import TraceInput, guarded, prepare_part
from policies.features import N_QUEUE_FEATURES, queue_features
from policies.seeds import TRAIN_SEEDS, TracePart
from policies.sim.run import SimRun
from policies.sim.scenario import PreparedRun, Scenario, make_router_for, parse_scenario
from policies.views import Allocation, ClusterView

ENV_ID = "bilevel/Allocation-v0"

# Upper bound of every feature: each is a log1p of a float64, a fraction, or a clipped ratio, and
# log1p of the largest float64 is about 710. A finite bound keeps the space well defined for
# libraries that normalise by it.
FEATURE_HIGH: float = 1.0e3

# Values are numpy arrays; typed Any because gymnasium types a Dict space's samples so.
Observation = dict[str, Any]

# Prepared jobs kept per scenario seed, so replaying a seed (as baselines and checkers do) does not
# redraw them; a few entries are enough and bound the memory of long arrival tables.
_CACHE_ENTRIES = 4


class _Proposal:
    """The action's allocation as an Allocator, so the guardrails wrap it like any other policy."""

    name: str = "env_action"

    def __init__(self) -> None:
        self.target: Allocation = {}

    def allocate(self, view: ClusterView) -> Allocation:
        return dict(self.target)


def action_to_allocation(action: np.ndarray, view: ClusterView) -> Allocation:
    """The target allocation an action asks for in `view` (before guardrails); see the module."""
    n = len(view.queues)
    a = np.asarray(action, dtype=np.float64).reshape(-1)[:n]
    a = np.clip(np.nan_to_num(a, nan=-1.0), -1.0, 1.0)
    weights = (a + 1.0) / 2.0
    if not weights.sum() > 0.0:
        return hold_allocation(view)
    counts = largest_remainder(weights, view.budget)
    return {q.name: int(c) for q, c in zip(view.queues, counts.tolist(), strict=True)}


def allocation_to_action(
    allocation: Allocation, queue_names: Sequence[str], n_max_queues: int
) -> np.ndarray:
    """An action whose shares are proportional to `allocation` (in `queue_names` order).

    When the allocation uses the whole budget, `action_to_allocation` gives it back exactly; an
    allocation of nothing at all maps to "keep the current allocation".
    """
    counts = np.array([allocation.get(name, 0) for name in queue_names], dtype=np.float64)
    action = np.full(n_max_queues, -1.0, dtype=np.float32)
    top = counts.max() if len(counts) else 0.0
    if top > 0:
        action[: len(counts)] = 2.0 * counts / top - 1.0
    return action


class AllocationEnv(gym.Env[Observation, np.ndarray]):
    """Level 2 of one scenario as a Gymnasium environment; see the module docstring."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 (gymnasium declares it so)

    def __init__(
        self,
        scenario: Scenario | str,
        *,
        n_max_queues: int | None = None,
        max_ticks: int | None = None,
        seeds: Sequence[int] = TRAIN_SEEDS,
        trace_lines: Sequence[str] | None = None,
        trace_run_lines: Sequence[str] | None = None,
        trace_source: str = "<trace>",
        trace_extra_files: Mapping[str, Sequence[str]] | None = None,
        trace_part: TracePart = "train",
        max_jobs: int | None = None,
        slo_miss_penalty_job_s: float = 0.0,
        reconfiguration_penalty_job_s: float = 0.0,
        reward_scale: float = 1.0,
    ) -> None:
        """`scenario` parsed or as YAML text; `n_max_queues` defaults to the scenario's queue
        count; `max_jobs` caps each episode's arrivals (shorter episodes). A servegen trace names
        its model by its file: `trace_source` is the first arrivals file's name, and
        `trace_extra_files` (name -> lines) its other arrivals files and its lengths files."""
        super().__init__()
        self.scenario = scenario if isinstance(scenario, Scenario) else parse_scenario(scenario)
        n_queues = len(self.scenario.queues)
        self.n_max_queues = n_queues if n_max_queues is None else n_max_queues
        if self.n_max_queues < n_queues:
            raise ValueError(
                f"n_max_queues ({self.n_max_queues}) is below the scenario's {n_queues} queues"
            )
        if max_ticks is not None and max_ticks < 1:
            raise ValueError(f"max_ticks must be >= 1, got {max_ticks}")
        if not seeds:
            raise ValueError("seeds must not be empty")
        for name, value in (
            ("slo_miss_penalty_job_s", slo_miss_penalty_job_s),
            ("reconfiguration_penalty_job_s", reconfiguration_penalty_job_s),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if not (math.isfinite(reward_scale) and reward_scale > 0):
            raise ValueError(f"reward_scale must be finite and > 0, got {reward_scale}")
        self.max_ticks = max_ticks
        self.seeds = tuple(int(s) for s in seeds)
        self.trace = (
            TraceInput(
                lines=tuple(trace_lines),
                source=trace_source,
                run_lines=None if trace_run_lines is None else tuple(trace_run_lines),
                extra_files=tuple(
                    (name, tuple(lines)) for name, lines in (trace_extra_files or {}).items()
                ),
            )
            if trace_lines is not None
            else None
        )
        if self.scenario.needs_trace and self.trace is None:
            raise ValueError(f"scenario {self.scenario.name!r} replays a trace: give trace_lines")
        self.trace_part: TracePart = trace_part
        self.max_jobs = max_jobs
        self.slo_miss_penalty_job_s = slo_miss_penalty_job_s
        self.reconfiguration_penalty_job_s = reconfiguration_penalty_job_s
        self.reward_scale = reward_scale

        self.observation_space = spaces.Dict(
            {
                "features": spaces.Box(
                    low=0.0,
                    high=FEATURE_HIGH,
                    shape=(self.n_max_queues, N_QUEUE_FEATURES),
                    dtype=np.float32,
                ),
                "mask": spaces.MultiBinary(self.n_max_queues),
            }
        )
        self.action_space = spaces.Box(
            low=-1.0, high=1.0, shape=(self.n_max_queues,), dtype=np.float32
        )

        self._cache: OrderedDict[int, PreparedRun] = OrderedDict()
        self._proposal = _Proposal()
        self._guardrails = guarded(self.scenario, self._proposal)
        self._run: SimRun | None = None
        self._view: ClusterView | None = None
        self._area_job_s = 0.0
        self._steps = 0
        self._scenario_seed = -1
        # SLO bookkeeping: absolute JCT deadlines in the order they fall, and how many have passed.
        self._deadline_order = np.empty(0, dtype=np.int64)
        self._deadline_s = np.empty(0)
        self._deadline_pos = 0

    # --- episode set-up -----------------------------------------------------------------------

    def _prepared(self, seed: int) -> PreparedRun:
        cached = self._cache.get(seed)
        if cached is not None:
            self._cache.move_to_end(seed)
            return cached
        prepared = prepare_part(
            self.scenario, seed, part=self.trace_part, trace=self.trace, max_jobs=self.max_jobs
        )
        self._cache[seed] = prepared
        if len(self._cache) > _CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return prepared

    def _jct_targets_s(self, prepared: PreparedRun) -> np.ndarray:
        """Each job's JCT target: its deadline, else its type's SLO, else its queue's (the
        tightest of the queues that accept its type, when several do and differ), else the
        default; NaN for none. Fixed at reset, so the deadline sweep can be ordered once."""
        arrivals = prepared.jobs.arrivals
        spec = prepared.spec
        per_type = []
        for job_type in arrivals.job_types:
            target = spec.slo_by_type_s.get(job_type)
            if target is None:
                queue_slos = [
                    q.slo_s for q in spec.queues if job_type in q.job_types and q.slo_s is not None
                ]
                target = min(queue_slos) if queue_slos else spec.default_slo_s
            per_type.append(math.nan if target is None else target)
        by_type = np.array(per_type or [math.nan])
        from_type = by_type[arrivals.type_idx] if len(arrivals) else np.empty(0)
        targets: np.ndarray = np.where(
            np.isnan(arrivals.deadline_s), from_type, arrivals.deadline_s
        )
        return targets

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Observation, dict[str, Any]]:
        """Starts an episode: a scenario seed from the environment's generator (or the
        `scenario_seed` option), its jobs, and the run up to the first tick."""
        super().reset(seed=seed)
        if options is not None and "scenario_seed" in options:
            scenario_seed = int(options["scenario_seed"])
        else:
            scenario_seed = self.seeds[int(self.np_random.integers(len(self.seeds)))]
        prepared = self._prepared(scenario_seed)
        self._scenario_seed = scenario_seed
        self._run = prepared.start(make_router_for(self.scenario))
        self._guardrails = guarded(self.scenario, self._proposal)
        self._area_job_s = 0.0
        self._steps = 0
        self._deadline_pos = 0
        if self.slo_miss_penalty_job_s > 0:
            absolute_s = prepared.jobs.arrivals.arrival_s + self._jct_targets_s(prepared)
            order = np.flatnonzero(~np.isnan(absolute_s))
            order = order[np.argsort(absolute_s[order], kind="stable")]
            self._deadline_order = order
            self._deadline_s = absolute_s[order]
        self._view = self._run.advance_to_next_tick()
        return self._observe(), self._info(moved=0, slo_misses=0)

    # --- stepping -------------------------------------------------------------------------------

    def _area_now_job_s(self, run: SimRun) -> float:
        """Integral of jobs in system from time 0 to now, including the stretch since the last
        event (the cluster only folds that in at the next event)."""
        cluster = run.cluster
        return cluster.area_job_s + cluster.in_system * (run.now_s - cluster.last_change_s)

    def _slo_misses(self, run: SimRun, final: bool) -> int:
        """Jobs whose JCT target passed since the last call without their completing in time;
        at the end of the run, also every remaining target of a job that did not complete."""
        now_s = run.now_s
        end = (
            len(self._deadline_s)
            if final
            else int(np.searchsorted(self._deadline_s, now_s, side="right"))
        )
        start = self._deadline_pos
        if end <= start:
            return 0
        self._deadline_pos = end
        jobs = self._deadline_order[start:end]
        completion_s = np.asarray(run.cluster.completion_s, dtype=np.float64)[jobs]
        routes = np.asarray(run.cluster.routes, dtype=np.int64)[jobs]
        late = np.isnan(completion_s) | (completion_s > self._deadline_s[start:end])
        # Rejected jobs are level 1's decision and never ran; they are not level 2's misses.
        return int(np.count_nonzero(late & (routes >= 0)))

    def step(
        self, action: np.ndarray
    ) -> tuple[Observation, SupportsFloat, bool, bool, dict[str, Any]]:
        """Applies the action's allocation (through the guardrails) and runs to the next tick."""
        run = self._run
        if run is None:
            raise RuntimeError("call reset() before step()")
        view = self._view
        if view is None:
            # The run is over; stepping on changes nothing.
            return self._observe(), 0.0, True, False, self._info(moved=0, slo_misses=0)
        self._proposal.target = action_to_allocation(action, view)
        moved = run.apply(self._guardrails.allocate(view))
        self._view = run.advance_to_next_tick()
        self._steps += 1
        terminated = self._view is None
        area_job_s = self._area_now_job_s(run)
        cost_job_s = area_job_s - self._area_job_s
        self._area_job_s = area_job_s
        misses = 0
        if self.slo_miss_penalty_job_s > 0:
            misses = self._slo_misses(run, final=terminated)
            cost_job_s += self.slo_miss_penalty_job_s * misses
        cost_job_s += self.reconfiguration_penalty_job_s * moved
        truncated = not terminated and self.max_ticks is not None and self._steps >= self.max_ticks
        reward = -cost_job_s * self.reward_scale
        return self._observe(), reward, terminated, truncated, self._info(moved, misses)

    # --- observation --------------------------------------------------------------------------

    def _observe(self) -> Observation:
        assert self._run is not None
        view = self._view if self._view is not None else self._run.view()
        n = len(view.queues)
        features = np.zeros((self.n_max_queues, N_QUEUE_FEATURES), dtype=np.float32)
        raw = queue_features(view)
        features[:n] = np.clip(np.nan_to_num(raw, nan=0.0, posinf=FEATURE_HIGH), 0.0, FEATURE_HIGH)
        mask = np.zeros(self.n_max_queues, dtype=np.int8)
        mask[:n] = 1
        return {"features": features, "mask": mask}

    def _info(self, moved: int, slo_misses: int) -> dict[str, Any]:
        assert self._run is not None
        run = self._run
        return {
            "now_s": run.now_s,
            "scenario_seed": self._scenario_seed,
            "jobs_in_system": run.cluster.in_system,
            "allocation": dict(
                zip((q.name for q in run.spec.queues), run.cluster.allocation(), strict=True)
            ),
            "moved_workers": moved,
            "slo_misses": slo_misses,
        }

    @property
    def run(self) -> SimRun | None:
        """The episode's simulation run (its `record()` gives the usual metrics at the end)."""
        return self._run


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="policies.env:AllocationEnv")
