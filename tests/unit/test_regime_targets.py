"""Regime tables, their search, and the allocator's target head that imitates them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from policies.features import N_QUEUE_FEATURES
from policies.learned.networks import AllocatorNetConfig, BaseSpec, QueueSetNetNp, TargetShareNet
from policies.learned.policy import LearnedPolicy
from policies.learned.ppo import (
    Args,
    ForecastConfig,
    ImitationConfig,
    NetConfig,
    PPOConfig,
    RegimeConfig,
    ValidationConfig,
    train,
)
from policies.learned.regime_search import bursty_queues, initial_table, search_regime_table
from policies.learned.rollout import RolloutTask, map_serial, run_rollout
from policies.learned.target_distill import distill_targets
from policies.regime import (
    N_REGIME_FEATURES,
    RegimeTargetsAllocator,
    SlowRates,
    cut_largest,
    hold_targets,
    stability_floor,
    with_floor,
)
from policies.registry import HEURISTIC_ALLOCATORS, make_allocator
from policies.sim.scenario import parse_scenario
from policies.views import ClusterView, QueueView
from scheduler.checkpoints import load_checkpoint, save_checkpoint

# Queue a bursts (MMPP, 1 or 12 jobs/s), b is steady, and both c and d serve a routed job type.
BURSTY: dict[str, Any] = {
    "name": "bursty_tiny",
    "queues": [
        {"name": "a", "job_types": ["a"], "service": {"kind": "exponential", "mean_s": 0.5},
         "model_load_s": 4.0},
        {"name": "b", "job_types": ["b"], "service": {"kind": "exponential", "mean_s": 0.5},
         "model_load_s": 4.0},
    ],
    "allocation": {"policy": "proportional", "tick_s": 1.0, "budget": 8},
    "workload": {"generators": [
        {"kind": "mmpp", "mix": {"a": 1}, "states": [
            {"rate_per_s": 1.0, "mean_sojourn_s": 30.0}, {"rate_per_s": 12.0, "mean_sojourn_s": 15.0}]},
        {"kind": "poisson", "rate_per_s": 3.0, "mix": {"b": 1}},
    ]},
    "duration_s": 120.0,
}  # fmt: skip
STEADY: dict[str, Any] = {
    **BURSTY,
    "name": "steady_tiny",
    "workload": {"generators": [{"kind": "poisson", "rate_per_s": 6.0, "mix": {"a": 1, "b": 1}}]},
}
_BASES: tuple[BaseSpec, ...] = (("proportional", {"beta": 1.0}), ("static", {}))


def _queue(name: str, rate: float, depth: int = 0, allocated: int = 2) -> QueueView:
    return QueueView(
        name=name, job_types=frozenset({name}), depth=depth, backlog_s=0.0, oldest_wait_s=0.0,
        arrival_rate_per_s=rate, service_time_s=0.5, workers_ready=allocated, workers_busy=0,
        workers_loading=0, model_load_s=4.0, slo_s=None,
    )  # fmt: skip


def _view(now_s: float, rates: dict[str, float], budget: int = 8, **depth: int) -> ClusterView:
    queues = tuple(_queue(n, r, depth.get(n, 0)) for n, r in rates.items())
    return ClusterView(now_s=now_s, tick_s=1.0, budget=budget, queues=queues)


def _table() -> list[dict[str, float]]:
    return [{"a": 2.0, "b": 6.0}, {"a": 6.0, "b": 2.0}]


# --- the regime allocator ---------------------------------------------------------------------------


def test_hold_rule_keeps_a_backlogged_donor_and_trims_the_receivers() -> None:
    """A queue above its target with more than `hold` jobs per worker keeps its workers; the
    queues the targets would grow give way, largest growth first, and nothing passes the budget."""
    current = np.array([6, 1, 1])
    targets = np.array([2, 4, 2])
    assert hold_targets(current, targets, np.array([0, 0, 0]), 2.0).tolist() == [2, 4, 2]
    held = hold_targets(current, targets, np.array([13, 0, 0]), 2.0)
    assert held.tolist() == [6, 1, 1]
    assert held.sum() <= targets.sum()
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 6))
        cur = rng.integers(0, 6, n)
        tgt = np.bincount(rng.integers(0, n, int(cur.sum()) + int(rng.integers(0, 3))), minlength=n)
        out = hold_targets(cur, tgt, rng.integers(0, 40, n), 2.0)
        assert out.sum() <= tgt.sum()
        assert (out >= 0).all()
        # A queue the targets grow never ends below where it was, nor one they shrink above.
        assert (out[tgt >= cur] >= cur[tgt >= cur]).all()
        assert (out[tgt < cur] <= cur[tgt < cur]).all()


def _cut_one_at_a_time(amounts: np.ndarray, excess: int) -> np.ndarray:
    left = amounts.copy()
    for _ in range(excess):
        j = int(np.argmax(left))
        if left[j] <= 0:
            break
        left[j] -= 1
    taken: np.ndarray = amounts - left
    return taken


def test_cut_largest_is_the_one_at_a_time_greedy_computed_at_once() -> None:
    rng = np.random.default_rng(1)
    for _ in range(2000):
        amounts = rng.integers(0, 9, int(rng.integers(1, 10)))
        excess = int(rng.integers(0, int(amounts.sum()) + 3))
        assert cut_largest(amounts, excess).tolist() == _cut_one_at_a_time(amounts, excess).tolist()


def test_stability_floor_keeps_every_loaded_queue_ahead_of_its_load() -> None:
    """floor(load) + 1 workers for a queue with load, none without; scaled into the budget; and
    raising targets to it takes the workers from the queues furthest above their floor."""
    assert stability_floor(np.array([0.0, 2.0, 2.5, 0.2]), 20).tolist() == [0, 3, 3, 1]
    squeezed = stability_floor(np.array([5.0, 5.0]), 6)
    assert squeezed.sum() == 6
    assert with_floor(np.array([6, 1, 1]), np.array([1, 3, 1])).tolist() == [4, 3, 1]
    assert with_floor(np.array([2, 2, 4]), np.array([1, 1, 1])).tolist() == [2, 2, 4]


def test_regime_allocator_never_leaves_a_loaded_queue_below_its_floor() -> None:
    """A row that gives b nothing still leaves it floor(0.5 s * 3/s) + 1 = 2 workers."""
    allocator = RegimeTargetsAllocator(["a"], [{"a": 1.0}, {"a": 1.0}])
    out = allocator.allocate(_view(0.0, {"a": 2.0, "b": 3.0}))
    assert out == {"a": 6, "b": 2}
    bare = RegimeTargetsAllocator(["a"], [{"a": 1.0}, {"a": 1.0}], floor=False)
    assert bare.allocate(_view(0.0, {"a": 2.0, "b": 3.0})) == {"a": 8, "b": 0}


def test_slow_average_does_not_depend_on_the_tick_length() -> None:
    """The same rate history read every second or every 10 s gives the same slow average."""
    fine, coarse = SlowRates(60.0), SlowRates(60.0)
    fine.update(_view(0.0, {"a": 1.0}))
    coarse.update(_view(0.0, {"a": 1.0}))
    for t in range(1, 101):
        _, slow_fine = fine.update(_view(float(t), {"a": 5.0}))
        if t % 10 == 0:
            _, slow_coarse = coarse.update(_view(float(t), {"a": 5.0}))
    assert slow_fine[0] == pytest.approx(slow_coarse[0], rel=1e-9)
    assert slow_fine[0] == pytest.approx(5.0 - 4.0 * np.exp(-100 / 60), rel=1e-9)


def test_regime_allocator_switches_rows_when_a_tracked_queue_bursts() -> None:
    """Calm: the first row; once a's rate passes 1.5x its slow average: the second row."""
    allocator = RegimeTargetsAllocator(["a"], _table(), slow_s=600.0)
    assert allocator.allocate(_view(0.0, {"a": 2.0, "b": 2.0})) == {"a": 2, "b": 6}
    assert allocator.allocate(_view(1.0, {"a": 2.5, "b": 2.0})) == {"a": 2, "b": 6}
    assert allocator.allocate(_view(2.0, {"a": 9.0, "b": 2.0})) == {"a": 6, "b": 2}
    assert allocator.last_targets is not None
    assert allocator.last_targets.tolist() == [6, 2]
    # b is backlogged (40 waiting for 2 workers) in a later calm tick: the rule keeps it as is.
    back = RegimeTargetsAllocator(["a"], _table(), slow_s=600.0)
    back.allocate(_view(0.0, {"a": 2.0, "b": 2.0}))
    out = back.allocate(_view(1.0, {"a": 9.0, "b": 2.0}, b=40))
    assert out["b"] == 2
    assert sum(out.values()) <= 8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tracked": ["a", "a"], "table": _table() * 2}, "distinct"),
        ({"tracked": ["a"], "table": _table()[:1]}, "2 rows"),
        ({"tracked": ["a"], "table": [{"a": -1.0}, {"a": 1.0}]}, "row 0"),
        ({"tracked": ["a"], "table": [{"a": 0.0}, {"a": 1.0}]}, "row 0"),
        ({"tracked": ["a"], "table": _table(), "threshold": 0.5}, "threshold"),
        ({"tracked": ["a"], "table": _table(), "slow_s": 0.0}, "slow_s"),
    ],
)
def test_regime_allocator_refuses_bad_tables_naming_the_problem(
    kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        RegimeTargetsAllocator(**kwargs)


def test_regime_allocator_is_built_by_name_but_not_compared_as_a_heuristic() -> None:
    allocator = make_allocator("regime_targets", tracked=["a"], table=_table())
    assert allocator.name == "regime_targets"
    assert "regime_targets" not in HEURISTIC_ALLOCATORS


# --- the search -------------------------------------------------------------------------------------


def test_bursty_queues_come_from_markov_modulated_generators_only() -> None:
    """a is fed by an MMPP whose fast state is 12x its slow one; b by a Poisson stream; a job
    type two queues serve is routed load, which a regime of one queue cannot describe."""
    found = bursty_queues(parse_scenario(BURSTY))
    assert [b.name for b in found] == ["a"]
    assert found[0].burst_rate_per_s == pytest.approx(12.0)
    assert found[0].calm_rate_per_s == pytest.approx(1.0)
    assert bursty_queues(parse_scenario(STEADY)) == []
    routed = {
        **BURSTY,
        "queues": [{**q, "job_types": ["a", "b"]} for q in BURSTY["queues"]],
    }
    assert bursty_queues(parse_scenario(routed)) == []
    with pytest.raises(ValueError, match="max_tracked"):
        bursty_queues(parse_scenario(BURSTY), max_tracked=9)


def test_initial_table_staffs_each_regime_for_its_own_load() -> None:
    rows = initial_table(parse_scenario(BURSTY), bursty_queues(parse_scenario(BURSTY)))
    assert len(rows) == 2
    assert all(sum(r.values()) == 8 for r in rows)
    assert rows[1]["a"] > rows[0]["a"]  # the burst row gives the bursting queue more


def test_search_improves_on_its_start_and_skips_scenarios_without_bursts() -> None:
    scenario = parse_scenario(BURSTY)
    found = search_regime_table(scenario, map_serial, seeds=(0, 1, 2, 3), max_rounds=2)
    assert found is not None
    assert found.mean_jct_s <= found.initial_mean_jct_s
    assert found.rounds <= 2
    assert found.episodes >= 4
    allocator = make_allocator("regime_targets", **found.params)  # a valid table
    assert isinstance(allocator, RegimeTargetsAllocator)
    assert allocator.tracked == ("a",)
    assert all(min(row.values()) >= 1 for row in found.params["table"])
    json.dumps(found.to_dict())
    assert search_regime_table(parse_scenario(STEADY), map_serial) is None


# --- the target head --------------------------------------------------------------------------------


def _target_policy(seed: int = 0) -> LearnedPolicy:
    config = AllocatorNetConfig.residual(_BASES, target_head=True)
    return LearnedPolicy.create(config, max_moves=2, seed=seed)


def test_target_head_is_equivariant_and_its_numpy_copy_matches() -> None:
    net = TargetShareNet(16)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(4.0)
    x = torch.randn(2, 9, N_QUEUE_FEATURES + N_REGIME_FEATURES)
    order = torch.randperm(9)
    torch.testing.assert_close(net(x[:, order]), net(x)[:, order])
    policy = _target_policy(seed=2)
    head = policy.allocator_net.target_net
    assert head is not None
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(4.0)
        ref = head(x[:1])[0].numpy()
    fast = QueueSetNetNp(policy.allocator_net).target_logits(x[0].numpy())
    np.testing.assert_allclose(fast, ref, atol=1e-4)


@pytest.mark.parametrize("n", [1, 7, 200])
def test_target_option_gives_a_valid_allocation_for_any_queue_count(n: int) -> None:
    policy = _target_policy()
    allocator = policy.allocator(force_base=len(_BASES), max_moves=0, record=True)
    rng = np.random.default_rng(n)
    for t in range(3):
        rates = {f"q{i}": float(rng.uniform(0, 5)) for i in range(n)}
        view = _view(float(t), rates, budget=2 * n + 3)
        out = allocator.allocate(view)
        assert set(out) == set(rates)
        assert sum(out.values()) <= view.budget
        assert min(out.values()) >= 0
    d = allocator.decisions[-1]
    assert d.base == len(_BASES)
    assert d.target_features is not None
    assert d.target_features.shape == (n, N_QUEUE_FEATURES + N_REGIME_FEATURES)


def test_target_option_is_equivariant_in_the_allocator() -> None:
    policy = _target_policy(seed=1)
    assert policy.allocator_net.target_net is not None
    with torch.no_grad():
        for p in policy.allocator_net.target_net.parameters():
            p.mul_(6.0)
    rates = {"x": 1.0, "y": 4.0, "z": 0.5, "w": 2.0}
    views = [_view(float(t), {k: v * (1 + t) for k, v in rates.items()}, 12) for t in range(3)]
    flipped = [ClusterView(v.now_s, v.tick_s, v.budget, v.queues[::-1]) for v in views]
    a = policy.allocator(force_base=len(_BASES), max_moves=0)
    b = policy.allocator(force_base=len(_BASES), max_moves=0)
    for v, f in zip(views, flipped, strict=True):
        assert a.allocate(v) == b.allocate(f)


def test_target_head_config_round_trips_and_old_configs_still_load() -> None:
    policy = _target_policy()
    params = json.loads(json.dumps(policy.hyperparameters()))
    rebuilt = LearnedPolicy.from_hyperparameters(params)
    assert rebuilt.allocator_net.config == policy.allocator_net.config
    assert rebuilt.allocator_net.config.n_options == len(_BASES) + 1
    for key in ("target_head", "target_hold", "slow_s"):  # a checkpoint from before the head
        del params["allocator"][key]
    old = LearnedPolicy.from_hyperparameters(params)
    assert old.allocator_net.target_net is None
    assert old.allocator_net.config.n_options == 2
    with pytest.raises(ValueError, match="base heuristic"):
        AllocatorNetConfig(target_head=True)
    with pytest.raises(ValueError, match="target_hold"):
        AllocatorNetConfig.residual(_BASES, target_head=True).__class__(
            n_features=N_QUEUE_FEATURES + 3, bases=_BASES, target_head=True, target_hold=0.0
        )
    with pytest.raises(ValueError, match="gate options"):
        policy.allocator(force_base=len(_BASES) + 1)


def test_checkpoint_with_a_target_head_round_trips(tmp_path: Path) -> None:
    policy = _target_policy(seed=5)
    save_checkpoint(tmp_path / "p.pt", policy, {"note": "test"})
    loaded, _ = load_checkpoint(tmp_path / "p.pt")
    view = _view(0.0, {"a": 3.0, "b": 1.0, "c": 2.0}, 9)
    forced = {"force_base": len(_BASES), "max_moves": 0}
    assert loaded.allocator(**forced).allocate(view) == policy.allocator(**forced).allocate(view)


def test_a_teacher_that_acts_runs_the_episode_the_learned_policy_only_records() -> None:
    """With `teacher_acts`, the episode is the teacher's own (same JCT as running it alone),
    while every tick still records the learned policy's decision and the teacher's targets."""
    scenario = parse_scenario(BURSTY)
    params = {"tracked": ["a"], "table": [{"a": 3.0, "b": 5.0}, {"a": 6.0, "b": 2.0}]}
    alone = run_rollout(
        RolloutTask(scenario, 4, heuristic="regime_targets", heuristic_params=params)
    )
    acting = run_rollout(
        RolloutTask(
            scenario, 4, policy=_target_policy(), force_base=len(_BASES), record=True,
            teacher="regime_targets", teacher_params=params, teacher_acts=True,
        )
    )  # fmt: skip
    assert acting.mean_jct_s == pytest.approx(alone.mean_jct_s)
    assert len(acting.teacher_targets) == len(acting.decisions) > 0
    assert all(int(t.sum()) == 8 for t in acting.teacher_targets)


def test_distillation_teaches_the_head_the_table() -> None:
    """After DAgger on a two-regime table, the head's rounded targets match the table's on most
    ticks, which the untrained head's near-equal split does not."""
    scenario = parse_scenario(BURSTY)
    params = {"tracked": ["a"], "table": [{"a": 2.0, "b": 6.0}, {"a": 6.0, "b": 2.0}]}
    policy = _target_policy()
    fit = distill_targets(
        policy, [scenario, parse_scenario(STEADY)], {"bursty_tiny": params}, map_serial,
        np.random.default_rng(0), rounds=2, episodes_per_round=2, steps=150,
        learning_rate=3e-3, minibatch_size=128,
    )  # fmt: skip
    assert fit.samples[1] > fit.samples[0] > 0
    assert fit.exact_targets > 0.8
    with pytest.raises(ValueError, match="no scenario"):
        distill_targets(policy, [parse_scenario(STEADY)], {}, map_serial, np.random.default_rng(0))
    plain = LearnedPolicy.create(AllocatorNetConfig.residual(_BASES))
    with pytest.raises(ValueError, match="no target head"):
        distill_targets(
            plain, [scenario], {"bursty_tiny": params}, map_serial, np.random.default_rng(0)
        )


def test_training_searches_tables_where_queues_burst_and_offers_the_head_to_the_gate() -> None:
    args = Args(
        seed=0, max_iterations=1, net=NetConfig(bases=_BASES, target_head=True),
        ppo=PPOConfig(inputs_per_iteration=1, replays=2, episode_s=(20.0, 30.0), update_epochs=1),
        validate=ValidationConfig(every=10, seeds=1, random_starts=False, max_duration_s=60.0),
        imitation=ImitationConfig(coef=1.0, teacher_seeds=2, gate_pretrain_steps=5),
        forecast=ForecastConfig(enabled=False),
        regimes=RegimeConfig(
            search_rounds=1, distill_rounds=1, distill_episodes=1, distill_steps=20
        ),
    )  # fmt: skip
    result = train(args, [parse_scenario(BURSTY), parse_scenario(STEADY)], map_serial)
    assert set(result.regime_tables) == {"bursty_tiny"}
    assert result.target_fit is not None
    assert set(result.base_teachers) == {"bursty_tiny", "steady_tiny"}
    assert all(0 <= k <= len(_BASES) for k in result.base_teachers.values())
    assert result.policy.allocator_net.target_net is not None
    with pytest.raises(ValueError, match="target_head"):
        NetConfig(target_head=True)
