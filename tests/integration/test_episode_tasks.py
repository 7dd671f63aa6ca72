"""Evaluation and tuning episodes as Ray tasks: the same numbers as in-process, in order."""

from __future__ import annotations

import pytest

from policies.evaluation import evaluate_scenario
from policies.sim.scenario import parse_scenario
from policies.tuning import heuristic_factory, tune_scenario
from scheduler.checkpoints import resolve_allocator
from scheduler.episode_tasks import RayEpisodes, episode_executor
from tests.integration.test_training import SCENARIO


@pytest.mark.usefixtures("ray_local")
def test_ray_episodes_evaluate_and_tune_exactly_as_in_process() -> None:
    """The learned policy and two heuristics on three seeds, and a small tuning grid, through Ray
    tasks equal the in-process results outcome for outcome."""
    scenario = parse_scenario(SCENARIO)
    bounds = scenario.bounds()
    factories = {
        "learned": lambda: resolve_allocator("learned", bounds=bounds),
        "proportional": heuristic_factory("proportional", {}),
        "switch_aware": heuristic_factory("switch_aware", {"horizon_s": 40.0}),
    }
    remote = RayEpisodes()
    on_ray = evaluate_scenario(scenario, factories, [0, 1, 2], part="train", map_episodes=remote)
    here = evaluate_scenario(scenario, factories, [0, 1, 2], part="train")
    assert {k: [o.to_dict() for o in v] for k, v in on_ray.items()} == {
        k: [o.to_dict() for o in v] for k, v in here.items()
    }
    grids = {"proportional": [{"beta": 0.5}, {"beta": 1.0}, {"beta": 2.0}]}
    tuned_on_ray = tune_scenario(scenario, seeds=[0, 1], grids=grids, map_episodes=remote)
    tuned_here = tune_scenario(scenario, seeds=[0, 1], grids=grids)
    assert tuned_on_ray.to_dict()["heuristics"] == tuned_here.to_dict()["heuristics"]


def test_no_workers_runs_in_process_and_negative_workers_are_refused() -> None:
    """--workers 0 starts no Ray (the in-process path); a negative count names the option."""
    with episode_executor(0) as run:
        assert run is None
    with pytest.raises(ValueError, match="--workers"), episode_executor(-1):
        pass
