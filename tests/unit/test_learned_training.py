"""Training pieces: the input-dependent baseline, scenario scaling, and a smoke run that learns."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import pytest
import torch
import typer

from policies.evaluation import guarded
from policies.learned.forecast import ForecasterConfig
from policies.learned.networks import AllocatorNetConfig, BaseSpec
from policies.learned.policy import LearnedPolicy
from policies.learned.ppo import (
    EVAL_SEED_BASE,
    RANDOM_START,
    Args,
    Evaluation,
    ForecastConfig,
    ImitationConfig,
    NetConfig,
    PPOConfig,
    ValidationConfig,
    choose_base_teachers,
    discounted_returns,
    evaluate,
    pretrain_gate,
    replay_advantages,
    train,
)
from policies.learned.rollout import (
    RolloutResult,
    RolloutTask,
    map_serial,
    run_rollout,
    scale_scenario,
)
from policies.registry import HEURISTIC_ALLOCATORS, make_allocator
from policies.seeds import EVAL_SEEDS, TRAIN_SEEDS
from policies.sim.scenario import Scenario, make_router_for, parse_scenario, prepare
from scheduler.commands.train import parse_base

TINY = {
    "name": "tiny",
    "queues": [
        {"name": "a", "job_types": ["a"], "service": {"kind": "exponential", "mean_s": 0.5},
         "model_load_s": 2.0},
        {"name": "b", "job_types": ["b"], "service": {"kind": "exponential", "mean_s": 0.5},
         "model_load_s": 2.0},
    ],
    "allocation": {"policy": "proportional", "tick_s": 1.0, "budget": 6},
    "workload": {"generators": [{"kind": "poisson", "rate_per_s": 6.0, "mix": {"a": 3, "b": 1}}]},
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


def test_scale_scenario_scales_a_trace_by_its_own_load_setting() -> None:
    """A trace's load is a multiplier or a target utilisation (never both): scaling multiplies
    whichever it has, and the result is still a valid scenario."""
    base = {
        "name": "replay",
        "queues": TINY["queues"],
        "allocation": {"policy": "proportional", "tick_s": 1.0, "budget": 4},
    }
    for trace, field, expected in (
        ({"format": "generic_csv", "target_utilization": 0.7}, "target_utilization", 0.84),
        ({"format": "generic_csv", "load_scale": 2.0}, "load_scale", 2.4),
        ({"format": "generic_csv"}, "load_scale", 1.2),
    ):
        scenario = parse_scenario({**base, "workload": {"trace": trace}})
        scaled = scale_scenario(scenario, load_scale=1.2).workload.trace
        assert scaled is not None
        assert getattr(scaled, field) == pytest.approx(expected)
        other = "load_scale" if field == "target_utilization" else "target_utilization"
        assert getattr(scaled, other) is None


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
        # A budget far beyond the work: the iterations, not the clock, end this run.
        seed=0, minutes=600.0, max_iterations=4,
        ppo=PPOConfig(inputs_per_iteration=2, replays=3, episode_s=(40.0, 60.0), update_epochs=2),
        validate=ValidationConfig(every=2, seeds=1),
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


def test_validation_seeds_are_disjoint_from_training_and_evaluation_seeds() -> None:
    assert TRAIN_SEEDS.stop <= EVAL_SEED_BASE
    assert EVAL_SEEDS.stop <= EVAL_SEED_BASE


def test_training_draws_arrival_seeds_from_the_training_range() -> None:
    args = Args(
        seed=0, minutes=600.0, max_iterations=2,
        ppo=PPOConfig(inputs_per_iteration=3, replays=2, episode_s=(20.0, 30.0), update_epochs=1),
        validate=ValidationConfig(every=10, seeds=1, random_starts=False),
    )  # fmt: skip
    result = train(args, [_tiny()], map_serial)
    assert result.train_seeds
    assert all(seed in TRAIN_SEEDS for seed in result.train_seeds)


def test_rollout_runs_a_heuristic_with_the_given_parameters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import policies.learned.rollout as rollout_module

    built: list[tuple[str, dict[str, Any]]] = []
    real = make_allocator

    def spy(name: str, **params: Any) -> Any:
        built.append((name, params))
        return real(name, **params)

    monkeypatch.setattr(rollout_module, "make_allocator", spy)
    run_rollout(RolloutTask(_tiny(), 3, heuristic="proportional"))
    run_rollout(RolloutTask(_tiny(), 3, heuristic="proportional", heuristic_params={"beta": 3.0}))
    assert built == [("proportional", {}), ("proportional", {"beta": 3.0})]


def test_validation_covers_random_starts_and_every_heuristic() -> None:
    policy = LearnedPolicy.create(seed=0)
    evaluation, heuristics = evaluate(
        policy, [_tiny()], [EVAL_SEED_BASE], map_serial, 0,
        heuristic_params={"tiny": {"proportional": {"beta": 3.0}}}, random_starts=True,
    )  # fmt: skip
    assert set(evaluation.mean_jct_s) == {"tiny", "tiny" + RANDOM_START}
    for cell in evaluation.mean_jct_s:
        assert set(evaluation.mean_jct_s[cell]) == {*HEURISTIC_ALLOCATORS, "learned"}
    assert set(heuristics) == set(evaluation.mean_jct_s)
    assert math.isfinite(evaluation.score)


def _evaluation(cells: dict[str, tuple[float, float]]) -> Evaluation:
    """Cells of (learned mean, learned p99) against one heuristic at mean 1.0, p99 10.0."""
    return Evaluation(
        iteration=0,
        mean_jct_s={c: {"learned": m, "h": 1.0} for c, (m, _) in cells.items()},
        p99_jct_s={c: {"learned": p, "h": 10.0} for c, (_, p) in cells.items()},
    )


def test_score_punishes_the_worst_scenario_and_p99_regressions() -> None:
    balanced = _evaluation({"a": (0.95, 10.0), "b": (0.95, 10.0)})
    lopsided = _evaluation({"a": (0.70, 10.0), "b": (1.20, 10.0)})
    # The lopsided policy has the lower geometric mean but loses one scenario by 20%.
    assert 0.70 * 1.20 < 0.95 * 0.95
    assert balanced.score < lopsided.score
    worse_tail = _evaluation({"a": (0.95, 13.0), "b": (0.95, 10.0)})
    assert worse_tail.badness("a") == pytest.approx(0.95 + 0.5 * 0.3)
    assert balanced.score < worse_tail.score
    assert _evaluation({"a": (1.0, 10.0)}).score == pytest.approx(1.0)


def test_moves_toward_a_target_respect_the_masks() -> None:
    from policies.learned.allocator import STOP, UNUSED, moves_toward

    counts = np.array([1, 4, 1])
    low = np.array([1, 1, 1])
    high = np.array([6, 6, 6])
    moves = moves_toward(counts, 1, np.array([3, 2, 2]), low, high, 3)
    # The pool first, then the queue most above its target; a queue that gave never receives.
    assert moves.tolist() == [[0, 3], [0, 1], [2, 1]]
    assert moves_toward(counts, 0, counts, low, high, 2).tolist() == [[STOP, 0], [UNUSED, UNUSED]]


def test_imitation_labels_every_decision_and_trains() -> None:
    policy = LearnedPolicy.create(seed=0)
    task = RolloutTask(
        _tiny(), 3, policy=policy, policy_seed=1, record=True, teacher="proportional"
    )
    result = run_rollout(task)
    assert len(result.teacher_moves) == len(result.decisions) > 0
    args = Args(
        seed=0, max_iterations=2,
        ppo=PPOConfig(inputs_per_iteration=2, replays=2, episode_s=(20.0, 30.0), update_epochs=1),
        validate=ValidationConfig(every=10, seeds=1),
        imitation=ImitationConfig(coef=1.0, fraction=1.0),
    )  # fmt: skip
    trained = train(args, [_tiny()], map_serial)
    assert set(trained.teachers) == {"tiny"}
    assert all(math.isfinite(m["losses/imitation_nll"]) for m in trained.history)


def test_residual_training_starts_from_its_base_heuristic() -> None:
    """A residual run's untrained policy validates as exactly its first base heuristic, and its
    updates (gate and moves) run with finite losses."""
    # Default parameters, as validation runs them without tuned values.
    bases: tuple[BaseSpec, ...] = (("switch_aware", {}), ("proportional", {}))
    args = Args(
        seed=0, max_iterations=2, net=NetConfig(bases=bases),
        ppo=PPOConfig(inputs_per_iteration=2, replays=3, episode_s=(40.0, 60.0), update_epochs=2),
        validate=ValidationConfig(every=10, seeds=1, random_starts=False, tuned_heuristics=False),
        forecast=ForecastConfig(enabled=False),
    )  # fmt: skip
    result = train(args, [_tiny()], map_serial)
    first = result.evaluations[0].mean_jct_s["tiny"]
    assert first["learned"] == first["switch_aware"] != first["proportional"]
    assert result.policy.allocator_net.config.bases == bases
    assert all(math.isfinite(m["losses/allocator_policy_loss"]) for m in result.history)


def test_train_cli_parses_base_heuristics_and_refuses_bad_ones() -> None:
    """`--base NAME:K=V,K=V` gives (name, float parameters); a bad name or parameter fails early."""
    assert parse_base("switch_aware:horizon_s=80,min_net_gain_job_s=50") == (
        "switch_aware",
        {"horizon_s": 80.0, "min_net_gain_job_s": 50.0},
    )
    assert parse_base("proportional") == ("proportional", {})
    for bad in (
        "nonsense", "target_ongoing", "proportional:beta=x", "proportional:gamma=1",
        "proportional:beta=-1",
    ):  # fmt: skip
        with pytest.raises(typer.Exit):
            parse_base(bad)


def test_residual_imitation_teaches_the_gate_the_best_base_on_training_seeds() -> None:
    """With bases, imitation labels each scenario with its best base (on the tuning seeds) and
    trains the gate toward it: the gate's log-probability of the teacher goes up."""
    bases: tuple[BaseSpec, ...] = (("static", {}), ("proportional", {"beta": 1.0}))
    teachers = choose_base_teachers([_tiny()], bases, map_serial)
    assert set(teachers) == {"tiny"}
    args = Args(
        seed=0, max_iterations=3, net=NetConfig(bases=bases),
        ppo=PPOConfig(
            inputs_per_iteration=2, replays=2, episode_s=(20.0, 30.0), update_epochs=2,
            learning_rate=3e-3,
        ),
        validate=ValidationConfig(every=10, seeds=1, random_starts=False),
        imitation=ImitationConfig(coef=5.0, fraction=1.0),
    )  # fmt: skip
    result = train(args, [_tiny()], map_serial)
    assert result.base_teachers == teachers
    nll = [m["losses/imitation_nll"] for m in result.history]
    assert nll[-1] < nll[0]


def test_teachers_are_chosen_from_the_start_and_from_random_splits() -> None:
    """Every other teacher seed starts from a random split of the workers, seeded by the seed, so
    a teacher must also recover from a poor allocation; the others start as the scenario does."""
    seen: list[RolloutTask] = []

    def recording(tasks: Sequence[RolloutTask]) -> list[RolloutResult]:
        seen.extend(tasks)
        return map_serial(tasks)

    bases: tuple[BaseSpec, ...] = (("static", {}), ("proportional", {"beta": 1.0}))
    choose_base_teachers([_tiny()], bases, recording, None, (0, 1, 2, 3))
    starts = {(t.heuristic, t.arrival_seed): t.initial_seed for t in seen}
    assert len(seen) == 8
    assert starts[("static", 0)] is None
    assert starts[("static", 1)] == 1
    assert starts[("proportional", 2)] is None
    assert starts[("proportional", 3)] == 3


def test_gate_warm_start_separates_scenarios_with_different_teachers() -> None:
    """Balanced supervised steps teach the gate a different base per scenario, read from the
    view alone: afterwards the deterministic policy picks each scenario's teacher every tick."""
    slow = parse_scenario(
        {**TINY, "name": "tiny_slow",
         "allocation": {**cast(dict[str, Any], TINY["allocation"]), "tick_s": 4.0},
         "queues": [{**q, "model_load_s": 30.0} for q in cast(list[dict[str, Any]], TINY["queues"])]}
    )  # fmt: skip
    scenarios = [_tiny(), slow]
    bases: tuple[BaseSpec, ...] = (("static", {}), ("proportional", {"beta": 1.0}))
    policy = LearnedPolicy.create(AllocatorNetConfig.residual(bases), seed=0)
    teachers = {"tiny": 1, "tiny_slow": 0}
    nll = pretrain_gate(
        policy, scenarios, teachers, map_serial, np.random.default_rng(0),
        steps=150, learning_rate=3e-3, episode_s=40.0,
    )  # fmt: skip
    assert nll < 0.1
    for scenario in scenarios:
        result = run_rollout(RolloutTask(scenario, 7, policy=policy, record=True))
        assert {d.base for d in result.decisions} == {teachers[scenario.name]}


def test_training_fits_the_forecast_first_and_scores_bases_on_it() -> None:
    """With a forecaster, training fits it before anything else (its error on the recorded data
    drops below "the current rate holds"), and each scenario's teacher base is chosen by running
    the policy's own forecast-fed bases: the pick is the base of lowest mean JCT among runs of
    the policy forced to each base, the second seed's from a random split of the workers."""
    bases: tuple[BaseSpec, ...] = (("static", {}), ("switch_aware", {}))
    args = Args(
        seed=0, max_iterations=1, net=NetConfig(bases=bases),
        ppo=PPOConfig(inputs_per_iteration=1, replays=2, episode_s=(40.0, 60.0), update_epochs=1),
        validate=ValidationConfig(every=10, seeds=1, random_starts=False),
        imitation=ImitationConfig(coef=1.0, teacher_seeds=2, gate_pretrain_steps=5),
        forecast=ForecastConfig(episodes=2, steps=200),
    )  # fmt: skip
    result = train(args, [_tiny()], map_serial)
    fit = result.forecast_fit
    assert fit is not None
    assert fit.samples > 0
    assert fit.fitted_mse < fit.current_rate_mse
    policy = result.policy
    assert policy.forecaster_net is not None
    forced = [
        np.mean([
            run_rollout(
                RolloutTask(_tiny(), seed, policy=policy, force_base=k, initial_seed=start)
            ).mean_jct_s
            for seed, start in ((0, None), (1, 1))
        ])
        for k in range(len(bases))
    ]  # fmt: skip
    assert choose_base_teachers([_tiny()], bases, map_serial, None, (0, 1), policy) == {
        "tiny": int(np.argmin(forced))
    }


def test_router_alone_trains_the_router_and_leaves_the_allocator_as_it_was() -> None:
    """train_allocator=False (the alternating step): only the router is updated (router losses,
    no allocator losses), the kept policy's allocator and forecaster weights are the initial ones
    bit for bit, and without a routing choice it is refused."""
    twins = parse_scenario(
        {
            **TINY,
            "name": "twins",
            "queues": [{**q, "job_types": ["a", "b"]} for q in TINY["queues"]],
        }
    )
    start = LearnedPolicy.create(forecaster_config=ForecasterConfig(), seed=3)
    args = Args(
        seed=0, max_iterations=2,
        ppo=PPOConfig(
            inputs_per_iteration=2, replays=2, episode_s=(30.0, 40.0), update_epochs=2,
            train_allocator=False, learning_rate=3e-3,
        ),
        validate=ValidationConfig(every=10, seeds=1, random_starts=False),
    )  # fmt: skip
    result = train(args, [twins], map_serial, initial=start)
    before, after = start.state_dict(), result.policy.state_dict()
    assert result.history
    assert all(math.isfinite(m["losses/router_policy_loss"]) for m in result.history)
    assert "losses/allocator_policy_loss" not in result.history[-1]
    assert any(k.startswith("forecaster.") for k in before)
    for key, value in before.items():
        if not key.startswith("router."):
            assert torch.equal(value, after[key]), key
    with pytest.raises(ValueError, match="two or more eligible queues"):
        train(args, [_tiny()], map_serial, initial=start)


def test_slo_misses_are_charged_to_the_tick_the_target_passed() -> None:
    """Each job whose time in system passes its target counts once, in the tick interval where
    arrival + target falls (finished or not); the counts match the run's own SLO attainment, and
    the penalty lowers exactly the returns that cover those ticks."""
    scenario = parse_scenario(
        {**TINY, "queues": [{**q, "slo_s": 0.6} for q in TINY["queues"]],
         "allocation": {**cast(dict[str, Any], TINY["allocation"]), "budget": 3}}
    )  # fmt: skip
    result = run_rollout(RolloutTask(scenario, 5, heuristic="static"))
    assert len(result.slo_misses) == len(result.rewards)
    prepared_jobs = result.jobs + result.unfinished
    record = (
        prepare(scenario, 5)
        .start(make_router_for(scenario))
        .run(guarded(scenario, make_allocator("static")))
    )
    jct = record.completion_s - record.arrival_s
    late = np.count_nonzero(jct > 0.6) + np.count_nonzero(np.isnan(record.completion_s))
    assert int(result.slo_misses.sum()) == late > 0
    assert prepared_jobs == len(record.arrival_s)
    plain = replay_advantages([result, result], gamma=1.0)
    charged = replay_advantages([result, result], gamma=1.0, slo_penalty_s=3.0)
    # Identical replays: the baseline absorbs any penalty, so the advantages stay zero ...
    assert np.allclose(plain[0], 0.0)
    assert np.allclose(charged[0], 0.0)
    # ... and against a replay without misses the charged one is worse by the penalty to go.
    clean = RolloutResult(
        scenario=result.scenario, arrival_seed=5, group=0, rewards=result.rewards,
        moved=result.moved, slo_misses=np.zeros_like(result.slo_misses),
    )  # fmt: skip
    adv = replay_advantages([result, clean], gamma=1.0, slo_penalty_s=3.0)
    to_go = 3.0 * np.cumsum(result.slo_misses[::-1])[::-1]
    scale = np.abs(result.rewards).mean()
    np.testing.assert_allclose((adv[1] - adv[0]) * scale, to_go)


def test_args_refuse_values_that_would_train_nothing_naming_the_field() -> None:
    for make, needle in (
        (lambda: PPOConfig(slo_penalty_s=-1.0), r"ppo\.slo_penalty_s \(--slo-penalty-s\)"),
        (lambda: PPOConfig(replays=0), r"ppo\.replays \(--replays\)"),
        (lambda: PPOConfig(learning_rate=0.0), "learning_rate"),
        (lambda: PPOConfig(episode_s=(900.0, 300.0)), "episode_s"),
        (lambda: PPOConfig(load_scale=(0.0, 1.0)), "load_scale"),
        (lambda: Args(minutes=math.nan), "minutes"),
        (lambda: ForecastConfig(window_loads=-2.0), r"--forecast-window-loads"),
        (lambda: ValidationConfig(every=0), r"validate\.every \(--eval-every\)"),
        (lambda: NetConfig(target_head=True), "target_head"),
        (lambda: Args(ppo=PPOConfig(train_allocator=False, train_router=False)), "nothing"),
    ):
        with pytest.raises(ValueError, match=needle):
            make()
