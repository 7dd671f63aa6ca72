"""Honest tuning of the heuristic allocators: a small grid per heuristic, scored on training arrivals.

A learned policy is only "better" if the heuristics it is compared with were given the same chance to
fit the workload. So each heuristic gets a small grid over its own constructor parameters, every grid
point runs on the same jobs of the tuning seeds (training seeds, disjoint from the evaluation seeds;
for a trace, the training window), and the point with the lowest mean time in system wins.

The score is `RunOutcome.mean_sojourn_s`, averaged over seeds: mean JCT when every job completes,
and otherwise one that counts unfinished jobs up to the end of the run, so a grid point that starves
a queue cannot win by leaving its slow jobs out of the mean. Ties go to the earlier grid point.

The shipped results live in `policies.tuned`; `render_tuned_module` writes that file's source.
"""

from __future__ import annotations

import math
import pprint
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from policies.evaluation import (
    EpisodeTask,
    MapEpisodes,
    PolicyFactory,
    RunOutcome,
    TraceInput,
    prepare_part,
    run_policy,
    scenario_fingerprint,
)
from policies.registry import HEURISTIC_ALLOCATORS, make_allocator
from policies.seeds import TUNING_SEEDS
from policies.sim.metrics import finite_or_none
from policies.sim.scenario import Scenario
from policies.tuned import TUNED, TunedEntry

Params = Mapping[str, Any]


def _grid(**axes: Sequence[float]) -> tuple[dict[str, float], ...]:
    """The cartesian product of `axes`, first axis slowest."""
    points: list[dict[str, float]] = [{}]
    for name, values in axes.items():
        points = [{**p, name: v} for p in points for v in values]
    return tuple(points)


def default_grids(scenario: Scenario) -> dict[str, tuple[Params, ...]]:
    """The grid of every heuristic for `scenario`, at most fifteen points each, so that tuning a
    shipped scenario takes minutes."""
    # The switch-aware horizon only matters relative to the scenario's slowest model load (its
    # default horizon is at least twice that), so the grid scales with it.
    unit_s = max(max(q.model_load_s for q in scenario.queues), scenario.allocation.tick_s)
    return {
        # Equal shares: static is the no-information baseline, and tuning its shares per scenario
        # would be fitting an oracle allocation rather than a policy.
        "static": ({},),
        # The square-root safety margin, from none (pure offered load) to generous.
        "proportional": _grid(beta=(0.0, 0.5, 1.0, 1.5, 2.0, 3.0)),
        # Jobs per worker, and how fast the autoscaler reacts up / down (paired: fast, default,
        # Ray-like slow).
        "target_ongoing": tuple(
            {"target_ongoing_requests": target, "upscale_delay_s": up, "downscale_delay_s": down}
            for target in (0.5, 0.75, 1.0, 1.5)
            for up, down in ((0.0, 30.0), (10.0, 60.0), (30.0, 300.0))
        ),
        # No parameters.
        "maxweight": ({},),
        # How far ahead a move must pay, and by how much (job-seconds) it must beat staying.
        "switch_aware": _grid(
            horizon_s=tuple(k * unit_s for k in (1.0, 2.0, 4.0, 8.0, 16.0)),
            min_net_gain_job_s=(0.0, 10.0, 50.0),
        ),
    }


def heuristic_factory(name: str, params: Params) -> PolicyFactory:
    """A factory of fresh `name` allocators built with `params` (checked now, not at first use)."""
    make_allocator(name, **params)

    def factory() -> Any:
        return make_allocator(name, **params)

    return factory


def heuristic_factories(
    params: Mapping[str, Params], names: Sequence[str] = HEURISTIC_ALLOCATORS
) -> dict[str, PolicyFactory]:
    """Factories of the heuristics `names`, each with its entry of `params` (defaults if absent)."""
    return {name: heuristic_factory(name, params.get(name, {})) for name in names}


@dataclass(frozen=True)
class GridPoint:
    """One grid point's score: mean over the tuning seeds (NaN when a one-point grid was not run)."""

    params: Params
    mean_sojourn_s: float
    mean_jct_s: float


@dataclass(frozen=True)
class HeuristicTuning:
    """A heuristic's grid, scored, and the winning parameters."""

    name: str
    best: Params
    points: tuple[GridPoint, ...]


@dataclass(frozen=True)
class ScenarioTuning:
    """Every heuristic tuned on one scenario."""

    scenario: str
    fingerprint: str
    seeds: tuple[int, ...]
    heuristics: Mapping[str, HeuristicTuning]
    wall_s: float

    def params(self) -> dict[str, dict[str, Any]]:
        """{heuristic: winning parameters}."""
        return {name: dict(t.best) for name, t in self.heuristics.items()}

    def entry(self) -> TunedEntry:
        """The form `policies.tuned` stores."""
        return TunedEntry(fingerprint=self.fingerprint, seeds=self.seeds, params=self.params())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the winners and every grid point's scores (None for a one-point grid,
        which is not run)."""
        return {
            "fingerprint": self.fingerprint,
            "seeds": list(self.seeds),
            "wall_s": self.wall_s,
            "heuristics": {
                name: {
                    "best": dict(h.best),
                    "points": [
                        {
                            "params": dict(p.params),
                            "mean_sojourn_s": finite_or_none(p.mean_sojourn_s),
                            "mean_jct_s": finite_or_none(p.mean_jct_s),
                        }
                        for p in h.points
                    ],
                }
                for name, h in self.heuristics.items()
            },
        }


def _best_index(scores: Sequence[float]) -> int:
    """Index of the lowest score; NaN counts as worst, ties go to the earlier index."""
    ranked = [math.inf if math.isnan(s) else s for s in scores]
    return min(range(len(ranked)), key=lambda i: (ranked[i], i))


def tune_scenario(
    scenario: Scenario,
    *,
    seeds: Sequence[int] = TUNING_SEEDS,
    grids: Mapping[str, Sequence[Params]] | None = None,
    trace: TraceInput | None = None,
    max_jobs: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    map_episodes: MapEpisodes | None = None,
) -> ScenarioTuning:
    """Each heuristic of `grids` tuned on `scenario`'s training arrivals (`seeds`; the training
    window of a trace): the grid point with the lowest mean time in system over the seeds.

    `grids` defaults to `default_grids(scenario)`. The jobs of each seed are drawn once and replayed for every grid point. A one-point grid is not
    run. `progress(heuristic, points_done, points_total)` is called after each grid point.
    With `map_episodes`, every (grid point, seed) episode is one task of one batch, each seed's
    jobs drawn where it runs (the same jobs, so the same numbers); progress then follows the
    points whose seeds have all finished.
    """
    if not seeds:
        raise ValueError("tuning needs at least one seed")
    started = time.perf_counter()
    if grids is None:
        grids = default_grids(scenario)
    for name, grid in grids.items():
        if not grid:
            raise ValueError(f"empty grid for {name!r}")
    ran = (
        _outcomes_in_tasks(scenario, seeds, grids, trace, max_jobs, map_episodes, progress)
        if map_episodes is not None
        else None
    )
    prepared = (
        [
            prepare_part(scenario, seed, part="train", trace=trace, max_jobs=max_jobs)
            for seed in seeds
        ]
        if ran is None
        else []
    )
    tuned: dict[str, HeuristicTuning] = {}
    for name, grid in grids.items():
        points: list[GridPoint] = []
        for i, params in enumerate(grid):
            if len(grid) == 1:
                points.append(GridPoint(dict(params), math.nan, math.nan))
                break
            if ran is not None:
                outcomes = ran[name, i]
            else:
                factory = heuristic_factory(name, params)
                outcomes = [run_policy(p, factory) for p in prepared]
            points.append(
                GridPoint(
                    dict(params),
                    mean_sojourn_s=sum(o.mean_sojourn_s for o in outcomes) / len(outcomes),
                    mean_jct_s=sum(o.mean_jct_s for o in outcomes) / len(outcomes),
                )
            )
            if progress is not None and ran is None:
                progress(name, i + 1, len(grid))
        best = points[_best_index([p.mean_sojourn_s for p in points])].params
        tuned[name] = HeuristicTuning(name, best, tuple(points))
    return ScenarioTuning(
        scenario=scenario.name,
        fingerprint=scenario_fingerprint(scenario, trace),
        seeds=tuple(seeds),
        heuristics=tuned,
        wall_s=time.perf_counter() - started,
    )


def _outcomes_in_tasks(
    scenario: Scenario,
    seeds: Sequence[int],
    grids: Mapping[str, Sequence[Params]],
    trace: TraceInput | None,
    max_jobs: int | None,
    map_episodes: MapEpisodes,
    progress: Callable[[str, int, int], None] | None,
) -> dict[tuple[str, int], list[RunOutcome]]:
    """Every (heuristic, grid point) of grids with more than one point, on every seed, as one
    batch of `map_episodes`: {(heuristic, point index): outcomes in seed order}."""
    keys = [(name, i) for name, grid in grids.items() if len(grid) > 1 for i in range(len(grid))]
    tasks = [
        EpisodeTask(
            scenario, seed, heuristic_factory(name, grids[name][i]), part="train", trace=trace,
            max_jobs=max_jobs,
        )
        for name, i in keys
        for seed in seeds
    ]  # fmt: skip
    left = {key: len(seeds) for key in keys}
    finished = {name: 0 for name, _ in keys}

    def done(t: int) -> None:
        key = keys[t // len(seeds)]
        left[key] -= 1
        if left[key] == 0 and progress is not None:
            finished[key[0]] += 1
            progress(key[0], finished[key[0]], len(grids[key[0]]))

    outcomes = map_episodes(tasks, done)
    return {key: outcomes[k * len(seeds) : (k + 1) * len(seeds)] for k, key in enumerate(keys)}


def shipped_params(
    scenario: Scenario,
    trace: TraceInput | None = None,
    table: Mapping[str, TunedEntry] = TUNED,
) -> dict[str, dict[str, Any]] | None:
    """The stored tuned parameters for `scenario`, or None when there are none for exactly this
    scenario (by name and fingerprint: an edited scenario, or another trace, must be retuned)."""
    entry = table.get(scenario.name)
    if entry is None or entry.fingerprint != scenario_fingerprint(scenario, trace):
        return None
    return {name: dict(params) for name, params in entry.params.items()}


def render_tuned_module(entries: Mapping[str, TunedEntry], note: str = "") -> str:
    """Python source of `policies/tuned.py` holding `entries` (scenario name -> entry), sorted by
    name; merge with `TUNED` to update some scenarios and keep the rest."""
    lines = [
        '"""Tuned heuristic parameters per shipped scenario; generated by',
        "`policies.tuning.render_tuned_module`, do not edit by hand (rerun the tuning instead).",
        "",
        "Each entry holds the fingerprint of the scenario (and trace) it was tuned on: `bilevel evaluate`",
        "uses the values only for exactly that scenario and tunes anything else afresh.",
    ]
    if note:
        lines += ["", *note.splitlines()]
    lines += [
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "from collections.abc import Mapping",
        "from dataclasses import dataclass",
        "from typing import Any",
        "",
        "",
        "@dataclass(frozen=True)",
        "class TunedEntry:",
        '    """The winning parameters of every heuristic on one scenario."""',
        "",
        "    fingerprint: str",
        "    seeds: tuple[int, ...]",
        "    params: Mapping[str, Mapping[str, Any]]",
        "",
        "",
        "TUNED: Mapping[str, TunedEntry] = {",
    ]
    for name in sorted(entries):
        entry = entries[name]
        plain = {h: dict(p) for h, p in entry.params.items()}
        params = pprint.pformat(plain, width=80, sort_dicts=False).replace("\n", "\n" + " " * 15)
        lines += [
            f"    {name!r}: TunedEntry(",
            f"        fingerprint={entry.fingerprint!r},",
            f"        seeds={tuple(entry.seeds)!r},",
            f"        params={params},",
            "    ),",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"
