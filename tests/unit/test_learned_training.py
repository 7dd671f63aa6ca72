"""Training pieces: the input-dependent baseline, scenario scaling, and a smoke run that learns."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policies.learned.policy import LearnedPolicy
from policies.learned.ppo import Args, discounted_returns, replay_advantages, train
from policies.learned.rollout import (
    RolloutResult,
    RolloutTask,
    map_serial,
    run_rollout,
    scale_scenario,
)
from policies.sim.scenario import Scenario, parse_scenario

TINY = {
    "name": "tiny",
    "queues": [
        {"name": "a", "job_types": ["a"], "service": {"kind": "exponential", "mean_s": 0.5},
         "model_load_s": 2.0},
        {"name": "b", "job_types": ["b"], "service": {"kind": "exponential", "mean_s": 0.5},
         "model_load_s": 2.0},
    ],
    "cluster": {"workers": 6},
    "workload": {"generators": [{"kind": "poisson", "rate_per_s": 6.0, "mix": {"a": 3, "b": 1}}]},
    "tick_s": 1.0,
    "duration_s": 60.0,
}  # fmt: skip


def _tiny() -> Scenario:
    return parse_scenario(TINY)


def _result(group: int, rewards: list[float]) -> RolloutResult:
    return RolloutResult(
        scenario="s", arrival_seed=0, group=group, rewards=np.array(rewards),
        moved=np.zeros(len(rewards), dtype=np.int64),
    )  # fmt: skip


def test_discounted_returns_run_backwards() -> None:
    assert discounted_returns(np.array([1.0, 1.0, 1.0]), 0.5).tolist() == [1.75, 1.5, 1.0]


def test_replay_baseline_is_the_mean_over_replays_of_the_same_input() -> None:
    """Advantages of replays of one input sum to zero at every tick (ended replays count as 0)."""
    results = [_result(0, [-1.0, -1.0, -1.0]), _result(0, [-3.0, -1.0]), _result(1, [-5.0])]
    adv = replay_advantages(results, gamma=1.0)
    assert adv[0][0] + adv[1][0] == pytest.approx(0.0)
    assert adv[0][1] + adv[1][1] == pytest.approx(0.0)
    assert adv[0][0] > 0 > adv[1][0]  # the replay with less time in system is better
    assert adv[2].tolist() == [0.0]  # a lone replay has nothing to be compared with


def test_scale_scenario_scales_rates_and_length() -> None:
    scaled = scale_scenario(_tiny(), load_scale=1.5, duration_s=30.0)
    generator = scaled.workload.generators[0]
    assert getattr(generator, "rate_per_s") == pytest.approx(9.0)  # noqa: B009
    assert scaled.duration_s == 30.0


def test_rollout_rewards_sum_to_minus_time_in_system() -> None:
    """Tick rewards add up to minus the jobs' total time in system after the first tick."""
    result = run_rollout(RolloutTask(_tiny(), 3, heuristic="proportional"))
    total_jct_s = result.mean_jct_s * result.jobs
    assert -result.rewards.sum() <= total_jct_s + 1e-6
    assert -result.rewards.sum() > 0.8 * total_jct_s


def _mean_jct(policy: LearnedPolicy, seeds: list[int], policy_seed: int | None) -> float:
    tasks = [RolloutTask(_tiny(), s, policy=policy, policy_seed=policy_seed) for s in seeds]
    return float(np.mean([r.mean_jct_s for r in map_serial(tasks)]))


def test_smoke_training_beats_a_random_policy() -> None:
    """A few serial iterations on a tiny scenario give a policy better than random moves."""
    args = Args(
        seed=0, minutes=10.0, max_iterations=4, inputs_per_iteration=2, replays=3,
        episode_s=(40.0, 60.0), eval_every=2, eval_seeds=1, update_epochs=2,
    )  # fmt: skip
    result = train(args, [_tiny()], map_serial)
    assert result.iterations == 4
    assert len(result.history) == 4
    for metrics in result.history:
        assert math.isfinite(metrics["losses/allocator_policy_loss"])
        assert "charts/episodic_mean_jct_s" in metrics
    assert result.best is not None
    held_out = [20_000, 20_001]
    random_policy = LearnedPolicy.create(seed=0)
    trained = _mean_jct(result.policy, held_out, policy_seed=None)
    random_jct = _mean_jct(random_policy, held_out, policy_seed=7)
    assert trained < random_jct
