"""Training's Ray executor: rollouts run as Ray tasks and come back in order, equal to serial ones."""

from __future__ import annotations

import pytest

from policies.evaluation import TraceInput
from policies.learned.policy import LearnedPolicy
from policies.learned.ppo import Args, PPOConfig, ValidationConfig, train
from policies.learned.rollout import RolloutTask, map_serial
from policies.sim.scenario import parse_scenario
from scheduler.training import RayRollouts

SCENARIO = {
    "name": "ray_tiny",
    "queues": [
        {"name": n, "job_types": [n], "service": {"kind": "exponential", "mean_s": 0.5},
         "model_load_s": 2.0}
        for n in "ab"
    ],
    "allocation": {"policy": "proportional", "tick_s": 1.0, "budget": 4},
    "workload": {"generators": [{"kind": "poisson", "rate_per_s": 4.0, "mix": {"a": 1, "b": 1}}]},
    "duration_s": 30.0,
}  # fmt: skip


@pytest.mark.usefixtures("ray_local")
def test_ray_rollouts_match_serial_and_drive_training() -> None:
    """Same tasks, same results through Ray as in-process; a two-iteration run completes on Ray."""
    scenario = parse_scenario(SCENARIO)
    policy = LearnedPolicy.create(seed=1)
    tasks = [
        RolloutTask(scenario, seed, policy=policy, policy_seed=seed, record=True)
        for seed in range(3)
    ]
    remote = RayRollouts()
    on_ray = remote(tasks)
    local = map_serial(tasks)
    assert [r.arrival_seed for r in on_ray] == [0, 1, 2]
    for a, b in zip(on_ray, local, strict=True):
        assert a.rewards.tolist() == b.rewards.tolist()
        assert [d.log_prob for d in a.decisions] == pytest.approx([d.log_prob for d in b.decisions])
    args = Args(
        max_iterations=2,
        ppo=PPOConfig(inputs_per_iteration=1, replays=2, episode_s=(20.0, 30.0), update_epochs=1),
        validate=ValidationConfig(every=10, seeds=1),
    )  # fmt: skip
    result = train(args, [scenario], remote)
    assert result.iterations == 2


@pytest.mark.usefixtures("ray_local")
def test_ray_rollouts_ship_a_trace_once_and_replay_it_like_serial() -> None:
    """Tasks of a trace scenario run on Ray with the trace passed by reference (put once), and
    give the same episodes as in-process."""
    scenario = parse_scenario(
        {**SCENARIO, "name": "ray_trace", "duration_s": None,
         "workload": {"trace": {"format": "generic_csv"}}}
    )  # fmt: skip
    lines = ["arrival_s,job_type\n"] + [f"{i * 0.2:.1f},{'ab'[i % 2]}\n" for i in range(200)]
    trace = TraceInput(lines=tuple(lines), source="inline")
    policy = LearnedPolicy.create(seed=2)
    tasks = [RolloutTask(scenario, seed, policy=policy, trace=trace) for seed in range(3)]
    remote = RayRollouts()
    on_ray = remote(tasks)
    assert len(remote._traces) == 1
    local = map_serial(tasks)
    assert [r.jobs for r in on_ray] == [r.jobs for r in local]
    assert all(r.jobs > 0 for r in on_ray)
    for a, b in zip(on_ray, local, strict=True):
        assert a.rewards.tolist() == b.rewards.tolist()
