"""Pure bookkeeping of bench_e2e's peer side: medians over rounds and the table of ratios."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from benchmarks.peers.base import RoundResult

# Each compared metric and whether a higher value is better.
HIGHER_IS_BETTER: dict[str, bool] = {
    "batched_jobs_per_s": True,
    "individual_jobs_per_s": True,
    "round_trip_p50_ms": False,
    "round_trip_p99_ms": False,
    "idle_cpu_core_fraction": False,
}


def median_of_rounds(rounds: Sequence[RoundResult]) -> dict[str, Any]:
    """The median of each figure over the rounds, in bench_e2e's result shape."""
    if not rounds:
        raise ValueError("no rounds to summarise")

    def med(name: str) -> float:
        return float(statistics.median(getattr(r, name) for r in rounds))

    return {
        "batched_jobs_per_s": round(med("batched_jobs_per_s")),
        "individual_jobs_per_s": round(med("individual_jobs_per_s")),
        "round_trip": {
            "p50_ms": round(med("round_trip_p50_ms"), 3),
            "p99_ms": round(med("round_trip_p99_ms"), 3),
        },
        "rounds": [asdict(r) for r in rounds],
    }


def metrics_of(result: Mapping[str, Any]) -> dict[str, float]:
    """The compared metrics found in one bench_e2e result (bilevel's or a peer's); a skipped or
    failed peer has none."""
    flat: dict[str, Any] = dict(result)
    for key, value in (result.get("round_trip") or {}).items():
        flat[f"round_trip_{key}"] = value
    return {m: float(flat[m]) for m in HIGHER_IS_BETTER if isinstance(flat.get(m), int | float)}


def _ratio(ours: float, theirs: float) -> float | None:
    return round(ours / theirs, 3) if theirs else None


def ratio_table(
    bilevel: Mapping[str, Any], peers: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Per metric: bilevel's value, the best peer's (highest throughput, lowest latency and idle
    CPU) and bilevel / best, plus bilevel / each measured peer. Ratios are always bilevel over
    peer: above 1 is better for bilevel on throughput, below 1 on latency and idle CPU."""
    ours = metrics_of(bilevel)
    theirs = {name: metrics_of(result) for name, result in peers.items()}
    table: dict[str, Any] = {}
    for metric, higher in HIGHER_IS_BETTER.items():
        values = {name: m[metric] for name, m in theirs.items() if metric in m}
        if metric not in ours or not values:
            continue
        pick = max if higher else min
        best = pick(values, key=lambda name: values[name])
        table[metric] = {
            "better": "higher" if higher else "lower",
            "bilevel": ours[metric],
            "best_peer": best,
            "best_peer_value": values[best],
            "bilevel_over_best": _ratio(ours[metric], values[best]),
            "bilevel_over_each": {name: _ratio(ours[metric], v) for name, v in values.items()},
        }
    return table
