"""Training the learned allocator and router: PPO's clipped update on Decima-style advantages.

Reads top to bottom like cleanrl's ppo.py: the arguments (one docstring each), seeding, then per
iteration the rollout, the advantage, the update, and the metrics (`losses/...`, `charts/...`,
`eval/...`). Differences from cleanrl, and why:

- No learned critic. Queueing returns are dominated by the arrivals (a burst makes every action look
  bad), so each iteration replays the same arrival sequence `replays` times with different policy
  samples and uses the replays' mean return-to-go at each tick as the baseline (Mao et al., "Variance
  reduction for reinforcement learning in input-driven environments", ICLR 2019; Decima). Ticks fall
  at fixed multiples of tick_s, so tick t of every replay is the same instant.
- Before any policy update, the allocator's arrival-rate forecast (`policies.learned.forecast`)
  is fitted by regression on recorded episodes (`forecast_training`): its target does not depend
  on the policy, so supervision learns it with far less noise than the policy gradient would.
  The teachers are then chosen, and the gate fitted, on the forecast the policy will plan with.
- Rollouts are injected (`map_rollouts`): this module never starts processes. `scheduler.training`
  passes Ray tasks, tests a serial map.
- A curriculum over scenarios and loads: every input draws a scenario, an arrival seed, a load scale
  and an episode length; the load range and the longest episode widen over the first part of the
  budget, so early updates see short, moderate episodes whose returns are less noisy.
- Periodic validation on seeds >= `EVAL_SEED_BASE` (disjoint from the training seeds
  `policies.seeds.TRAIN_SEEDS` and from the evaluation seeds `policies.seeds.EVAL_SEEDS` that
  `bilevel evaluate` reports on) against every heuristic with its *tuned* parameters
  (`policies.tuned`, defaults for a scenario without stored values), on the same arrivals, from
  the scenario's initial allocation and from random initial splits. The checkpoint kept is the one
  with the best `Evaluation.score`, which weighs the worst scenario as much as the average and
  penalises p99 regressions, so a policy that wins on one scenario by losing on another is not kept.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from policies.learned.allocator import gate_log_prob, moves_log_prob
from policies.learned.forecast import ForecasterConfig
from policies.learned.forecast_training import ForecastFit, train_forecaster
from policies.learned.networks import AllocatorNetConfig, BaseSpec
from policies.learned.policy import LearnedPolicy
from policies.learned.regime_search import RegimeSearchResult, search_regime_table
from policies.learned.rollout import (
    MapRollouts,
    RolloutResult,
    RolloutTask,
    capped_duration,
    has_routing_choice,
    training_starts,
)
from policies.learned.target_distill import DistillFit, distill_targets
from policies.registry import HEURISTIC_ALLOCATORS
from policies.seeds import EVAL_SEEDS, TRAIN_SEEDS, TUNING_SEEDS
from policies.sim.scenario import Scenario
from policies.tuning import shipped_params

# Validation seeds (checkpoint selection during training) start here: above both the training
# seeds (TRAIN_SEEDS, 0..999) and the evaluation seeds `bilevel evaluate` reports on (EVAL_SEEDS,
# 1000..1999), so checkpoint selection never sees an evaluated or a trained-on arrival sequence.
EVAL_SEED_BASE = 10_000
assert max(TRAIN_SEEDS.stop, EVAL_SEEDS.stop) <= EVAL_SEED_BASE
# Suffix of the validation cells that start from a random split of the workers.
RANDOM_START = "@random"
# Heuristic parameters per scenario name, per heuristic (the form of `policies.tuned`).
HeuristicParams = Mapping[str, Mapping[str, Mapping[str, Any]]]


@dataclass
class Args:
    """Hyper-parameters of one training run."""

    seed: int = 1
    """seed of the initial weights, the curriculum draws and the policy's sampling"""
    minutes: float = 12.0
    """wall-clock budget; training stops at the first iteration boundary past it"""
    max_iterations: int | None = None
    """stop after this many iterations even with time left (None: the time budget decides)"""
    inputs_per_iteration: int = 2
    """distinct arrival sequences (scenario, seed, load, length) per iteration"""
    replays: int = 4
    """episodes per arrival sequence; their mean return-to-go is the input-dependent baseline"""
    episode_s: tuple[float, float] = (300.0, 900.0)
    """range of episode lengths (seconds of arrivals), drawn uniformly per input, capped at the
    scenario's own duration"""
    load_scale: tuple[float, float] = (0.8, 1.2)
    """range of arrival-rate multipliers drawn per input, once the curriculum is over"""
    curriculum_fraction: float = 0.3
    """fraction of the budget over which the load range widens from 1.0 and the longest episode
    grows from the shortest to the full range"""
    discount_half_life_s: float = 120.0
    """simulated seconds after which a reward counts half; per-tick gamma = 0.5 ** (tick_s / this)"""
    reconfiguration_penalty_s: float = 0.0
    """job-seconds charged per worker moved, on top of the model load the simulator charges"""
    slo_penalty_s: float = 0.0
    """job-seconds charged per job whose time in system passes its JCT target (deadline, else its
    type's or queue's SLO), at the tick it passes it"""
    learning_rate: float = 5e-4
    """Adam step size (annealed linearly to 0 over the budget when anneal_lr)"""
    anneal_lr: bool = True
    """anneal the learning rate with the elapsed fraction of the budget"""
    update_epochs: int = 4
    """passes over each iteration's decisions"""
    minibatch_size: int = 256
    """decisions per gradient step"""
    clip_coef: float = 0.2
    """PPO's surrogate clipping coefficient"""
    ent_coef: float = 0.01
    """entropy bonus at the start; annealed linearly to 0 with the budget"""
    max_grad_norm: float = 0.5
    """gradient clipping norm"""
    target_kl: float | None = 0.03
    """stop an iteration's epochs early once the approximate KL passes this (None: never)"""
    hidden: int = 64
    """width of the allocator network"""
    max_moves: int = 4
    """moves the allocator may make per tick"""
    bases: tuple[BaseSpec, ...] = ()
    """train a residual allocator over these heuristics ((registry name, parameters), the same for
    every scenario): each tick it picks one and corrects its proposal, and the untrained policy is
    the first (empty: moves start from the current allocation)"""
    stop_bias: float = 2.0
    """initial stop logit; for a residual allocator, e^b / (e^b + 1) is the initial chance per tick
    of keeping the picked base's proposal when sampling"""
    gate_bias: float = 2.0
    """initial gate logit of the first base (the others start at 0)"""
    target_head: bool = False
    """give a residual allocator a target head: one more gate option, the network's own split of
    the workers by burst regime, fitted by imitating a regime table that a policy search finds on
    each scenario with bursty queues (`policies.learned.regime_search`); scenarios without bursty
    queues get no table, and there the gate learns to leave the option alone"""
    regime_search_rounds: int = 12
    """most rounds of the regime-table search per scenario (each scores every single-worker move
    of every regime on the teacher seeds)"""
    distill_rounds: int = 4
    """DAgger rounds of fitting the target head to the regime tables"""
    distill_episodes: int = 8
    """recorded episodes per scenario with a table in each distillation round"""
    distill_steps: int = 300
    """Adam steps (one minibatch per scenario each) after each distillation round"""
    train_router: bool = True
    """train the learned router where a scenario has a routing choice"""
    train_allocator: bool = True
    """train the allocator; False trains the router alone, the allocator (from `initial`) acting
    by its mode and never updated: the alternating step for scenarios with a routing choice"""
    random_start_fraction: float = 0.5
    """fraction of inputs that start from a random split of the workers instead of the scenario's
    initial allocation (which follows the run's total work, so merely keeping it is strong)"""
    eval_every: int = 5
    """iterations between evaluations on held-out seeds (and one before training)"""
    eval_seeds: int = 4
    """validation arrival seeds (from EVAL_SEED_BASE) per scenario in each evaluation"""
    eval_random_starts: bool = True
    """also validate from a random split of the workers (one per seed), not only from the
    scenario's initial allocation, which favours a policy that merely holds it"""
    eval_max_duration_s: float | None = 3600.0
    """cap on a validation run's length (seconds of arrivals), so long scenarios stay cheap"""
    eval_tuned_heuristics: bool = True
    """validate against the heuristics' tuned parameters (`policies.tuned`) where stored"""
    p99_weight: float = 0.5
    """weight of a p99 regression (learned p99 over the best heuristic's, above 1) in the score"""
    imitation_coef: float = 0.0
    """weight of an imitation term (DAgger: minus the log-probability of the moves a teacher
    heuristic would make in the policy's own situation) at the start; annealed linearly to 0 over
    `imitation_fraction` of the budget. The teacher of each scenario is the heuristic, with its
    tuned parameters, of lowest mean JCT on the tuning seeds (training arrivals); 0 disables it.
    A residual allocator imitates with its gate instead: minus the log-probability of picking the
    base of lowest mean JCT on the tuning seeds of the tick's scenario"""
    imitation_fraction: float = 0.5
    """fraction of the budget over which the imitation weight decays to 0"""
    forecast: bool = True
    """give the allocator a learned arrival-rate forecast (`policies.learned.forecast`) that its
    bases and network plan with, fitted by regression before the gate and the moves are trained"""
    forecast_window_loads: float = 4.0
    """the forecast is for the mean rate over this many of the slowest model load (at least 4
    ticks): the time a moved worker needs to pay back its load"""
    forecast_episodes: int = 4
    """recorded episodes per scenario (up to `eval_max_duration_s` long) the forecast is fitted on"""
    forecast_steps: int = 1500
    """Adam steps of the forecast fit (one balanced minibatch per scenario each)"""
    teacher_seeds: int = len(TUNING_SEEDS)
    """training seeds (from 0) on which each scenario's best base, or best heuristic, is chosen as
    the imitation teacher, every other one from a random split of the workers; by default the
    heuristics' tuning seeds, which are the first of them (fewer cannot rank bases a few percent
    apart on a bursty scenario, whose mean JCT varies twofold from seed to seed)"""
    gate_pretrain_steps: int = 300
    """for a residual allocator with imitation: supervised steps (one minibatch per scenario each)
    fitting the gate to the teacher bases before the first update, on episodes as long as those
    the teachers were chosen on. PPO's iterations each draw one or two scenarios, so the imitation
    term alone pulls the gate toward whichever was drawn last and, in practice, to the base most
    scenarios share; balanced batches separate them"""

    def __post_init__(self) -> None:
        """Refuses values that would train nothing or train on nonsense, naming the field."""
        at_least = {
            "minutes": (self.minutes, 0.0),
            "reconfiguration_penalty_s": (self.reconfiguration_penalty_s, 0.0),
            "slo_penalty_s": (self.slo_penalty_s, 0.0),
            "imitation_coef": (self.imitation_coef, 0.0),
            "ent_coef": (self.ent_coef, 0.0),
            "inputs_per_iteration": (self.inputs_per_iteration, 1),
            "replays": (self.replays, 1),
            "update_epochs": (self.update_epochs, 1),
            "minibatch_size": (self.minibatch_size, 1),
            "eval_every": (self.eval_every, 1),
            "eval_seeds": (self.eval_seeds, 1),
            "max_moves": (self.max_moves, 0),
            "forecast_episodes": (self.forecast_episodes, 1),
            "forecast_steps": (self.forecast_steps, 0),
            "teacher_seeds": (self.teacher_seeds, 1),
            "gate_pretrain_steps": (self.gate_pretrain_steps, 0),
            "regime_search_rounds": (self.regime_search_rounds, 0),
            "distill_rounds": (self.distill_rounds, 1),
            "distill_episodes": (self.distill_episodes, 1),
            "distill_steps": (self.distill_steps, 0),
        }
        for name, (value, low) in at_least.items():
            if not (math.isfinite(value) and value >= low):
                raise ValueError(f"{name} must be a finite number >= {low}, got {value}")
        for name, value in (
            ("learning_rate", self.learning_rate),
            ("discount_half_life_s", self.discount_half_life_s),
            ("forecast_window_loads", self.forecast_window_loads),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        for name, (low, high) in (("episode_s", self.episode_s), ("load_scale", self.load_scale)):
            if not (0 < low <= high and math.isfinite(high)):
                raise ValueError(
                    f"{name} must be (low, high) with 0 < low <= high, got {(low, high)}"
                )
        if self.max_iterations is not None and self.max_iterations < 0:
            raise ValueError(f"max_iterations must be >= 0, got {self.max_iterations}")
        if self.target_head and not self.bases:
            raise ValueError("target_head is a gate option of a residual allocator: give bases")


@dataclass(frozen=True)
class Evaluation:
    """Deterministic policy vs every heuristic on the same validation arrivals.

    Keyed by cell: a scenario's name (runs from its initial allocation) or the name plus
    `RANDOM_START` (runs from a random split of the workers, the same split for every policy).
    """

    iteration: int
    # Per cell: mean over seeds of mean JCT and of p99 JCT, for "learned" and each heuristic.
    mean_jct_s: dict[str, dict[str, float]]
    p99_jct_s: dict[str, dict[str, float]]
    p99_weight: float = 0.5

    def best_heuristic(self, scenario: str) -> str:
        """The heuristic with the lowest mean JCT on `scenario`."""
        table = self.mean_jct_s[scenario]
        return min((h for h in table if h != "learned"), key=lambda h: table[h])

    def ratio(self, scenario: str) -> float:
        """Learned mean JCT over the best heuristic's (below 1 means the learned policy wins)."""
        table = self.mean_jct_s[scenario]
        return table["learned"] / table[self.best_heuristic(scenario)]

    def p99_ratio(self, scenario: str) -> float:
        """Learned p99 JCT over the p99 of the heuristic with the best mean."""
        table = self.p99_jct_s[scenario]
        return table["learned"] / table[self.best_heuristic(scenario)]

    def badness(self, scenario: str) -> float:
        """The mean-JCT ratio plus `p99_weight` times any p99 regression."""
        return self.ratio(scenario) + self.p99_weight * max(self.p99_ratio(scenario) - 1.0, 0.0)

    @property
    def worst(self) -> float:
        """The largest `badness` over the cells: the scenario the policy does worst on."""
        return max(self.badness(s) for s in self.mean_jct_s)

    @property
    def score(self) -> float:
        """Lower is better, 1 ties the best heuristic everywhere: the mean of the worst cell's
        `badness` and the geometric mean of all cells' (a policy must not buy its average by
        losing one scenario, nor keep one tie by giving up gains everywhere else)."""
        values = [self.badness(s) for s in self.mean_jct_s]
        if not all(math.isfinite(v) and v > 0 for v in values):
            return math.inf
        return 0.5 * max(values) + 0.5 * float(np.exp(np.mean(np.log(values))))


@dataclass
class TrainResult:
    """What a run produced: the best evaluated policy, and the history behind it."""

    policy: LearnedPolicy
    args: Args
    iterations: int
    elapsed_s: float
    # One metrics dict per iteration ("losses/...", "charts/...").
    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    best: Evaluation | None = None
    train_seeds: list[int] = field(default_factory=list)
    # Per scenario, the teacher heuristic of the imitation term (empty when it is off).
    teachers: dict[str, str] = field(default_factory=dict)
    # For a residual allocator: per scenario, the index of the base the gate imitates, and the
    # gate's NLL of it after the supervised warm start (NaN without one).
    base_teachers: dict[str, int] = field(default_factory=dict)
    gate_pretrain_nll: float = math.nan
    # How the forecast fit went (None without a forecaster).
    forecast_fit: ForecastFit | None = None
    # With a target head: per scenario with bursty queues, the regime table the search found (the
    # head's teacher), and how imitating them went (None when no scenario had one).
    regime_tables: dict[str, RegimeSearchResult] = field(default_factory=dict)
    target_fit: DistillFit | None = None


class TrainingStopped(Exception):
    """Ends training early when raised by `map_rollouts` or `on_iteration` (a user's Ctrl-C, a
    deadline of the caller's). `train` lets it through with `partial` set to what was kept so far
    (the best validated policy, its evaluations and the metrics of every finished iteration), or
    None when nothing had been validated yet. Raised only from those two callbacks, it never lands
    between keeping an evaluation and keeping its policy."""

    def __init__(self, reason: str = "stop requested") -> None:
        super().__init__(reason)
        self.partial: TrainResult | None = None


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = r_t + gamma * G_{t+1}, computed backwards."""
    out = np.empty_like(rewards)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def replay_advantages(
    results: Sequence[RolloutResult],
    gamma: float,
    penalty_s: float = 0.0,
    slo_penalty_s: float = 0.0,
) -> list[np.ndarray]:
    """Per episode, per tick: return-to-go minus the mean over the replays of the same input.

    Rewards are the episode's, less `penalty_s` per worker moved and `slo_penalty_s` per SLO miss
    (both in job-seconds, the reward's unit).

    Episodes of one input may end at different ticks (draining differs); a replay that has ended
    contributes a return of 0 from then on, which is what it will collect. Each input's advantages
    are divided by its mean absolute per-tick reward, so a busy scenario does not drown a quiet one.
    """
    returns = [
        discounted_returns(
            r.rewards
            - penalty_s * r.moved.astype(np.float64)
            - slo_penalty_s * _per_tick(r.slo_misses, len(r.rewards)),
            gamma,
        )
        for r in results
    ]
    by_group: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(results):
        by_group[r.group].append(i)
    advantages: list[np.ndarray] = [np.zeros(0)] * len(results)
    for members in by_group.values():
        horizon = max(len(returns[i]) for i in members)
        padded = np.zeros((len(members), horizon))
        for row, i in enumerate(members):
            padded[row, : len(returns[i])] = returns[i]
        baseline = padded.mean(axis=0)
        scale = max(float(np.mean([np.abs(results[i].rewards).mean() for i in members])), 1e-9)
        for row, i in enumerate(members):
            advantages[i] = (padded[row, : len(returns[i])] - baseline[: len(returns[i])]) / scale
    return advantages


def _per_tick(counts: np.ndarray, ticks: int) -> np.ndarray:
    """`counts` as floats over `ticks` ticks (zeros where a result carries none)."""
    out = np.zeros(ticks)
    out[: min(len(counts), ticks)] = counts[:ticks]
    return out


def _anneal(start: float, fraction: float) -> float:
    return start * max(1.0 - fraction, 0.0)


@dataclass(frozen=True)
class _Input:
    """One arrival sequence of an iteration, replayed `replays` times."""

    scenario: Scenario
    seed: int
    load_scale: float
    episode_s: float
    initial_seed: int | None


def _draw_inputs(
    args: Args, scenarios: Sequence[Scenario], rng: np.random.Generator, fraction: float
) -> list[_Input]:
    """This iteration's inputs, drawn along the curriculum."""
    ramp = min(fraction / args.curriculum_fraction, 1.0) if args.curriculum_fraction > 0 else 1.0
    low_load = 1.0 + ramp * (args.load_scale[0] - 1.0)
    high_load = 1.0 + ramp * (args.load_scale[1] - 1.0)
    shortest_s, longest_s = args.episode_s
    longest_s = shortest_s + ramp * (longest_s - shortest_s)
    inputs = []
    for _ in range(args.inputs_per_iteration):
        scenario = scenarios[int(rng.integers(len(scenarios)))]
        full_s = scenario.duration_s if scenario.duration_s is not None else longest_s
        episode_s = min(float(rng.uniform(shortest_s, longest_s)), full_s)
        seed = int(rng.integers(TRAIN_SEEDS.start, TRAIN_SEEDS.stop))
        load = float(rng.uniform(low_load, high_load))
        random_start = rng.random() < args.random_start_fraction
        initial_seed = int(rng.integers(2**31)) if random_start else None
        inputs.append(_Input(scenario, seed, load, episode_s, initial_seed))
    return inputs


def tuned_heuristic_params(scenarios: Sequence[Scenario]) -> dict[str, dict[str, dict[str, Any]]]:
    """The stored tuned parameters of every heuristic per scenario (`policies.tuned`); a scenario
    without stored values (or an edited one) gets the heuristics' defaults."""
    return {s.name: shipped_params(s) or {} for s in scenarios}


def evaluate(
    policy: LearnedPolicy,
    scenarios: Sequence[Scenario],
    seeds: Sequence[int],
    map_rollouts: MapRollouts,
    iteration: int,
    heuristic_results: dict[str, dict[str, tuple[float, float]]] | None = None,
    *,
    learned_router: bool = True,
    heuristic_params: HeuristicParams | None = None,
    random_starts: bool = False,
    max_duration_s: float | None = None,
    p99_weight: float = 0.5,
) -> tuple[Evaluation, dict[str, dict[str, tuple[float, float]]]]:
    """Deterministic `policy` and (unless cached in `heuristic_results`) every heuristic, with
    `heuristic_params[scenario][heuristic]` (defaults where absent), on the scenarios at the given
    seeds, capped at `max_duration_s`. With `random_starts`, each seed also runs from a random
    split of the workers (cell "<scenario>@random"). Returns the evaluation and the heuristics'
    (mean, p99) means per cell, for reuse."""
    starts: list[int | None] = [None, 1] if random_starts else [None]

    def cell(s: Scenario, start: int | None) -> str:
        return s.name if start is None else s.name + RANDOM_START

    def initial(seed: int, start: int | None) -> int | None:
        # The same random split for every policy on a given seed, and none for the default start.
        return None if start is None else 7_919 * seed + start

    tasks = [
        RolloutTask(
            s, seed, duration_s=capped_duration(s, max_duration_s), policy=policy,
            learned_router=learned_router, initial_seed=initial(seed, start),
        )
        for s in scenarios
        for start in starts
        for seed in seeds
    ]  # fmt: skip
    if heuristic_results is None:
        params = heuristic_params or {}
        tasks += [
            RolloutTask(
                s, seed, duration_s=capped_duration(s, max_duration_s), heuristic=h,
                heuristic_params=params.get(s.name, {}).get(h), initial_seed=initial(seed, start),
            )
            for s in scenarios
            for h in HEURISTIC_ALLOCATORS
            for start in starts
            for seed in seeds
        ]  # fmt: skip
    results = map_rollouts(tasks)
    collected: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for task, result in zip(tasks, results, strict=True):
        name = "learned" if task.heuristic is None else task.heuristic
        where = (
            task.scenario.name if task.initial_seed is None else task.scenario.name + RANDOM_START
        )
        collected[where][name].append((result.mean_jct_s, result.p99_jct_s))
    means: dict[str, dict[str, tuple[float, float]]] = {
        c: {name: _mean_pair(pairs) for name, pairs in table.items()}
        for c, table in collected.items()
    }
    if heuristic_results is None:
        heuristic_results = {
            c: {h: v for h, v in table.items() if h != "learned"} for c, table in means.items()
        }
    merged = {c: {**heuristic_results[c], "learned": means[c]["learned"]} for c in means}
    evaluation = Evaluation(
        iteration=iteration,
        mean_jct_s={c: {k: v[0] for k, v in t.items()} for c, t in merged.items()},
        p99_jct_s={c: {k: v[1] for k, v in t.items()} for c, t in merged.items()},
        p99_weight=p99_weight,
    )
    return evaluation, heuristic_results


def _mean_pair(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    # A run that completed no job has NaN JCTs; it counts as infinitely bad, not as missing.
    arr = np.nan_to_num(np.asarray(pairs, dtype=np.float64), nan=math.inf)
    return float(arr[:, 0].mean()), float(arr[:, 1].mean())


def _stack_allocator_batch(
    results: Sequence[RolloutResult],
    advantages: Sequence[np.ndarray],
    base_teachers: Mapping[str, int] | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """Every recorded tick, grouped by queue count (a batch needs one n), as tensors; with
    `base_teachers`, each tick's scenario's teacher base (-1 where none)."""
    base_teachers = base_teachers or {}
    grouped: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for i, r in enumerate(results):
        for t, d in enumerate(r.decisions):
            grouped[len(d.counts)].append((i, t))
    batches: dict[int, dict[str, torch.Tensor]] = {}
    for n, where in grouped.items():
        ds = [results[i].decisions[t] for i, t in where]
        labelled = [len(results[i].teacher_moves) == len(results[i].decisions) for i, _ in where]
        teacher = [
            results[i].teacher_moves[t] if ok else d.moves
            for (i, t), d, ok in zip(where, ds, labelled, strict=True)
        ]
        batches[n] = {
            "teacher_moves": torch.from_numpy(np.stack(teacher)),
            "has_teacher": torch.tensor(labelled, dtype=torch.float32),
            "features": torch.from_numpy(np.stack([d.features for d in ds])),
            "counts": torch.from_numpy(np.stack([d.counts for d in ds])),
            "free": torch.tensor([d.free for d in ds], dtype=torch.int64),
            "low": torch.from_numpy(np.stack([d.low for d in ds])),
            "high": torch.from_numpy(np.stack([d.high for d in ds])),
            "moves": torch.from_numpy(np.stack([d.moves for d in ds])),
            "base": torch.tensor([d.base for d in ds], dtype=torch.int64),
            "teacher_base": torch.tensor(
                [base_teachers.get(results[i].scenario, -1) for i, _ in where], dtype=torch.int64
            ),
            "old_log_prob": torch.tensor([d.log_prob for d in ds], dtype=torch.float32),
            "advantage": torch.tensor([advantages[i][t] for i, t in where], dtype=torch.float32),
        }
    return batches


def _stack_router_batch(
    results: Sequence[RolloutResult], advantages: Sequence[np.ndarray]
) -> dict[int, dict[str, torch.Tensor]]:
    """Every recorded routing choice, grouped by number of eligible queues, as tensors."""
    grouped: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for i, r in enumerate(results):
        for c, choice in enumerate(r.route_choices):
            grouped[len(choice.features)].append((i, c))
    batches: dict[int, dict[str, torch.Tensor]] = {}
    for m, where in grouped.items():
        cs = [results[i].route_choices[c] for i, c in where]
        adv = [
            advantages[i][min(int(results[i].route_ticks[c]), len(advantages[i]) - 1)]
            for i, c in where
        ]
        batches[m] = {
            "features": torch.from_numpy(np.stack([c.features for c in cs])),
            "chosen": torch.tensor([c.chosen for c in cs], dtype=torch.int64),
            "old_log_prob": torch.tensor([c.log_prob for c in cs], dtype=torch.float32),
            "advantage": torch.tensor(adv, dtype=torch.float32),
        }
    return batches


def _clipped_loss(
    new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantage: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(PPO clipped surrogate loss, approx KL, clip fraction) as in cleanrl."""
    log_ratio = new_log_prob - old_log_prob
    ratio = log_ratio.exp()
    loss = torch.max(-advantage * ratio, -advantage * ratio.clamp(1 - clip, 1 + clip)).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clipfrac = ((ratio - 1.0).abs() > clip).float().mean()
    return loss, approx_kl, clipfrac


def _best_candidate(
    scenarios: Sequence[Scenario],
    n_candidates: int,
    candidate_task: Callable[[Scenario, int, int, float | None], RolloutTask],
    map_rollouts: MapRollouts,
    max_duration_s: float | None,
    seeds: Sequence[int],
) -> dict[str, int]:
    """Per scenario, the index of the candidate of lowest mean JCT over `seeds`; ties go to the
    earlier candidate. `candidate_task(scenario, k, seed, duration)` is candidate k's episode.

    Every other seed starts from a random split of the workers (seeded by the seed), as half of
    validation does: a candidate must also recover from a poor allocation. Chosen from the
    scenario's own start alone, steady's teacher was a short-horizon switch-aware that hardly moves
    a worker, and from a random split it ran at three times the best heuristic's JCT."""
    tasks = [
        (
            s.name,
            k,
            dataclasses.replace(
                candidate_task(s, k, seed, capped_duration(s, max_duration_s)),
                initial_seed=initial,
            ),
        )
        for s in scenarios
        for k in range(n_candidates)
        for seed, initial in training_starts(seeds)
    ]
    jct: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (scenario, k, _), r in zip(tasks, map_rollouts([t for *_, t in tasks]), strict=True):
        jct[scenario][k].append(r.mean_jct_s if math.isfinite(r.mean_jct_s) else math.inf)
    return {
        name: min(table, key=lambda k: (float(np.mean(table[k])), k)) for name, table in jct.items()
    }


def choose_teachers(
    scenarios: Sequence[Scenario],
    heuristic_params: HeuristicParams,
    map_rollouts: MapRollouts,
    max_duration_s: float | None = None,
    seeds: Sequence[int] = TUNING_SEEDS,
) -> dict[str, str]:
    """Per scenario, the heuristic (with `heuristic_params`) of lowest mean JCT over `seeds`, which
    are training arrivals (by default the heuristics' own tuning seeds), never validation or
    evaluation ones."""
    names = list(HEURISTIC_ALLOCATORS)

    def task(s: Scenario, k: int, seed: int, duration_s: float | None) -> RolloutTask:
        params = heuristic_params.get(s.name, {}).get(names[k])
        return RolloutTask(
            s, seed, heuristic=names[k], heuristic_params=params, duration_s=duration_s
        )

    best = _best_candidate(scenarios, len(names), task, map_rollouts, max_duration_s, seeds)
    return {scenario: names[k] for scenario, k in best.items()}


def choose_base_teachers(
    scenarios: Sequence[Scenario],
    bases: Sequence[BaseSpec],
    map_rollouts: MapRollouts,
    max_duration_s: float | None = None,
    seeds: Sequence[int] = TUNING_SEEDS,
    policy: LearnedPolicy | None = None,
) -> dict[str, int]:
    """Per scenario, the index of the base heuristic of lowest mean JCT over `seeds` (training
    arrivals): the gate's imitation target for a residual allocator. With `policy` (whose bases
    are `bases`), each base runs as the policy runs it, i.e. on its rate forecast, uncorrected,
    and a target head is a candidate too (index len(bases)), as the head proposes."""

    def task(s: Scenario, k: int, seed: int, duration_s: float | None) -> RolloutTask:
        if policy is not None:
            return RolloutTask(s, seed, policy=policy, force_base=k, duration_s=duration_s)
        name, params = bases[k]
        return RolloutTask(s, seed, heuristic=name, heuristic_params=params, duration_s=duration_s)

    n_options = len(bases) if policy is None else policy.allocator_net.config.n_options
    return _best_candidate(scenarios, n_options, task, map_rollouts, max_duration_s, seeds)


def fit_target_head(
    policy: LearnedPolicy,
    scenarios: Sequence[Scenario],
    map_rollouts: MapRollouts,
    rng: np.random.Generator,
    args: Args,
    seeds: Sequence[int],
    episode_s: float,
) -> tuple[dict[str, RegimeSearchResult], DistillFit | None]:
    """Searches a regime table on every scenario with bursty queues (on `seeds`, training
    arrivals), then fits `policy`'s target head to them (in place). Returns the tables and the fit
    (None, and an untouched head, when no scenario has bursty queues)."""
    tables: dict[str, RegimeSearchResult] = {}
    for s in scenarios:
        found = search_regime_table(
            s, map_rollouts, seeds=seeds, max_rounds=args.regime_search_rounds,
            hold=policy.allocator_net.config.target_hold,
            slow_s=policy.allocator_net.config.slow_s,
            max_duration_s=args.eval_max_duration_s,
        )  # fmt: skip
        if found is not None:
            tables[s.name] = found
    if not tables:
        return tables, None
    fit = distill_targets(
        policy, scenarios, {name: t.params for name, t in tables.items()}, map_rollouts, rng,
        rounds=args.distill_rounds, episodes_per_round=args.distill_episodes,
        steps=args.distill_steps, episode_s=episode_s,
    )  # fmt: skip
    return tables, fit


def pretrain_gate(
    policy: LearnedPolicy,
    scenarios: Sequence[Scenario],
    teachers: Mapping[str, int],
    map_rollouts: MapRollouts,
    rng: np.random.Generator,
    *,
    steps: int,
    learning_rate: float,
    episode_s: float,
    minibatch_size: int = 64,
) -> float:
    """Fits the gate of `policy` (in place) to each scenario's teacher base on the ticks of two
    training-seed episodes per scenario (one from the scenario's start, one from a random split):
    `steps` rounds of one minibatch per scenario. Returns the last round's mean NLL."""
    labelled = [s for s in scenarios if s.name in teachers]
    tasks = [
        RolloutTask(
            s, int(rng.integers(TRAIN_SEEDS.start, TRAIN_SEEDS.stop)),
            duration_s=min(episode_s, s.duration_s or episode_s), policy=policy,
            policy_seed=int(rng.integers(2**31)), record=True, initial_seed=start,
        )
        for s in labelled
        for start in (None, int(rng.integers(2**31)))
    ]  # fmt: skip
    features: dict[str, list[np.ndarray]] = defaultdict(list)
    for task, r in zip(tasks, map_rollouts(tasks), strict=True):
        features[task.scenario.name] += [d.features for d in r.decisions]
    data = {name: torch.from_numpy(np.stack(f)) for name, f in features.items() if f}
    optimizer = torch.optim.Adam(policy.allocator_net.parameters(), lr=learning_rate, eps=1e-5)
    policy.allocator_net.train()
    nll = math.nan
    for _ in range(steps):
        losses = []
        for name, x in data.items():
            idx = torch.from_numpy(rng.integers(0, len(x), minibatch_size))
            out = policy.allocator_net(x[idx])
            label = torch.full((minibatch_size,), teachers[name], dtype=torch.int64)
            loss = -gate_log_prob(out.gate_logits, label)[0].mean()
            optimizer.zero_grad()
            torch.autograd.backward(loss)
            optimizer.step()
            losses.append(float(loss.detach()))
        nll = float(np.mean(losses))
    policy.allocator_net.eval()
    return nll


def train(
    args: Args,
    scenarios: Sequence[Scenario],
    map_rollouts: MapRollouts,
    *,
    clock: Callable[[], float] = time.monotonic,
    on_iteration: Callable[[int, float, dict[str, float], Evaluation | None], None] | None = None,
    initial: LearnedPolicy | None = None,
) -> TrainResult:
    """Trains a policy on `scenarios` for `args.minutes` (or `args.max_iterations`).

    `on_iteration(iteration, elapsed fraction, metrics, evaluation or None)` is called after every
    iteration, for progress bars and logs. `initial` continues from existing weights. A
    `TrainingStopped` from either callback ends the run early, carrying the partial result.
    """
    started = clock()
    kept: list[TrainResult] = []
    try:
        return _train(args, scenarios, map_rollouts, clock, on_iteration, initial, kept)
    except TrainingStopped as stop:
        if kept:
            partial = kept[0]
            partial.iterations = len(partial.history)
            partial.elapsed_s = clock() - started
            stop.partial = partial
        raise


def _train(
    args: Args,
    scenarios: Sequence[Scenario],
    map_rollouts: MapRollouts,
    clock: Callable[[], float],
    on_iteration: Callable[[int, float, dict[str, float], Evaluation | None], None] | None,
    initial: LearnedPolicy | None,
    kept: list[TrainResult],
) -> TrainResult:
    """The stages of `train`; the result, once the first validation made one, goes into `kept`
    so that a stop can hand it over."""
    if not scenarios:
        raise ValueError("training needs at least one scenario")
    # --- seeding --------------------------------------------------------------------------------
    rng = np.random.default_rng(args.seed)
    policy = (
        initial.copy()
        if initial is not None
        else LearnedPolicy.create(
            (
                AllocatorNetConfig.residual(
                    args.bases,
                    hidden=args.hidden,
                    stop_bias=args.stop_bias,
                    gate_bias=args.gate_bias,
                    target_head=args.target_head,
                )
                if args.bases
                else AllocatorNetConfig(hidden=args.hidden, stop_bias=args.stop_bias)
            ),
            max_moves=args.max_moves,
            seed=args.seed,
            forecaster_config=(
                ForecasterConfig(window_loads=args.forecast_window_loads) if args.forecast else None
            ),
        )
    )
    if not (args.train_allocator or args.train_router):
        raise ValueError("nothing to train: both train_allocator and train_router are off")
    if not args.train_allocator and not any(has_routing_choice(s) for s in scenarios):
        raise ValueError(
            "training the router alone needs a scenario where some job type has two or more "
            f"eligible queues; none of {[s.name for s in scenarios]} has one"
        )
    params = list(policy.router_net.parameters()) if args.train_router else []
    if args.train_allocator:
        params += list(policy.allocator_net.parameters())
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5)
    budget_s = args.minutes * 60.0
    started = clock()
    eval_seeds = [EVAL_SEED_BASE + k for k in range(args.eval_seeds)]
    tick_s = {s.name: s.allocation.tick_s for s in scenarios}
    # The forecast fit and the gate's warm start record episodes as long as the teachers are
    # chosen on (up to `eval_max_duration_s`): a gate fitted on the first minutes of a diurnal
    # scenario never saw its peak, and picked the wrong base there.
    recorded_episode_s = args.eval_max_duration_s or args.episode_s[1]

    if policy.forecaster_net is not None and initial is None and args.train_allocator:
        # First, so that the teachers below are chosen, and the gate fitted, on the forecast the
        # policy will plan with. A regression on exogenous targets is far less noisy than the
        # policy gradient, so it takes larger steps (as the gate's warm start does, at 3x).
        result_fit = train_forecaster(
            policy, scenarios, map_rollouts, rng,
            episodes_per_scenario=args.forecast_episodes,
            episode_s=recorded_episode_s,
            load_scale=args.load_scale, steps=args.forecast_steps,
            learning_rate=args.learning_rate * 6,
        )  # fmt: skip
    else:
        result_fit = None
    teacher_seeds = range(TRAIN_SEEDS.start, TRAIN_SEEDS.start + args.teacher_seeds)

    validation: dict[str, Any] = {
        "learned_router": args.train_router,
        "heuristic_params": (
            tuned_heuristic_params(scenarios) if args.eval_tuned_heuristics else None
        ),
        "random_starts": args.eval_random_starts,
        "max_duration_s": args.eval_max_duration_s,
        "p99_weight": args.p99_weight,
    }
    evaluation, heuristics = evaluate(policy, scenarios, eval_seeds, map_rollouts, 0, **validation)
    result = TrainResult(
        policy=policy.copy(),
        args=args,
        iterations=0,
        elapsed_s=0.0,
        best=evaluation,
        forecast_fit=result_fit,
    )
    result.evaluations.append(evaluation)
    kept.append(result)
    tuned_params = tuned_heuristic_params(scenarios)
    if policy.allocator_net.target_net is not None and initial is None and args.train_allocator:
        # Before the gate's teachers are chosen, so the trained head competes with the bases.
        result.regime_tables, result.target_fit = fit_target_head(
            policy, scenarios, map_rollouts, rng, args, teacher_seeds, recorded_episode_s
        )
    if args.imitation_coef > 0 and args.bases and args.train_allocator:
        result.base_teachers = choose_base_teachers(
            scenarios, args.bases, map_rollouts, args.eval_max_duration_s, teacher_seeds, policy
        )
        result.teachers = {
            s: (
                f"base {k} ({args.bases[k][0]} {args.bases[k][1]})"
                if k < len(args.bases)
                else f"option {k} (the target head)"
            )
            for s, k in result.base_teachers.items()
        }
        if args.gate_pretrain_steps > 0:
            result.gate_pretrain_nll = pretrain_gate(
                policy, scenarios, result.base_teachers, map_rollouts, rng,
                steps=args.gate_pretrain_steps, learning_rate=args.learning_rate * 3,
                episode_s=recorded_episode_s,
            )  # fmt: skip
            # The pretrained policy is a candidate too: validated before any PPO update.
            evaluation, _ = evaluate(
                policy, scenarios, eval_seeds, map_rollouts, 0, heuristics, **validation
            )
            result.evaluations.append(evaluation)
            if result.best is None or evaluation.score < result.best.score:
                result.best = evaluation
                result.policy = policy.copy()
    elif args.imitation_coef > 0 and args.train_allocator:
        result.teachers = choose_teachers(
            scenarios, tuned_params, map_rollouts, args.eval_max_duration_s, teacher_seeds
        )

    iteration = 0
    while True:
        elapsed_s = clock() - started
        fraction = min(elapsed_s / budget_s, 1.0) if budget_s > 0 else 1.0
        if fraction >= 1.0 or (
            args.max_iterations is not None and iteration >= args.max_iterations
        ):
            break
        iteration += 1
        if args.max_iterations is not None:
            fraction = max(fraction, (iteration - 1) / args.max_iterations)
        lr = _anneal(args.learning_rate, fraction) if args.anneal_lr else args.learning_rate
        for group in optimizer.param_groups:
            group["lr"] = lr
        ent_coef = _anneal(args.ent_coef, fraction)
        imitation_coef = (
            _anneal(args.imitation_coef, fraction / args.imitation_fraction)
            if args.imitation_fraction > 0
            else 0.0
        )
        # A residual allocator imitates with its gate (labels known per scenario), not its moves.
        teacher_of = result.teachers if imitation_coef > 0 and not args.bases else {}

        # --- rollout ------------------------------------------------------------------------------
        inputs = _draw_inputs(args, scenarios, rng, fraction)
        tasks = [
            RolloutTask(
                x.scenario,
                x.seed,
                load_scale=x.load_scale,
                duration_s=x.episode_s,
                policy=policy,
                policy_seed=int(rng.integers(2**31)),
                learned_router=args.train_router,
                allocator_samples=args.train_allocator,
                record=True,
                group=g,
                initial_seed=x.initial_seed,
                teacher=teacher_of.get(x.scenario.name),
                teacher_params=tuned_params.get(x.scenario.name, {}).get(
                    teacher_of.get(x.scenario.name, "")
                ),
            )
            for g, x in enumerate(inputs)
            for _ in range(args.replays)
        ]
        result.train_seeds.extend(x.seed for x in inputs)
        rollout_started = clock()
        results = map_rollouts(tasks)
        rollout_s = clock() - rollout_started

        # --- advantage ----------------------------------------------------------------------------
        gammas = {r.group: 0.5 ** (tick_s[r.scenario] / args.discount_half_life_s) for r in results}
        advantages: list[np.ndarray] = [np.zeros(0)] * len(results)
        for g in {r.group for r in results}:
            members = [i for i, r in enumerate(results) if r.group == g]
            group_adv = replay_advantages(
                [results[i] for i in members],
                gammas[g],
                args.reconfiguration_penalty_s,
                args.slo_penalty_s,
            )
            for i, a in zip(members, group_adv, strict=True):
                advantages[i] = a
        flat = np.concatenate(advantages) if advantages else np.zeros(0)
        adv_std = float(flat.std()) + 1e-8
        advantages = [a / adv_std for a in advantages]

        # --- update -------------------------------------------------------------------------------
        alloc_batches = (
            _stack_allocator_batch(results, advantages, result.base_teachers)
            if args.train_allocator
            else {}
        )
        router_batches = _stack_router_batch(results, advantages) if args.train_router else {}
        policy.allocator_net.train()
        policy.router_net.train()
        stats: dict[str, list[float]] = defaultdict(list)
        for _epoch in range(args.update_epochs):
            steps: list[tuple[str, int, torch.Tensor]] = []
            for kind, batches in (("allocator", alloc_batches), ("router", router_batches)):
                for key, batch in batches.items():
                    order = torch.from_numpy(rng.permutation(len(batch["advantage"])))
                    steps += [
                        (kind, key, order[i : i + args.minibatch_size])
                        for i in range(0, len(order), args.minibatch_size)
                    ]
            kls: list[float] = []
            for k in rng.permutation(len(steps)).tolist():
                kind, key, idx = steps[k]
                if kind == "allocator":
                    b = alloc_batches[key]
                    out = policy.allocator_net(b["features"][idx])
                    moves_lp, entropy = moves_log_prob(
                        out, b["counts"][idx], b["free"][idx], b["low"][idx], b["high"][idx],
                        b["moves"][idx],
                    )  # fmt: skip
                    gate_lp, gate_entropy = gate_log_prob(out.gate_logits, b["base"][idx])
                    new_lp = gate_lp + moves_lp
                    entropy = entropy + gate_entropy
                    has_teacher = b["has_teacher"][idx]
                    teacher_base = b["teacher_base"][idx]
                    if imitation_coef > 0 and bool((teacher_base >= 0).any()):
                        labelled = teacher_base >= 0
                        gate_teacher_lp, _ = gate_log_prob(
                            out.gate_logits[labelled], teacher_base[labelled]
                        )
                        imitation = -gate_teacher_lp.mean()
                        stats["losses/imitation_nll"].append(float(imitation.detach()))
                    elif imitation_coef > 0 and float(has_teacher.sum()) > 0:
                        teacher_lp, _ = moves_log_prob(
                            out, b["counts"][idx], b["free"][idx], b["low"][idx], b["high"][idx],
                            b["teacher_moves"][idx],
                        )  # fmt: skip
                        imitation = -(teacher_lp * has_teacher).sum() / has_teacher.sum()
                        stats["losses/imitation_nll"].append(float(imitation.detach()))
                    else:
                        imitation = torch.zeros(())
                else:
                    b = router_batches[key]
                    log_probs = torch.log_softmax(policy.router_net(b["features"][idx]), dim=-1)
                    new_lp = log_probs.gather(1, b["chosen"][idx, None]).squeeze(1)
                    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
                pg_loss, approx_kl, clipfrac = _clipped_loss(
                    new_lp, b["old_log_prob"][idx], b["advantage"][idx], args.clip_coef
                )
                loss = pg_loss - ent_coef * entropy.mean()
                if kind == "allocator":
                    loss = loss + imitation_coef * imitation
                optimizer.zero_grad()
                torch.autograd.backward(loss)
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                stats[f"losses/{kind}_policy_loss"].append(float(pg_loss.detach()))
                stats[f"losses/{kind}_entropy"].append(float(entropy.detach().mean()))
                stats[f"losses/{kind}_approx_kl"].append(float(approx_kl))
                stats[f"losses/{kind}_clipfrac"].append(float(clipfrac))
                kls.append(float(approx_kl))
            if args.target_kl is not None and kls and float(np.mean(kls)) > args.target_kl:
                break
        policy.allocator_net.eval()
        policy.router_net.eval()

        # --- metrics ------------------------------------------------------------------------------
        ticks = sum(len(r.rewards) for r in results)
        metrics = {k: float(np.mean(v)) for k, v in stats.items()}
        metrics.update(
            {
                "charts/learning_rate": lr,
                "charts/ent_coef": ent_coef,
                "charts/imitation_coef": imitation_coef,
                "charts/episodic_mean_jct_s": float(np.nanmean([r.mean_jct_s for r in results])),
                "charts/moves_per_tick": float(sum(int(r.moved.sum()) for r in results) / ticks),
                "charts/fallbacks": float(sum(r.fallbacks for r in results)),
                "charts/route_choices": float(sum(len(r.route_choices) for r in results)),
                "charts/ticks_per_s": ticks / max(rollout_s, 1e-9),
                "charts/elapsed_s": clock() - started,
            }
        )
        result.history.append(metrics)

        evaluation_now: Evaluation | None = None
        if iteration % args.eval_every == 0:
            evaluation_now, _ = evaluate(
                policy, scenarios, eval_seeds, map_rollouts, iteration, heuristics, **validation
            )
            result.evaluations.append(evaluation_now)
            if result.best is None or evaluation_now.score < result.best.score:
                result.best = evaluation_now
                result.policy = policy.copy()
        if on_iteration is not None:
            on_iteration(iteration, fraction, metrics, evaluation_now)

    # A final evaluation, so the last updates are not lost when they were the best.
    if result.evaluations[-1].iteration != iteration:
        final, _ = evaluate(
            policy, scenarios, eval_seeds, map_rollouts, iteration, heuristics, **validation
        )
        result.evaluations.append(final)
        if result.best is None or final.score < result.best.score:
            result.best = final
            result.policy = policy.copy()
    result.iterations = iteration
    result.elapsed_s = clock() - started
    return result
