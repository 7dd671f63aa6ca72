"""Every heuristic allocator in the simulator: no thrashing and no lost work under steady load.

A steady two-queue scenario (Poisson arrivals, ~62% utilisation, 5 s model loads) runs once per
heuristic, wrapped in the scenario's guardrails as `bilevel simulate --compare` does. Reconfigurations
are counted from the per-tick allocations after a warm-up, so the initial rebalancing is free.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import pytest

from policies.registry import HEURISTIC_ALLOCATORS
from policies.sim.metrics import RunRecord, conservation_gap, littles_law_gap
from policies.sim.scenario import make_allocator_for, make_router_for, parse_scenario, prepare

BUDGET = 16
DURATION_S = 300.0
WARMUP_S = 60.0

# Plain MaxWeight re-splits the workers by instantaneous queue lengths every tick and does not see
# model loads; moving hundreds of workers here (and the backlog its lost load time builds) is its
# known behaviour, which the switch-aware variant exists to fix. Strict: if it ever stops
# thrashing, this marker must go.
_SWITCH_BLIND = {
    "maxweight": pytest.mark.xfail(
        strict=True, reason="plain MaxWeight ignores switch costs and re-splits every tick"
    )
}


def _steady_two_queues() -> dict[str, Any]:
    # Offered load: 25/s * 0.2 s + 5/s * 1.0 s = 10 worker-seconds per second of 16.
    return {
        "name": "steady_two",
        "queues": [
            {
                "name": "fast",
                "job_types": ["fast"],
                "service": {"kind": "exponential", "mean_s": 0.2},
                "model_load_s": 5.0,
            },
            {
                "name": "slow",
                "job_types": ["slow"],
                "service": {"kind": "exponential", "mean_s": 1.0},
                "model_load_s": 5.0,
            },
        ],
        "allocation": {"policy": "proportional", "tick_s": 1.0, "budget": BUDGET},
        "workload": {
            "generators": [{"kind": "poisson", "rate_per_s": 30.0, "mix": {"fast": 5, "slow": 1}}]
        },
        "duration_s": DURATION_S,
    }


@cache
def _run(allocator: str) -> RunRecord:
    scenario = parse_scenario(_steady_two_queues(), source="test_sim_allocators")
    prepared = prepare(scenario, seed=0)
    return prepared.start(make_router_for(scenario)).run(make_allocator_for(scenario, allocator))


def _steady_moves(record: RunRecord) -> tuple[int, int, int]:
    """(workers moved, ticks with a move, ticks) after the warm-up, from the per-tick allocations."""
    series = record.timeseries
    gained = np.maximum(np.diff(series.allocation, axis=0), 0).sum(axis=1)
    steady = series.t_s[1:] > WARMUP_S
    return int(gained[steady].sum()), int(np.count_nonzero(gained[steady])), int(steady.sum())


@pytest.mark.parametrize("name", HEURISTIC_ALLOCATORS)
def test_every_arrival_completes(name: str) -> None:
    """Conservation: every job that arrived completes (the run drains), and the books balance."""
    record = _run(name)
    assert record.arrived > 0.9 * 30.0 * DURATION_S
    assert conservation_gap(record) == 0
    assert record.in_system == 0
    assert int(np.count_nonzero(record.completed_mask)) == record.arrived - record.rejected
    assert littles_law_gap(record) < 1e-9


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=_SWITCH_BLIND.get(n, ())) for n in HEURISTIC_ALLOCATORS]
)
def test_no_backlog_explosion(name: str) -> None:
    """At 62% load no allocator lets the backlog run away: the drain after the horizon is short
    and the time-average number of jobs in system stays within a few budgets' worth."""
    record = _run(name)
    assert record.end_s - DURATION_S <= 30.0
    assert record.area_job_s / record.end_s <= 5 * BUDGET


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=_SWITCH_BLIND.get(n, ())) for n in HEURISTIC_ALLOCATORS]
)
def test_no_thrashing_under_steady_load(name: str) -> None:
    """Once load is steady, few workers move and on few ticks (per 100 ticks: at most 25 workers
    moved, on at most 15 ticks). Before the fix target_ongoing moved workers on most ticks."""
    moved, ticks_moving, ticks = _steady_moves(_run(name))
    assert ticks > 200
    assert moved <= 0.25 * ticks, f"{moved} workers moved in {ticks} steady ticks"
    assert ticks_moving <= 0.15 * ticks, f"workers moved on {ticks_moving} of {ticks} ticks"


def test_switch_aware_barely_moves() -> None:
    """The allocator that prices model loads keeps a balanced steady allocation almost still."""
    moved, _, ticks = _steady_moves(_run("switch_aware"))
    assert moved <= 0.03 * ticks
