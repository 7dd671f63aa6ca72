"""The Gymnasium environment: API conformance, seeding, padding, and rewards that add up to -total JCT."""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from policies.env import ENV_ID, AllocationEnv, allocation_to_action
from policies.evaluation import guarded, outcome_of
from policies.features import N_QUEUE_FEATURES
from policies.registry import make_allocator
from policies.sim.metrics import summarize
from policies.sim.scenario import make_router_for, parse_scenario, prepare

TINY = """
name: tiny
queues:
  - {name: a, job_types: [a], service: {kind: exponential, mean_s: 0.5}, model_load_s: 2.0,
     slo_s: 1.5}
  - {name: b, job_types: [b], service: {kind: lognormal, mean_s: 0.5, cv: 1.0}, model_load_s: 2.0}
allocation: {policy: proportional, tick_s: 1.0, budget: 6}
workload:
  generators: [{kind: poisson, rate_per_s: 6.0, mix: {a: 2, b: 1}}]
duration_s: 40.0
"""


def _rollout(env: gym.Env[Any, Any], seed: int, steps: int = 1000) -> tuple[list[Any], list[float]]:
    """Observations and rewards under a fixed pseudo-random action sequence."""
    actions = np.random.default_rng(0).uniform(-1, 1, size=(steps, env.action_space.shape[0]))
    obs, _ = env.reset(seed=seed)
    observations, rewards = [obs], []
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action.astype(np.float32))
        observations.append(obs)
        rewards.append(float(reward))
        if terminated or truncated:
            break
    return observations, rewards


def test_passes_gymnasium_env_checker_without_warnings() -> None:
    """gymnasium.make builds the registered env, and check_env passes it with no warning at all."""
    env = gym.make(ENV_ID, scenario=TINY, n_max_queues=4, slo_miss_penalty_job_s=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)


def test_same_reset_seed_same_episode() -> None:
    """reset(seed) fixes arrivals and dynamics: same seed and actions, same observations and
    rewards; another seed gives another episode."""
    env = AllocationEnv(TINY)
    obs_1, rew_1 = _rollout(env, seed=7)
    obs_2, rew_2 = _rollout(env, seed=7)
    assert rew_1 == rew_2
    assert len(obs_1) == len(obs_2)
    for a, b in zip(obs_1, obs_2, strict=True):
        np.testing.assert_array_equal(a["features"], b["features"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    _, rew_3 = _rollout(env, seed=8)
    assert rew_3 != rew_1


def test_padding_and_mask_with_fewer_queues_than_n_max() -> None:
    """Rows past the real queues are zero and masked out, and their actions change nothing."""
    env = AllocationEnv(TINY, n_max_queues=5)
    obs, _ = env.reset(seed=1)
    assert obs["features"].shape == (5, N_QUEUE_FEATURES)
    assert obs["mask"].tolist() == [1, 1, 0, 0, 0]
    assert not obs["features"][2:].any()
    assert obs["features"][:2].any()
    assert env.observation_space.contains(obs)

    def episode_return(padding_value: float) -> float:
        env.reset(seed=1)
        action = np.array([0.5, -0.2, *[padding_value] * 3], dtype=np.float32)
        total = 0.0
        while True:
            _, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            if terminated or truncated:
                return total

    assert episode_return(-1.0) == episode_return(1.0)


def test_too_few_rows_for_the_scenario_is_refused() -> None:
    """n_max_queues below the scenario's queue count is a clear error."""
    with pytest.raises(ValueError, match="n_max_queues"):
        AllocationEnv(TINY, n_max_queues=1)


def test_return_is_minus_total_time_in_system_and_heuristics_replay_exactly() -> None:
    """Driving the env with a heuristic's allocations reproduces the plain simulator run, and the
    episode's return is minus the time integral of jobs in system (= -total JCT)."""
    scenario = parse_scenario(TINY)
    env = AllocationEnv(scenario)
    env.reset(options={"scenario_seed": 3})
    heuristic = make_allocator("proportional", beta=1.0)
    total = 0.0
    names = [q.name for q in scenario.queues]
    while True:
        run = env.run
        assert run is not None
        target = heuristic.allocate(run.view())
        _, reward, terminated, truncated, _ = env.step(
            allocation_to_action(target, names, env.n_max_queues)
        )
        total += float(reward)
        if terminated or truncated:
            break
    assert terminated
    assert env.run is not None
    record = env.run.record()
    assert total == pytest.approx(-record.area_job_s, rel=1e-12)

    prepared = prepare(scenario, 3)
    direct = prepared.start(make_router_for(scenario)).run(
        guarded(scenario, make_allocator("proportional", beta=1.0))
    )
    assert outcome_of(record).mean_jct_s == outcome_of(direct).mean_jct_s
    assert record.reconfigurations == direct.reconfigurations


def test_truncated_after_max_ticks() -> None:
    """max_ticks truncates (not terminates) the episode."""
    env = AllocationEnv(TINY, max_ticks=3)
    env.reset(seed=0)
    flags = [env.step(env.action_space.sample())[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]


def test_slo_and_reconfiguration_penalties() -> None:
    """The SLO penalty counts exactly the jobs that missed their JCT target; the reconfiguration
    penalty is charged per worker moved."""
    scenario = parse_scenario(TINY)
    penalty = AllocationEnv(
        scenario, slo_miss_penalty_job_s=10.0, reconfiguration_penalty_job_s=3.0
    )
    plain = AllocationEnv(scenario)
    # Alternating extremes force moves and misses.
    actions = [np.array([1.0, -0.8]), np.array([-0.8, 1.0])]
    misses = moves = 0
    diff = 0.0
    penalty.reset(options={"scenario_seed": 5})
    plain.reset(options={"scenario_seed": 5})
    for i in range(1000):
        action = actions[(i // 5) % 2].astype(np.float32)
        _, r_pen, term, trunc, info = penalty.step(action)
        _, r_plain, *_ = plain.step(action)
        diff += float(r_plain) - float(r_pen)
        misses += info["slo_misses"]
        moves += info["moved_workers"]
        if term or trunc:
            break
    assert misses > 0
    assert moves > 0
    assert diff == pytest.approx(10.0 * misses + 3.0 * moves)
    assert penalty.run is not None
    record = penalty.run.record()
    jct_s = record.completion_s - record.arrival_s
    in_a = record.queue_idx == 0  # only queue a has an SLO (1.5 s)
    assert int(np.count_nonzero(in_a & ~(jct_s <= 1.5))) == misses
    assert summarize(record).in_system == 0


def test_trace_scenario_replays_its_training_window() -> None:
    """A trace episode sees only the first 60% of the trace (the rest is held out)."""
    text = """
name: t
queues: [{name: q, job_types: [x], service: {kind: constant, mean_s: 0.2}}]
allocation: {policy: proportional, budget: 2}
workload: {trace: {format: generic_csv}}
"""
    lines = ["arrival_s,job_type\n"] + [f"{i},x\n" for i in range(101)]
    env = AllocationEnv(text, trace_lines=lines)
    env.reset(seed=0)
    assert env.run is not None
    arrival_s = env.run.jobs.arrivals.arrival_s
    assert len(arrival_s) == 60
    assert arrival_s.max() < 60.0
    with pytest.raises(ValueError, match="trace_lines"):
        AllocationEnv(text)
