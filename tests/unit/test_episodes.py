"""One episode runner: the guardrails wrap every allocator there, recorders see every tick in
order, and evaluation's and tuning's task executors give the numbers of the in-process path."""

from __future__ import annotations

import numpy as np

from policies.episodes import BaseRecorder, ProgressReport, run_episode
from policies.evaluation import (
    EpisodeTask,
    evaluate_scenario,
    map_episodes_serial,
    run_episode_task,
    run_policy,
)
from policies.registry import make_allocator
from policies.sim.metrics import RunRecord
from policies.sim.run import SimRun
from policies.sim.scenario import parse_scenario, prepare
from policies.tuning import heuristic_factory, tune_scenario
from policies.views import Allocation, ClusterView
from tests.unit.test_learned_training import TINY


class _Broken:
    """An allocator that always fails: the guardrails must replace every one of its ticks."""

    name = "broken"

    def allocate(self, view: ClusterView) -> Allocation:
        raise RuntimeError("no")


class _Log(BaseRecorder):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def tick(self, run: SimRun, view: ClusterView) -> None:
        self.calls.append("tick")

    def decided(self, run: SimRun, view: ClusterView, allocation: Allocation, moved: int) -> None:
        self.calls.append("decided")

    def end(self, run: SimRun, record: RunRecord) -> None:
        self.calls.append("end")


def test_the_episode_wraps_the_allocator_in_the_scenarios_guardrails() -> None:
    """An allocator that raises on every tick is replaced by the fallback on every tick (counted),
    and the run still ends with every job done."""
    scenario = parse_scenario(TINY)
    episode = run_episode(prepare(scenario, 0), _Broken())
    ticks = len(episode.record.timeseries.t_s)
    assert ticks > 0
    assert episode.fallbacks == ticks
    accepted = episode.record.queue_idx >= 0
    assert accepted.any()
    assert not np.isnan(episode.record.completion_s[accepted]).any()


def test_recorders_see_each_tick_before_and_after_the_decision_and_the_end_once() -> None:
    """tick then decided at every tick, then end once; a progress report gets every tick's time."""
    scenario = parse_scenario(TINY)
    log = _Log()
    times: list[float] = []
    episode = run_episode(
        prepare(scenario, 1),
        make_allocator("proportional"),
        recorders=[log, ProgressReport(times.append)],
    )
    ticks = len(episode.record.timeseries.t_s)
    assert log.calls == ["tick", "decided"] * ticks + ["end"]
    assert times == list(episode.record.timeseries.t_s)


def test_an_episode_task_gives_the_numbers_of_the_in_process_run() -> None:
    """The same (policy, seed) as a task, prepared where it runs, equals `run_policy` on jobs
    prepared once."""
    scenario = parse_scenario(TINY)
    factory = heuristic_factory("switch_aware", {"horizon_s": 80.0})
    here = run_policy(prepare(scenario, 2), factory)
    task = run_episode_task(EpisodeTask(scenario, 2, factory, part="train"))
    assert task.to_dict() == here.to_dict()


def test_evaluation_and_tuning_through_the_task_executor_match_the_in_process_path() -> None:
    """evaluate_scenario and tune_scenario give the same outcomes, in the same order, with the
    serial task executor as without one; progress is reported for every episode and point."""
    scenario = parse_scenario(TINY)
    factories = {
        "proportional": heuristic_factory("proportional", {}),
        "static": heuristic_factory("static", {}),
    }
    plain = evaluate_scenario(scenario, factories, [0, 1, 2], part="train")
    seen: list[tuple[str, int]] = []
    tasked = evaluate_scenario(
        scenario, factories, [0, 1, 2], part="train", map_episodes=map_episodes_serial,
        progress=lambda name, seed: seen.append((name, seed)),
    )  # fmt: skip
    assert {k: [o.to_dict() for o in v] for k, v in tasked.items()} == {
        k: [o.to_dict() for o in v] for k, v in plain.items()
    }
    assert sorted(seen) == sorted((n, s) for n in factories for s in (0, 1, 2))
    grids = {"switch_aware": [{"horizon_s": 20.0}, {"horizon_s": 80.0}], "static": [{}]}
    points: list[tuple[str, int, int]] = []
    serial = tune_scenario(scenario, seeds=[0, 1], grids=grids)
    parallel = tune_scenario(
        scenario, seeds=[0, 1], grids=grids, map_episodes=map_episodes_serial,
        progress=lambda *p: points.append(p),
    )  # fmt: skip
    assert parallel.to_dict()["heuristics"] == serial.to_dict()["heuristics"]
    assert points == [("switch_aware", 1, 2), ("switch_aware", 2, 2)]
