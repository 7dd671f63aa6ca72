"""Training the learned allocator and router: PPO's clipped update on Decima-style advantages.

Reads top to bottom like cleanrl's ppo.py: the arguments (one docstring each, one small config
per stage), then `train`, a short list of named stages, each a function below it:

    fit_forecast      regress the allocator's arrival-rate forecast on recorded episodes
    validate          the untrained policy against every tuned heuristic (iteration 0)
    search_regimes    with a target head: a regime table per bursty scenario, imitated by the head
    imitate           choose each scenario's teacher; warm-start a residual allocator's gate
    ppo_iterations    per iteration the rollout, the advantage, the update and the metrics
                      (`losses/...`, `charts/...`), validated every `validate.every`
    validate          once more after the last iteration

(Saving is the caller's: `bilevel train` writes the checkpoint, its metadata and its curve.)
Differences from cleanrl, and why:

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
- `minutes` bounds the whole run, validation included (`policies.learned.budget`): a stage starts
  a batch of episodes only when the episodes so far predict it ends in time. A validation that does
  not fit is cut to the seeds that do at iteration 0 (later ones use the same seeds) and skipped
  later; what was cut is said in `TrainResult.notes`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from policies.learned.allocator import gate_log_prob, moves_log_prob
from policies.learned.budget import Budget
from policies.learned.forecast import ForecasterConfig
from policies.learned.forecast_training import ForecastFit, fit_forecaster, forecast_tasks
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


# --- arguments ------------------------------------------------------------------------------------
#
# Each config is one stage's; `Args` nests them. `scheduler.commands.train` derives the command
# line from these classes (`scheduler.commands._dataclass_cli`): an option per field, named
# `--<cli_prefix>-<field>` (the prefix is empty for the policy's shape and PPO's own knobs, as
# cleanrl's flat arguments are), its help the field's docstring; metadata `cli` names an option
# differently, for the names the command had before its options were derived.


def option_name(prefix: str, name: str) -> str:
    """The command-line option of field `name` of a config with `cli_prefix` `prefix`."""
    return "--" + "-".join(filter(None, (prefix, name))).replace("_", "-")


class _Config:
    """Range checks shared by the configs; errors name the field and its option."""

    section: ClassVar[str] = ""
    cli_prefix: ClassVar[str] = ""

    def _where(self, name: str) -> str:
        declared = {f.name: f.metadata.get("cli") for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        flag = str(declared.get(name) or option_name(self.cli_prefix, name)).split("/")[0]
        return f"{self.section + '.' if self.section else ''}{name} ({flag})"

    def _at_least(self, **values: tuple[float, float]) -> None:
        for name, (value, low) in values.items():
            if not (math.isfinite(value) and value >= low):
                raise ValueError(
                    f"{self._where(name)} must be a finite number >= {low}, got {value}"
                )

    def _positive(self, **values: float) -> None:
        for name, value in values.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{self._where(name)} must be a finite number > 0, got {value}")

    def _range(self, **values: tuple[float, float]) -> None:
        for name, (low, high) in values.items():
            if not (0 < low <= high and math.isfinite(high)):
                raise ValueError(
                    f"{self._where(name)} must be (low, high) with 0 < low <= high, got "
                    f"{(low, high)}"
                )


@dataclass
class NetConfig(_Config):
    """The policy's shape (a run continued from `initial` keeps that policy's)."""

    section: ClassVar[str] = "net"
    hidden: int = 64
    """width of the allocator network"""
    max_moves: int = 4
    """moves the allocator may make per tick"""
    bases: tuple[BaseSpec, ...] = field(
        default=(), metadata={"cli": "--base", "metavar": "NAME[:K=V,...]"}
    )
    """train a residual allocator over these heuristics ((registry name, parameters), the same for
    every scenario; on the command line NAME or NAME:K=V,K=V, repeated): each tick it picks one and
    corrects its proposal, and the untrained policy is the first (empty: moves start from the
    current allocation)"""
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

    def __post_init__(self) -> None:
        self._at_least(hidden=(self.hidden, 1), max_moves=(self.max_moves, 0))
        if self.target_head and not self.bases:
            raise ValueError("target_head is a gate option of a residual allocator: give bases")


@dataclass
class ForecastConfig(_Config):
    """Stage fit_forecast: the allocator's learned arrival-rate forecast."""

    section: ClassVar[str] = "forecast"
    cli_prefix: ClassVar[str] = "forecast"
    enabled: bool = field(default=True, metadata={"cli": "--forecast/--no-forecast"})
    """give the allocator a learned arrival-rate forecast (`policies.learned.forecast`) that its
    bases and network plan with, fitted by regression before the gate and the moves are trained"""
    window_loads: float = 4.0
    """the forecast is for the mean rate over this many of the slowest model load (at least 4
    ticks): the time a moved worker needs to pay back its load"""
    episodes: int = 4
    """recorded episodes per scenario (up to `validate.max_duration_s` long) the forecast is
    fitted on"""
    steps: int = 1500
    """Adam steps of the forecast fit (one balanced minibatch per scenario each)"""

    def __post_init__(self) -> None:
        self._at_least(episodes=(self.episodes, 1), steps=(self.steps, 0))
        self._positive(window_loads=self.window_loads)


@dataclass
class RegimeConfig(_Config):
    """Stage search_regimes (with `net.target_head`): the regime tables and their imitation."""

    section: ClassVar[str] = "regimes"
    search_rounds: int = field(default=12, metadata={"cli": "--regime-search-rounds"})
    """most rounds of the regime-table search per scenario (each scores every single-worker move
    of every regime on the teacher seeds)"""
    distill_rounds: int = 4
    """DAgger rounds of fitting the target head to the regime tables"""
    distill_episodes: int = 8
    """recorded episodes per scenario with a table in each distillation round"""
    distill_steps: int = 300
    """Adam steps (one minibatch per scenario each) after each distillation round"""

    def __post_init__(self) -> None:
        self._at_least(
            search_rounds=(self.search_rounds, 0),
            distill_rounds=(self.distill_rounds, 1),
            distill_episodes=(self.distill_episodes, 1),
            distill_steps=(self.distill_steps, 0),
        )


@dataclass
class ImitationConfig(_Config):
    """Stage imitate: teachers per scenario, and the imitation term of the PPO loss."""

    section: ClassVar[str] = "imitation"
    cli_prefix: ClassVar[str] = "imitation"
    coef: float = 0.0
    """weight of an imitation term (DAgger: minus the log-probability of the moves a teacher
    heuristic would make in the policy's own situation) at the start; annealed linearly to 0 over
    `imitation.fraction` of the budget. The teacher of each scenario is the heuristic, with its
    tuned parameters, of lowest mean JCT on the tuning seeds (training arrivals); 0 disables it.
    A residual allocator imitates with its gate instead: minus the log-probability of picking the
    base of lowest mean JCT on the tuning seeds of the tick's scenario"""
    fraction: float = 0.5
    """fraction of the budget over which the imitation weight decays to 0"""
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
        self._at_least(
            coef=(self.coef, 0.0),
            teacher_seeds=(self.teacher_seeds, 1),
            gate_pretrain_steps=(self.gate_pretrain_steps, 0),
        )


@dataclass
class PPOConfig(_Config):
    """Stage ppo_iterations: the curriculum, the reward, and PPO's update."""

    section: ClassVar[str] = "ppo"
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
    random_start_fraction: float = 0.5
    """fraction of inputs that start from a random split of the workers instead of the scenario's
    initial allocation (which follows the run's total work, so merely keeping it is strong)"""
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
    train_router: bool = True
    """train the learned router where a scenario has a routing choice"""
    train_allocator: bool = field(default=True, metadata={"cli": "--train-allocator/--router-only"})
    """train the allocator; --router-only trains the router alone, the allocator (from `initial`,
    `--init`) acting by its mode and never updated: the alternating step for scenarios with a
    routing choice"""

    def __post_init__(self) -> None:
        self._at_least(
            reconfiguration_penalty_s=(self.reconfiguration_penalty_s, 0.0),
            slo_penalty_s=(self.slo_penalty_s, 0.0),
            ent_coef=(self.ent_coef, 0.0),
            inputs_per_iteration=(self.inputs_per_iteration, 1),
            replays=(self.replays, 1),
            update_epochs=(self.update_epochs, 1),
            minibatch_size=(self.minibatch_size, 1),
        )
        self._positive(
            learning_rate=self.learning_rate, discount_half_life_s=self.discount_half_life_s
        )
        self._range(episode_s=self.episode_s, load_scale=self.load_scale)


@dataclass
class ValidationConfig(_Config):
    """Stage validate: the held-out runs that choose the checkpoint kept."""

    section: ClassVar[str] = "validate"
    cli_prefix: ClassVar[str] = "eval"
    every: int = 5
    """iterations between evaluations on held-out seeds (and one before training)"""
    seeds: int = 4
    """validation arrival seeds (from EVAL_SEED_BASE) per scenario in each evaluation"""
    random_starts: bool = True
    """also validate from a random split of the workers (one per seed), not only from the
    scenario's initial allocation, which favours a policy that merely holds it"""
    max_duration_s: float | None = 3600.0
    """cap on a validation run's length (seconds of arrivals), so long scenarios stay cheap"""
    tuned_heuristics: bool = True
    """validate against the heuristics' tuned parameters (`policies.tuned`) where stored"""
    p99_weight: float = 0.5
    """weight of a p99 regression (learned p99 over the best heuristic's, above 1) in the score"""

    def __post_init__(self) -> None:
        self._at_least(every=(self.every, 1), seeds=(self.seeds, 1))


@dataclass
class Args(_Config):
    """Hyper-parameters of one training run."""

    seed: int = 1
    """seed of the initial weights, the curriculum draws and the policy's sampling"""
    minutes: float = 12.0
    """wall-clock budget of the whole run, validation included"""
    max_iterations: int | None = field(default=None, metadata={"cli": "--iterations"})
    """stop after this many iterations even with time left (None: the time budget decides)"""
    net: NetConfig = field(default_factory=NetConfig)
    forecast: ForecastConfig = field(default_factory=ForecastConfig)
    regimes: RegimeConfig = field(default_factory=RegimeConfig)
    imitation: ImitationConfig = field(default_factory=ImitationConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    validate: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        """Refuses values that would train nothing or train on nonsense, naming the field (each
        config checks its own when made)."""
        self._at_least(minutes=(self.minutes, 0.0))
        if self.max_iterations is not None and self.max_iterations < 0:
            raise ValueError(f"max_iterations must be >= 0, got {self.max_iterations}")
        if not (self.ppo.train_allocator or self.ppo.train_router):
            raise ValueError("nothing to train: both train_allocator and train_router are off")

    def to_dict(self) -> dict[str, Any]:
        """The arguments as JSON-ready values, nested by config (tuples become lists)."""

        def plain(value: Any) -> Any:
            if isinstance(value, tuple | list):
                return [plain(v) for v in value]
            return value

        return {
            k: {n: plain(v) for n, v in vars(value).items()}
            if isinstance(value, _Config)
            else plain(value)
            for k, value in vars(self).items()
        }


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
    # The validation seeds every evaluation of the run used (fewer than `validate.seeds` when the
    # budget cut the first validation short), and what the budget cut, one sentence each.
    validation_seeds: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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
    ppo = args.ppo
    ramp = min(fraction / ppo.curriculum_fraction, 1.0) if ppo.curriculum_fraction > 0 else 1.0
    low_load = 1.0 + ramp * (ppo.load_scale[0] - 1.0)
    high_load = 1.0 + ramp * (ppo.load_scale[1] - 1.0)
    shortest_s, longest_s = ppo.episode_s
    longest_s = shortest_s + ramp * (longest_s - shortest_s)
    inputs = []
    for _ in range(ppo.inputs_per_iteration):
        scenario = scenarios[int(rng.integers(len(scenarios)))]
        full_s = scenario.duration_s if scenario.duration_s is not None else longest_s
        episode_s = min(float(rng.uniform(shortest_s, longest_s)), full_s)
        seed = int(rng.integers(TRAIN_SEEDS.start, TRAIN_SEEDS.stop))
        load = float(rng.uniform(low_load, high_load))
        random_start = rng.random() < ppo.random_start_fraction
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
    tasks = validation_tasks(
        policy, scenarios, seeds, with_heuristics=heuristic_results is None,
        learned_router=learned_router, heuristic_params=heuristic_params,
        random_starts=random_starts, max_duration_s=max_duration_s,
    )  # fmt: skip
    return summarize_validation(
        tasks, map_rollouts(tasks), iteration, heuristic_results, p99_weight
    )


def validation_tasks(
    policy: LearnedPolicy,
    scenarios: Sequence[Scenario],
    seeds: Sequence[int],
    *,
    with_heuristics: bool,
    learned_router: bool = True,
    heuristic_params: HeuristicParams | None = None,
    random_starts: bool = False,
    max_duration_s: float | None = None,
) -> list[RolloutTask]:
    """The episodes of `evaluate` (see there), learned ones first, each group in seed order."""
    starts: list[int | None] = [None, 1] if random_starts else [None]

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
    if with_heuristics:
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
    return tasks


def summarize_validation(
    tasks: Sequence[RolloutTask],
    results: Sequence[RolloutResult],
    iteration: int,
    heuristic_results: dict[str, dict[str, tuple[float, float]]] | None = None,
    p99_weight: float = 0.5,
) -> tuple[Evaluation, dict[str, dict[str, tuple[float, float]]]]:
    """The evaluation of `tasks`' `results` (heuristics from `heuristic_results` when given), and
    the heuristics' (mean, p99) means per cell; each cell's numbers are means in task order."""
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
            s, map_rollouts, seeds=seeds, max_rounds=args.regimes.search_rounds,
            hold=policy.allocator_net.config.target_hold,
            slow_s=policy.allocator_net.config.slow_s,
            max_duration_s=args.validate.max_duration_s,
        )  # fmt: skip
        if found is not None:
            tables[s.name] = found
    if not tables:
        return tables, None
    fit = distill_targets(
        policy, scenarios, {name: t.params for name, t in tables.items()}, map_rollouts, rng,
        rounds=args.regimes.distill_rounds, episodes_per_round=args.regimes.distill_episodes,
        steps=args.regimes.distill_steps, episode_s=episode_s,
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


# --- train: the stages ------------------------------------------------------------------------

OnIteration = Callable[[int, float, dict[str, float], Evaluation | None], None]
# Per validation cell, per heuristic: its (mean, p99) JCT means, computed once at iteration 0.
HeuristicResults = dict[str, dict[str, tuple[float, float]]]


def train(
    args: Args,
    scenarios: Sequence[Scenario],
    map_rollouts: MapRollouts,
    *,
    clock: Callable[[], float] = time.monotonic,
    on_iteration: OnIteration | None = None,
    initial: LearnedPolicy | None = None,
) -> TrainResult:
    """Trains a policy on `scenarios` for `args.minutes` (or `args.max_iterations`).

    `on_iteration(iteration, elapsed fraction, metrics, evaluation or None)` is called after every
    iteration, for progress bars and logs. `initial` continues from existing weights. A
    `TrainingStopped` from either callback ends the run early, carrying the partial result: what
    the last validation kept (None when nothing was validated yet).
    """
    run = _Run.start(args, scenarios, map_rollouts, clock, initial)
    try:
        fit_forecast(run)
        validate(run, iteration=0)
        search_regimes(run)
        imitate(run)
        ppo_iterations(run, on_iteration)
        validate(run, iteration=run.iteration, final=True)
    except TrainingStopped as stop:
        if run.kept is not None and run.kept.evaluations:
            stop.partial = run.finish(iterations=len(run.kept.history))
        raise
    return run.finish(iterations=run.iteration)


@dataclass
class _Run:
    """What the stages share: the policy being trained, its optimizer, the budget, and the result
    so far."""

    args: Args
    scenarios: Sequence[Scenario]
    map_rollouts: MapRollouts
    budget: Budget
    rng: np.random.Generator
    policy: LearnedPolicy
    # Whether the policy is new (the supervised stages fit only a new allocator).
    fresh: bool
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    validation_seeds: list[int]
    # Episodes of the forecast fit and the gate's warm start are as long as the teachers are
    # chosen on (up to `validate.max_duration_s`): a gate fitted on the first minutes of a diurnal
    # scenario never saw its peak, and picked the wrong base there.
    recorded_episode_s: float
    teacher_seeds: range
    tuned_params: HeuristicParams
    forecast_fit: ForecastFit | None = None
    heuristics: HeuristicResults | None = None
    # The result, once the first validation (or its skipping) made one.
    kept: TrainResult | None = None
    notes: list[str] = field(default_factory=list)
    iteration: int = 0

    @classmethod
    def start(
        cls,
        args: Args,
        scenarios: Sequence[Scenario],
        map_rollouts: MapRollouts,
        clock: Callable[[], float],
        initial: LearnedPolicy | None,
    ) -> _Run:
        """Seeding: the rng, the policy (new from `args.net`, or a copy of `initial`) and the
        optimizer over what is trained."""
        if not scenarios:
            raise ValueError("training needs at least one scenario")
        budget = Budget(args.minutes * 60.0, clock)
        rng = np.random.default_rng(args.seed)
        policy = initial.copy() if initial is not None else new_policy(args)
        if not args.ppo.train_allocator and not any(has_routing_choice(s) for s in scenarios):
            raise ValueError(
                "training the router alone needs a scenario where some job type has two or more "
                f"eligible queues; none of {[s.name for s in scenarios]} has one"
            )
        params = list(policy.router_net.parameters()) if args.ppo.train_router else []
        if args.ppo.train_allocator:
            params += list(policy.allocator_net.parameters())
        return cls(
            args=args,
            scenarios=scenarios,
            map_rollouts=budget.meter(map_rollouts),
            budget=budget,
            rng=rng,
            policy=policy,
            fresh=initial is None,
            params=params,
            optimizer=torch.optim.Adam(params, lr=args.ppo.learning_rate, eps=1e-5),
            validation_seeds=[EVAL_SEED_BASE + k for k in range(args.validate.seeds)],
            recorded_episode_s=args.validate.max_duration_s or args.ppo.episode_s[1],
            teacher_seeds=range(
                TRAIN_SEEDS.start, TRAIN_SEEDS.start + args.imitation.teacher_seeds
            ),
            tuned_params=tuned_heuristic_params(scenarios),
        )

    @property
    def fits_allocator(self) -> bool:
        """True when the supervised stages fit the allocator: a new one that is trained."""
        return self.fresh and self.args.ppo.train_allocator

    def note(self, text: str) -> None:
        self.notes.append(text)

    def validation_episodes(self, *, with_heuristics: bool, seeds: int = 1) -> int:
        starts = 2 if self.args.validate.random_starts else 1
        policies = 1 + (len(HEURISTIC_ALLOCATORS) if with_heuristics else 0)
        return len(self.scenarios) * starts * policies * seeds

    def keep(self, evaluation: Evaluation) -> None:
        """Records `evaluation`, and keeps the policy when it scores best so far."""
        assert self.kept is not None
        self.kept.evaluations.append(evaluation)
        if self.kept.best is None or evaluation.score < self.kept.best.score:
            self.kept.best = evaluation
            self.kept.policy = self.policy.copy()

    def finish(self, *, iterations: int) -> TrainResult:
        result = self.kept if self.kept is not None else self._new_result()
        result.iterations = iterations
        result.elapsed_s = self.budget.elapsed_s()
        result.validation_seeds = list(self.validation_seeds)
        result.notes = list(self.notes)
        return result

    def _new_result(self) -> TrainResult:
        return TrainResult(
            policy=self.policy.copy(),
            args=self.args,
            iterations=0,
            elapsed_s=0.0,
            forecast_fit=self.forecast_fit,
        )


def new_policy(args: Args) -> LearnedPolicy:
    """An untrained policy of the shape `args.net` (and `args.forecast`) describe."""
    net = args.net
    return LearnedPolicy.create(
        (
            AllocatorNetConfig.residual(
                net.bases,
                hidden=net.hidden,
                stop_bias=net.stop_bias,
                gate_bias=net.gate_bias,
                target_head=net.target_head,
            )
            if net.bases
            else AllocatorNetConfig(hidden=net.hidden, stop_bias=net.stop_bias)
        ),
        max_moves=net.max_moves,
        seed=args.seed,
        forecaster_config=(
            ForecasterConfig(window_loads=args.forecast.window_loads)
            if args.forecast.enabled
            else None
        ),
    )


def fit_forecast(run: _Run) -> None:
    """Stage 1: the allocator's rate forecast, by regression on recorded episodes.

    First, so that the teachers below are chosen, and the gate fitted, on the forecast the policy
    will plan with. A regression on exogenous targets is far less noisy than the policy gradient,
    so it takes larger steps (as the gate's warm start does, at 3x). The episodes run in rounds of
    one per scenario, and a round (after the first) and the fit's steps go ahead only while the
    budget would still hold one seed of the first validation after them."""
    if run.policy.forecaster_net is None or not run.fits_allocator:
        return
    config = run.args.forecast
    tasks = forecast_tasks(
        run.policy, run.scenarios, run.rng, episodes_per_scenario=config.episodes,
        episode_s=run.recorded_episode_s, load_scale=run.args.ppo.load_scale,
    )  # fmt: skip
    reserve = run.validation_episodes(with_heuristics=True)
    recorded: dict[int, RolloutResult] = {}
    for k in range(config.episodes):
        round_ = [i for i in range(len(tasks)) if i % config.episodes == k]
        if k > 0 and not run.budget.affords(len(round_) + reserve):
            run.note(
                f"forecast fitted on {k} of {config.episodes} episodes per scenario, to leave "
                "the budget time for a validation"
            )
            break
        recorded.update(zip(round_, run.map_rollouts([tasks[i] for i in round_]), strict=True))
    cut = [False]

    def out_of_time() -> bool:
        cut[0] = not run.budget.affords(reserve)
        return cut[0]

    run.forecast_fit = fit_forecaster(
        run.policy, [recorded[i] for i in sorted(recorded)], run.rng, steps=config.steps,
        learning_rate=run.args.ppo.learning_rate * 6, should_stop=out_of_time,
    )  # fmt: skip
    if cut[0]:
        run.note("forecast fit cut short of its steps, to leave the budget time for a validation")


def validate(run: _Run, *, iteration: int, final: bool = False) -> Evaluation | None:
    """The deterministic policy against every heuristic on the validation seeds; the policy is
    kept when it scores best so far. Returns the evaluation, None when the budget had no room.

    Runs seed by seed, each only if the budget affords it. The first validation (which also runs
    the heuristics, cached for the later ones) keeps the seeds that fitted, and every later one
    uses them; a later one that cannot run them all is skipped, since fewer seeds would not
    compare with the heuristics' means. `final` validates after the last iteration unless that
    one was validated already."""
    if final and (
        run.kept is None
        or not run.kept.evaluations
        or run.kept.evaluations[-1].iteration == iteration
    ):
        return None
    first = run.heuristics is None
    validation = run.args.validate
    chunk = run.validation_episodes(with_heuristics=first)
    if not first and not run.budget.affords(chunk * len(run.validation_seeds)):
        run.note(f"validation of iteration {iteration} skipped: no time left in the budget")
        return None
    tasks: list[RolloutTask] = []
    results: list[RolloutResult] = []
    done: list[int] = []
    for seed in run.validation_seeds:
        if first and not run.budget.affords(chunk):
            break
        seed_tasks = validation_tasks(
            run.policy, run.scenarios, [seed], with_heuristics=first,
            learned_router=run.args.ppo.train_router,
            heuristic_params=run.tuned_params if validation.tuned_heuristics else None,
            random_starts=validation.random_starts, max_duration_s=validation.max_duration_s,
        )  # fmt: skip
        results += run.map_rollouts(seed_tasks)
        tasks += seed_tasks
        done.append(seed)
    if first and len(done) < len(run.validation_seeds):
        run.note(
            f"validation on {len(done)} of {len(run.validation_seeds)} seeds: the budget held "
            "no more" + ("; the policy kept is unvalidated" if not done else "")
        )
        run.validation_seeds = done
    if run.kept is None:
        run.kept = run._new_result()
    if not done:
        return None
    evaluation, run.heuristics = summarize_validation(
        tasks, results, iteration, run.heuristics, validation.p99_weight
    )
    run.keep(evaluation)
    return evaluation


def search_regimes(run: _Run) -> None:
    """Stage 3, with a target head: a regime table per bursty scenario, imitated by the head.
    Before the gate's teachers are chosen, so the trained head competes with the bases."""
    if run.policy.allocator_net.target_net is None or not run.fits_allocator:
        return
    if run.budget.remaining_s() <= 0:
        run.note("regime search skipped: no time left in the budget")
        return
    assert run.kept is not None
    run.kept.regime_tables, run.kept.target_fit = fit_target_head(
        run.policy, run.scenarios, run.map_rollouts, run.rng, run.args, run.teacher_seeds,
        run.recorded_episode_s,
    )  # fmt: skip


def imitate(run: _Run) -> None:
    """Stage 4, with imitation: each scenario's teacher (a base of a residual allocator, else a
    tuned heuristic), and for a residual allocator the gate's supervised warm start, validated."""
    args = run.args
    if args.imitation.coef <= 0 or not args.ppo.train_allocator:
        return
    assert run.kept is not None
    if run.budget.remaining_s() <= 0:
        run.note("teachers not chosen (no imitation): no time left in the budget")
        return
    bases = args.net.bases
    if not bases:
        run.kept.teachers = choose_teachers(
            run.scenarios, run.tuned_params, run.map_rollouts, args.validate.max_duration_s,
            run.teacher_seeds,
        )  # fmt: skip
        return
    run.kept.base_teachers = choose_base_teachers(
        run.scenarios, bases, run.map_rollouts, args.validate.max_duration_s, run.teacher_seeds,
        run.policy,
    )  # fmt: skip
    run.kept.teachers = {
        s: (
            f"base {k} ({bases[k][0]} {bases[k][1]})"
            if k < len(bases)
            else f"option {k} (the target head)"
        )
        for s, k in run.kept.base_teachers.items()
    }
    if args.imitation.gate_pretrain_steps > 0:
        run.kept.gate_pretrain_nll = pretrain_gate(
            run.policy, run.scenarios, run.kept.base_teachers, run.map_rollouts, run.rng,
            steps=args.imitation.gate_pretrain_steps, learning_rate=args.ppo.learning_rate * 3,
            episode_s=run.recorded_episode_s,
        )  # fmt: skip
        # The pretrained policy is a candidate too: validated before any PPO update.
        validate(run, iteration=0)


def ppo_iterations(run: _Run, on_iteration: OnIteration | None) -> None:
    """Stage 5: PPO iterations until the budget (or `max_iterations`) ends them. An iteration
    starts only when the budget affords it and one validation after it (its own if due, else the
    final one), both predicted from the episodes and iterations so far."""
    args = run.args
    iteration_s: float | None = None
    while True:
        fraction = run.budget.fraction()
        if fraction >= 1.0 or (
            args.max_iterations is not None and run.iteration >= args.max_iterations
        ):
            break
        episodes = args.ppo.inputs_per_iteration * args.ppo.replays
        validation = run.validation_episodes(with_heuristics=False, seeds=len(run.validation_seeds))
        predicted_s = run.budget.predict_s(episodes) if iteration_s is None else iteration_s
        if not run.budget.affords(validation, also_s=predicted_s):
            run.note(
                f"stopped after {run.iteration} iterations: the budget left no room for another "
                "and a validation after it"
            )
            break
        run.iteration += 1
        if args.max_iterations is not None:
            fraction = max(fraction, (run.iteration - 1) / args.max_iterations)
        started_s = run.budget.elapsed_s()
        metrics = ppo_iteration(run, fraction)
        iteration_s = run.budget.elapsed_s() - started_s
        evaluation = (
            validate(run, iteration=run.iteration)
            if run.iteration % args.validate.every == 0
            else None
        )
        if on_iteration is not None:
            on_iteration(run.iteration, fraction, metrics, evaluation)


def ppo_iteration(run: _Run, fraction: float) -> dict[str, float]:
    """One iteration at `fraction` of the budget: rollout, advantage, update; returns its metrics
    (also appended to the result's history)."""
    assert run.kept is not None
    ppo = run.args.ppo
    lr = _anneal(ppo.learning_rate, fraction) if ppo.anneal_lr else ppo.learning_rate
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    ent_coef = _anneal(ppo.ent_coef, fraction)
    imitation = run.args.imitation
    imitation_coef = (
        _anneal(imitation.coef, fraction / imitation.fraction) if imitation.fraction > 0 else 0.0
    )

    # --- rollout ------------------------------------------------------------------------------
    inputs = _draw_inputs(run.args, run.scenarios, run.rng, fraction)
    tasks = _rollout_tasks(run, inputs, imitation_coef)
    run.kept.train_seeds.extend(x.seed for x in inputs)
    rollout_started_s = run.budget.elapsed_s()
    results = run.map_rollouts(tasks)
    rollout_s = run.budget.elapsed_s() - rollout_started_s

    # --- advantage ----------------------------------------------------------------------------
    advantages = _normalized_advantages(run, results)

    # --- update -------------------------------------------------------------------------------
    stats = _update(run, results, advantages, ent_coef, imitation_coef)

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
            "charts/elapsed_s": run.budget.elapsed_s(),
        }
    )
    run.kept.history.append(metrics)
    return metrics


def _rollout_tasks(run: _Run, inputs: Sequence[_Input], imitation_coef: float) -> list[RolloutTask]:
    """`replays` sampled episodes of each input, grouped by input for the baseline."""
    assert run.kept is not None
    ppo = run.args.ppo
    # A residual allocator imitates with its gate (labels known per scenario), not its moves.
    teacher_of = run.kept.teachers if imitation_coef > 0 and not run.args.net.bases else {}
    return [
        RolloutTask(
            x.scenario,
            x.seed,
            load_scale=x.load_scale,
            duration_s=x.episode_s,
            policy=run.policy,
            policy_seed=int(run.rng.integers(2**31)),
            learned_router=ppo.train_router,
            allocator_samples=ppo.train_allocator,
            record=True,
            group=g,
            initial_seed=x.initial_seed,
            teacher=teacher_of.get(x.scenario.name),
            teacher_params=run.tuned_params.get(x.scenario.name, {}).get(
                teacher_of.get(x.scenario.name, "")
            ),
        )
        for g, x in enumerate(inputs)
        for _ in range(ppo.replays)
    ]


def _normalized_advantages(run: _Run, results: Sequence[RolloutResult]) -> list[np.ndarray]:
    """Per episode, per tick: `replay_advantages` within each input's replays, then divided by
    the iteration's standard deviation."""
    ppo = run.args.ppo
    tick_s = {s.name: s.allocation.tick_s for s in run.scenarios}
    gammas = {r.group: 0.5 ** (tick_s[r.scenario] / ppo.discount_half_life_s) for r in results}
    advantages: list[np.ndarray] = [np.zeros(0)] * len(results)
    for g in {r.group for r in results}:
        members = [i for i, r in enumerate(results) if r.group == g]
        group_adv = replay_advantages(
            [results[i] for i in members],
            gammas[g],
            ppo.reconfiguration_penalty_s,
            ppo.slo_penalty_s,
        )
        for i, a in zip(members, group_adv, strict=True):
            advantages[i] = a
    flat = np.concatenate(advantages) if advantages else np.zeros(0)
    adv_std = float(flat.std()) + 1e-8
    return [a / adv_std for a in advantages]


def _update(
    run: _Run,
    results: Sequence[RolloutResult],
    advantages: Sequence[np.ndarray],
    ent_coef: float,
    imitation_coef: float,
) -> dict[str, list[float]]:
    """`update_epochs` passes of clipped-surrogate minibatch steps over the iteration's
    decisions (allocator and router minibatches shuffled together); returns the losses."""
    assert run.kept is not None
    ppo = run.args.ppo
    policy, rng = run.policy, run.rng
    alloc_batches = (
        _stack_allocator_batch(results, advantages, run.kept.base_teachers)
        if ppo.train_allocator
        else {}
    )
    router_batches = _stack_router_batch(results, advantages) if ppo.train_router else {}
    policy.allocator_net.train()
    policy.router_net.train()
    stats: dict[str, list[float]] = defaultdict(list)
    for _epoch in range(ppo.update_epochs):
        steps: list[tuple[str, int, torch.Tensor]] = []
        for kind, batches in (("allocator", alloc_batches), ("router", router_batches)):
            for key, batch in batches.items():
                order = torch.from_numpy(rng.permutation(len(batch["advantage"])))
                steps += [
                    (kind, key, order[i : i + ppo.minibatch_size])
                    for i in range(0, len(order), ppo.minibatch_size)
                ]
        kls: list[float] = []
        for k in rng.permutation(len(steps)).tolist():
            kind, key, idx = steps[k]
            if kind == "allocator":
                b = alloc_batches[key]
                new_lp, entropy, imitation = _allocator_terms(policy, b, idx, imitation_coef)
                if imitation is not None:
                    stats["losses/imitation_nll"].append(float(imitation.detach()))
            else:
                b = router_batches[key]
                log_probs = torch.log_softmax(policy.router_net(b["features"][idx]), dim=-1)
                new_lp = log_probs.gather(1, b["chosen"][idx, None]).squeeze(1)
                entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
                imitation = None
            pg_loss, approx_kl, clipfrac = _clipped_loss(
                new_lp, b["old_log_prob"][idx], b["advantage"][idx], ppo.clip_coef
            )
            loss = pg_loss - ent_coef * entropy.mean()
            if kind == "allocator":
                loss = loss + imitation_coef * (
                    imitation if imitation is not None else torch.zeros(())
                )
            run.optimizer.zero_grad()
            torch.autograd.backward(loss)
            torch.nn.utils.clip_grad_norm_(run.params, ppo.max_grad_norm)
            run.optimizer.step()
            stats[f"losses/{kind}_policy_loss"].append(float(pg_loss.detach()))
            stats[f"losses/{kind}_entropy"].append(float(entropy.detach().mean()))
            stats[f"losses/{kind}_approx_kl"].append(float(approx_kl))
            stats[f"losses/{kind}_clipfrac"].append(float(clipfrac))
            kls.append(float(approx_kl))
        if ppo.target_kl is not None and kls and float(np.mean(kls)) > ppo.target_kl:
            break
    policy.allocator_net.eval()
    policy.router_net.eval()
    return stats


def _allocator_terms(
    policy: LearnedPolicy, b: dict[str, torch.Tensor], idx: torch.Tensor, imitation_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log-probability of the taken gate option and moves, their entropy, the imitation NLL or
    None) on minibatch `idx` of allocator batch `b`. A residual allocator imitates with its gate
    (its ticks carry a teacher base), a plain one with the teacher's moves."""
    out = policy.allocator_net(b["features"][idx])
    moves_lp, entropy = moves_log_prob(
        out, b["counts"][idx], b["free"][idx], b["low"][idx], b["high"][idx], b["moves"][idx]
    )
    gate_lp, gate_entropy = gate_log_prob(out.gate_logits, b["base"][idx])
    imitation: torch.Tensor | None = None
    has_teacher = b["has_teacher"][idx]
    teacher_base = b["teacher_base"][idx]
    if imitation_coef > 0 and bool((teacher_base >= 0).any()):
        labelled = teacher_base >= 0
        gate_teacher_lp, _ = gate_log_prob(out.gate_logits[labelled], teacher_base[labelled])
        imitation = -gate_teacher_lp.mean()
    elif imitation_coef > 0 and float(has_teacher.sum()) > 0:
        teacher_lp, _ = moves_log_prob(
            out, b["counts"][idx], b["free"][idx], b["low"][idx], b["high"][idx],
            b["teacher_moves"][idx],
        )  # fmt: skip
        imitation = -(teacher_lp * has_teacher).sum() / has_teacher.sum()
    return gate_lp + moves_lp, entropy + gate_entropy, imitation
