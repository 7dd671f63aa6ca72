"""Heuristic tuning, the shipped tuned values, held-out splits and the statistics of evaluation."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from policies.evaluation import (
    RunOutcome,
    compare,
    mean_ci,
    prepare_part,
    run_policy,
    scenario_fingerprint,
    split_window,
    t_quantile,
)
from policies.registry import HEURISTIC_ALLOCATORS
from policies.seeds import EVAL_SEEDS, TRAIN_SEEDS, TUNING_SEEDS, eval_seeds
from policies.sim.scenario import parse_scenario, prepare
from policies.tuned import TUNED
from policies.tuning import default_grids, heuristic_factory, shipped_params, tune_scenario

SCENARIO_DIR = Path(str(resources.files("policies") / "scenarios"))
SYNTHETIC = sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml") if not p.stem.startswith("trace_"))

TINY = """
name: tiny
queues:
  - {name: a, job_types: [a], service: {kind: exponential, mean_s: 0.5}, model_load_s: 4.0}
  - {name: b, job_types: [b], service: {kind: lognormal, mean_s: 0.5, cv: 1.0}, model_load_s: 4.0}
allocation: {policy: proportional, tick_s: 1.0, budget: 6}
workload:
  generators:
    - kind: mmpp
      states: [{rate_per_s: 2.0, mean_sojourn_s: 10.0}, {rate_per_s: 8.0, mean_sojourn_s: 5.0}]
      mix: {a: 1}
    - {kind: poisson, rate_per_s: 2.0, mix: {b: 1}}
duration_s: 60.0
"""


# --- tuning ---------------------------------------------------------------------------------------


def test_tuning_picks_the_argmin_of_the_grid() -> None:
    """The chosen parameters are the grid point with the lowest mean time in system over the
    tuning seeds, as computed run by run here."""
    scenario = parse_scenario(TINY)
    grids = {
        "proportional": ({"beta": 0.0}, {"beta": 1.0}, {"beta": 3.0}),
        "switch_aware": (
            {"horizon_s": 4.0, "min_net_gain_job_s": 0.0},
            {"horizon_s": 16.0, "min_net_gain_job_s": 0.0},
            {"horizon_s": 16.0, "min_net_gain_job_s": 20.0},
        ),
        "maxweight": ({},),
    }
    seeds = (0, 1, 2)
    tuning = tune_scenario(scenario, seeds=seeds, grids=grids)
    for name in ("proportional", "switch_aware"):
        scores = []
        for params in grids[name]:
            runs = [
                run_policy(prepare(scenario, seed), heuristic_factory(name, params))
                for seed in seeds
            ]
            scores.append(float(np.mean([r.mean_sojourn_s for r in runs])))
        assert len(set(scores)) > 1, "the grid must matter for the test to mean anything"
        assert tuning.heuristics[name].best == grids[name][int(np.argmin(scores))]
        assert [p.mean_sojourn_s for p in tuning.heuristics[name].points] == pytest.approx(scores)
    # A one-point grid is taken as is, without runs.
    assert tuning.heuristics["maxweight"].best == {}
    assert tuning.seeds == seeds


def test_default_grids_are_small_and_valid() -> None:
    """Every heuristic has a grid of at most 15 points, each accepted by its constructor."""
    scenario = parse_scenario(TINY)
    grids = default_grids(scenario)
    assert set(grids) == set(HEURISTIC_ALLOCATORS)
    for name, grid in grids.items():
        assert 1 <= len(grid) <= 15
        for params in grid:
            heuristic_factory(name, params)()


@pytest.mark.parametrize("name", SYNTHETIC)
def test_shipped_tuned_values_match_the_shipped_scenarios(name: str) -> None:
    """Every shipped synthetic scenario has tuned values for every heuristic, stored under its
    current fingerprint (editing a scenario without retuning fails here)."""
    scenario = parse_scenario((SCENARIO_DIR / f"{name}.yaml").read_text(), source=name)
    params = shipped_params(scenario)
    assert params is not None, f"policies/tuned.py is stale for {name}: rerun the tuning"
    assert set(params) == set(HEURISTIC_ALLOCATORS)
    for heuristic, p in params.items():
        heuristic_factory(heuristic, p)()
    assert set(TUNED[name].seeds) <= set(TRAIN_SEEDS)


def test_edited_scenario_gets_no_stored_values() -> None:
    """A scenario that reuses a shipped name with other content is not given foreign values."""
    text = (SCENARIO_DIR / "steady.yaml").read_text().replace("budget: 32", "budget: 33")
    assert shipped_params(parse_scenario(text)) is None


def test_fingerprint_ignores_the_description_only() -> None:
    """Rewording the description keeps the fingerprint; any run-relevant change alters it."""
    base = parse_scenario(TINY)
    assert scenario_fingerprint(base) == scenario_fingerprint(
        base.model_copy(update={"description": "other words"})
    )
    assert scenario_fingerprint(base) != scenario_fingerprint(
        base.model_copy(update={"allocation": base.allocation.model_copy(update={"tick_s": 2.0})})
    )


# --- held-out seeds and windows -------------------------------------------------------------------


def test_seed_ranges_are_disjoint() -> None:
    """Training and tuning seeds never overlap the evaluation seeds; fewer than 5 is refused."""
    assert not set(TRAIN_SEEDS) & set(EVAL_SEEDS)
    assert set(TUNING_SEEDS) <= set(TRAIN_SEEDS)
    assert eval_seeds(5) == [1000, 1001, 1002, 1003, 1004]
    with pytest.raises(ValueError, match="at least 5"):
        eval_seeds(4)


def test_trace_window_split_partitions_the_trace() -> None:
    """Train = first 60% of the span, test = the rest shifted to start at 0; together all jobs."""
    text = """
name: t
queues: [{name: q, job_types: [x], service: {kind: constant, mean_s: 0.2}}]
allocation: {policy: proportional, budget: 2}
workload: {trace: {format: generic_csv}}
"""
    scenario = parse_scenario(text)
    lines = ["arrival_s,job_type\n"] + [f"{10 + i * 0.5},x\n" for i in range(201)]
    prepared = prepare(scenario, 0, trace_lines=lines)
    train = split_window(prepared, "train")
    test = split_window(prepared, "test")
    assert len(train.jobs.arrivals) + len(test.jobs.arrivals) == 201
    # Span 10..110: the split falls at 70 s.
    assert train.jobs.arrivals.arrival_s.max() < 70.0
    np.testing.assert_allclose(test.jobs.arrivals.arrival_s, np.arange(120, 201) * 0.5 - 60.0)
    assert test.spec.horizon_s == pytest.approx(40.0)
    # A generator workload is not windowed: held-out there means held-out seeds.
    tiny = parse_scenario(TINY)
    assert len(prepare_part(tiny, 3, part="test").jobs.arrivals) == len(
        prepare(tiny, 3).jobs.arrivals
    )


# --- statistics -----------------------------------------------------------------------------------


def test_t_quantiles_match_tables() -> None:
    """Student t quantiles against published values."""
    assert t_quantile(0.975, 1) == pytest.approx(12.7062047, rel=1e-7)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764451, rel=1e-7)
    assert t_quantile(0.975, 9) == pytest.approx(2.2621572, rel=1e-7)
    assert t_quantile(0.995, 30) == pytest.approx(2.7499957, rel=1e-7)
    assert t_quantile(0.025, 4) == pytest.approx(-2.7764451, rel=1e-7)


def test_mean_ci_on_known_numbers() -> None:
    """[1..5]: mean 3, s = sqrt(2.5), half-width t_{.975,4} * s / sqrt(5)."""
    ci = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert ci.mean == 3.0
    assert ci.half_width == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5), rel=1e-7)
    assert ci.n == 5
    assert mean_ci([2.0, 2.0, 2.0]).half_width == 0.0
    assert math.isinf(mean_ci([1.0]).half_width)


def _outcome(mean_s: float, p99_s: float) -> RunOutcome:
    return RunOutcome(mean_s, p99_s, mean_s, 10, 0, 0, None)


def test_compare_picks_best_baseline_and_signs_the_gain() -> None:
    """The best baseline has the lowest mean JCT; gain = 1 - policy / best, positive = better."""
    results = {
        "mine": [_outcome(8.0, 40.0), _outcome(8.0, 40.0)],
        "good": [_outcome(10.0, 50.0), _outcome(10.0, 30.0)],
        "bad": [_outcome(20.0, 90.0), _outcome(22.0, 90.0)],
    }
    c = compare(results, "mine", ["bad", "good"])
    assert c.best_baseline == "good"
    assert c.gain_mean_jct == pytest.approx(0.2)
    assert c.gain_p99_jct == pytest.approx(0.0)
    assert c.paired_gain_mean_jct.mean == pytest.approx(0.2)
    worse = compare(results, "bad", ["good"])
    assert worse.gain_mean_jct == pytest.approx(1 - 21.0 / 10.0)
