"""`minutes` bounds the whole training run, validation included: on a clock that advances one
second per episode (so the work done is the time spent), no run spends more than its budget,
and what the budget cut is said."""

from __future__ import annotations

from collections.abc import Sequence

from policies.learned.budget import Budget
from policies.learned.ppo import (
    Args,
    ForecastConfig,
    PPOConfig,
    TrainResult,
    ValidationConfig,
    train,
)
from policies.learned.rollout import RolloutResult, RolloutTask, map_serial
from policies.sim.scenario import parse_scenario
from tests.unit.test_learned_training import TINY


class EpisodeClock:
    """A clock that moves only by `per_episode_s` for every episode run through `map`."""

    def __init__(self, per_episode_s: float = 1.0) -> None:
        self.now_s = 0.0
        self.per_episode_s = per_episode_s
        self.batches: list[int] = []

    def __call__(self) -> float:
        return self.now_s

    def map(self, tasks: Sequence[RolloutTask]) -> list[RolloutResult]:
        results = map_serial(tasks)
        self.now_s += self.per_episode_s * len(tasks)
        self.batches.append(len(tasks))
        return results


def _train(budget_s: float, *, forecast: bool = True) -> tuple[TrainResult, EpisodeClock]:
    clock = EpisodeClock()
    args = Args(
        seed=0, minutes=budget_s / 60.0,
        forecast=ForecastConfig(enabled=forecast, episodes=2, steps=5),
        ppo=PPOConfig(inputs_per_iteration=1, replays=2, episode_s=(20.0, 30.0), update_epochs=1),
        validate=ValidationConfig(every=2, seeds=3),
    )  # fmt: skip
    result = train(args, [parse_scenario(TINY)], clock.map, clock=clock)
    return result, clock


def test_a_budget_that_holds_one_validation_seed_validates_on_that_seed_alone() -> None:
    """With room for one of three validation seeds (12 episodes each) the first validation runs
    that seed, says so, every later validation uses it, the last iteration is validated, and the
    run ends within its budget."""
    result, clock = _train(20.0)
    assert clock.now_s <= 20.0
    assert result.validation_seeds == [10_000]
    assert any("validation on 1 of 3 seeds" in note for note in result.notes)
    assert result.iterations >= 1
    assert result.evaluations[0].iteration == 0
    assert result.evaluations[-1].iteration == result.iterations
    assert result.best is not None


def test_iterations_stop_in_time_for_the_final_validation() -> None:
    """With the whole first validation paid for, iterations stop while a validation after the
    last one still fits: the last iteration is validated and the budget holds."""
    result, clock = _train(60.0)
    assert clock.now_s <= 60.0
    assert result.validation_seeds == [10_000, 10_001, 10_002]
    assert result.evaluations[-1].iteration == result.iterations >= 1
    assert any("stopped after" in note for note in result.notes)


def test_a_budget_too_short_for_any_validation_keeps_an_unvalidated_policy_and_says_so() -> None:
    """When the forecast's episodes leave less than one validation seed's episodes, the forecast
    fit stops short, nothing is validated (no best, a note saying so), and the budget holds."""
    result, clock = _train(10.0)
    assert clock.now_s <= 10.0
    assert result.best is None
    assert result.evaluations == []
    assert result.validation_seeds == []
    assert any("unvalidated" in note for note in result.notes)
    assert any("forecast fit cut short" in note for note in result.notes)


def test_the_budget_predicts_a_batch_from_the_episodes_it_has_metered() -> None:
    """Before any episode the budget affords any batch while time is left; after metering, a
    batch is afforded only when episodes x measured seconds per episode fit what is left."""
    clock = EpisodeClock(per_episode_s=2.0)
    budget = Budget(10.0, clock)
    assert budget.affords(1_000)
    metered = budget.meter(clock.map)
    metered([RolloutTask(parse_scenario(TINY), 0, heuristic="static", duration_s=10.0)])
    assert budget.episode_s() == 2.0
    assert budget.affords(4)
    assert not budget.affords(5)
    assert not budget.affords(4, also_s=0.5)
