"""Policy search for a regime table (`policies.regime`): the teacher of the target head.

On a scenario whose queues have bursty arrivals (Markov-modulated generators feeding one queue
each), the best split of the workers depends on which queues are bursting, and a table with one
split per burst regime beats every planning heuristic we tuned (see the README). This module finds
such a table on the scenario's training arrivals:

1. `bursty_queues` reads the scenario for queues fed by a bursty generator, the strongest first.
2. `initial_table` starts each regime at square-root staffing of the load that regime expects
   (burst rate for the bursting queues, calm rate for the others, mean rate for untracked queues).
3. `search_regime_table` improves it by coordinate descent: each round scores every single-worker
   move between two queues in one regime on the same training episodes, applies the best move of
   every regime that improved together (regimes cover disjoint stretches of time, so their moves
   mostly add up), keeps that if it beats the best single move, and stops when nothing improves.

Episodes run through `map_rollouts`, so a round is one parallel batch on Ray. No I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policies.allocation import largest_remainder
from policies.learned.rollout import MapRollouts, RolloutTask, capped_duration, training_starts
from policies.regime import MAX_TRACKED
from policies.seeds import TUNING_SEEDS
from policies.sim.scenario import Scenario
from policies.sim.workloads import MmppWorkload

# A queue counts as bursty when its burst rate is at least this many times its mean rate: the
# regime allocator's default threshold, so a burst is something it can see.
MIN_BURST_RATIO = 1.5


@dataclass(frozen=True)
class BurstyQueue:
    """A queue fed by a bursty generator: its mean arrival rate, and the rates of its regimes."""

    name: str
    mean_rate_per_s: float
    calm_rate_per_s: float
    burst_rate_per_s: float
    service_s: float

    @property
    def burst_load(self) -> float:
        """Erlangs a burst adds over the mean: how much a regime change moves the best split."""
        return (self.burst_rate_per_s - self.mean_rate_per_s) * self.service_s


def _only_queue(scenario: Scenario, job_type: str) -> str | None:
    """The one queue that serves `job_type`, or None when none or several do (routed load)."""
    names = [q.name for q in scenario.queues if job_type in q.job_types]
    return names[0] if len(names) == 1 else None


def _mean_rates(scenario: Scenario) -> dict[str, float]:
    """Per queue, the long-run arrivals per second of the job types only it serves."""
    mean = {q.name: 0.0 for q in scenario.queues}
    for generator in scenario.workload.generators:
        total = sum(generator.mix.values())
        for job_type, weight in generator.mix.items():
            queue = _only_queue(scenario, job_type)
            if queue is not None:
                mean[queue] += generator.mean_rate_per_s * weight / total
    return mean


def bursty_queues(scenario: Scenario, max_tracked: int = 2) -> list[BurstyQueue]:
    """Up to `max_tracked` queues whose arrivals come in bursts, largest burst load first.

    A queue is bursty when a Markov-modulated generator feeds it (through job types only it
    serves) and its total rate during that generator's fastest state is at least
    `MIN_BURST_RATIO` times its mean. Trace replays and smooth generators give none.
    """
    if not 0 <= max_tracked <= MAX_TRACKED:
        raise ValueError(f"max_tracked must be in 0..{MAX_TRACKED}, got {max_tracked}")
    mean = _mean_rates(scenario)
    # Per queue, the largest (burst - mean, calm - mean) rate swing of one bursty generator.
    swing: dict[str, tuple[float, float]] = {}
    for generator in scenario.workload.generators:
        if not isinstance(generator, MmppWorkload):
            continue
        total = sum(generator.mix.values())
        fastest = max(generator.states, key=lambda s: s.rate_per_s)
        others = [s for s in generator.states if s is not fastest]
        calm = sum(s.rate_per_s * s.mean_sojourn_s for s in others) / sum(
            s.mean_sojourn_s for s in others
        )
        for job_type, weight in generator.mix.items():
            queue = _only_queue(scenario, job_type)
            if queue is None:
                continue
            share = weight / total
            up = (fastest.rate_per_s - generator.mean_rate_per_s) * share
            down = (calm - generator.mean_rate_per_s) * share
            if up > swing.get(queue, (0.0, 0.0))[0]:
                swing[queue] = (up, down)
    service = {q.name: q.service.nominal_mean_s for q in scenario.queues}
    found = [
        BurstyQueue(name, mean[name], mean[name] + down, mean[name] + up, service[name])
        for name, (up, down) in swing.items()
        if mean[name] > 0 and (mean[name] + up) >= MIN_BURST_RATIO * mean[name]
    ]
    found.sort(key=lambda b: (-b.burst_load, b.name))
    return found[:max_tracked]


def initial_table(scenario: Scenario, tracked: Sequence[BurstyQueue]) -> list[dict[str, int]]:
    """One row per regime (bit i: tracked[i] bursts): square-root staffing of the load expected
    in that regime, in whole workers of the scenario's budget."""
    names = [q.name for q in scenario.queues]
    service = np.array([q.service.nominal_mean_s for q in scenario.queues])
    base = _mean_rates(scenario)
    rows: list[dict[str, int]] = []
    for regime in range(2 ** len(tracked)):
        rates = dict(base)
        for bit, b in enumerate(tracked):
            rates[b.name] = b.burst_rate_per_s if regime >> bit & 1 else b.calm_rate_per_s
        load = np.array([rates[n] for n in names]) * service
        counts = largest_remainder(load + np.sqrt(load), scenario.allocation.budget)
        rows.append({n: int(c) for n, c in zip(names, counts.tolist(), strict=True)})
    return rows


@dataclass
class RegimeSearchResult:
    """The table found, its score, and how the search got there."""

    params: dict[str, Any]  # constructor parameters of `RegimeTargetsAllocator`
    mean_jct_s: float
    initial_mean_jct_s: float
    rounds: int
    episodes: int
    history: list[float] = field(default_factory=list)  # best mean JCT after each round

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "mean_jct_s": self.mean_jct_s,
            "initial_mean_jct_s": self.initial_mean_jct_s,
            "rounds": self.rounds,
            "episodes": self.episodes,
            "history": self.history,
        }


def _moves(table: list[dict[str, int]], minimum: dict[str, int]) -> list[tuple[int, str, str]]:
    """Every (regime, donor, receiver) single-worker move that keeps the donor at its minimum."""
    return [
        (r, donor, receiver)
        for r, row in enumerate(table)
        for donor in row
        for receiver in row
        if donor != receiver and row[donor] > minimum.get(donor, 0)
    ]


def _moved(
    table: list[dict[str, int]], moves: Sequence[tuple[int, str, str]]
) -> list[dict[str, int]]:
    out = [dict(row) for row in table]
    for r, donor, receiver in moves:
        out[r][donor] -= 1
        out[r][receiver] += 1
    return out


def search_regime_table(
    scenario: Scenario,
    map_rollouts: MapRollouts,
    *,
    seeds: Sequence[int] = TUNING_SEEDS,
    max_tracked: int = 2,
    max_rounds: int = 12,
    threshold: float = 1.5,
    hold: float = 2.0,
    slow_s: float = 600.0,
    max_duration_s: float | None = None,
) -> RegimeSearchResult | None:
    """A regime table for `scenario` by coordinate descent on the mean JCT over `seeds`
    (training arrivals; every other episode from a random split of the workers), or None when the
    scenario has no bursty queue. Each row keeps every queue at its guardrail minimum, and at
    least one worker (a queue with none cannot drain)."""
    tracked = bursty_queues(scenario, max_tracked)
    if not tracked:
        return None
    if not seeds:
        raise ValueError("the regime search needs at least one training seed")
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be >= 0, got {max_rounds}")
    minimum = {q.name: max(q.min_workers, 1) for q in scenario.queues}
    starts = training_starts(seeds)
    duration_s = capped_duration(scenario, max_duration_s)

    def params_of(table: list[dict[str, int]]) -> dict[str, Any]:
        return {
            "tracked": [b.name for b in tracked],
            "table": [{k: float(v) for k, v in row.items()} for row in table],
            "threshold": threshold,
            "hold": hold,
            "slow_s": slow_s,
            # The stability floor lifts every row's small entries alike, which leaves the search
            # moves that change nothing and stalls it short of the best table (on bursty_switch,
            # 4.73 s against 4.47 s on the training seeds). The target head keeps the floor as a
            # guard; against this table it costs 0.4% there.
            "floor": False,
        }

    def score(tables: Sequence[list[dict[str, int]]]) -> list[float]:
        tasks = [
            RolloutTask(
                scenario, seed, duration_s=duration_s, initial_seed=initial,
                heuristic="regime_targets", heuristic_params=params_of(table),
            )
            for table in tables
            for seed, initial in starts
        ]  # fmt: skip
        jct = [
            r.mean_jct_s if math.isfinite(r.mean_jct_s) else math.inf for r in map_rollouts(tasks)
        ]
        k = len(starts)
        return [float(np.mean(jct[i * k : (i + 1) * k])) for i in range(len(tables))]

    table = initial_table(scenario, tracked)
    for row in table:  # lift rows to the minimum, taking from the largest queue
        for name, low in minimum.items():
            while row[name] < low:
                row[max(row, key=lambda n: row[n] - minimum[n])] -= 1
                row[name] += 1
    best = score([table])[0]
    result = RegimeSearchResult(params_of(table), best, best, 0, len(starts))
    for _ in range(max_rounds):
        moves = _moves(table, minimum)
        values = score([_moved(table, [m]) for m in moves])
        result.episodes += len(moves) * len(starts)
        # The best improving move of each regime, then all of them together.
        per_regime: dict[int, tuple[float, tuple[int, str, str]]] = {}
        for value, move in zip(values, moves, strict=True):
            if value < best and value < per_regime.get(move[0], (math.inf, move))[0]:
                per_regime[move[0]] = (value, move)
        if not per_regime:
            break
        single_value, single = min(per_regime.values())
        candidate, candidate_value = _moved(table, [single]), single_value
        if len(per_regime) > 1:
            joint = _moved(table, [m for _, m in per_regime.values()])
            joint_value = score([joint])[0]
            result.episodes += len(starts)
            if joint_value < candidate_value:
                candidate, candidate_value = joint, joint_value
        table, best = candidate, candidate_value
        result.rounds += 1
        result.history.append(best)
    result.params = params_of(table)
    result.mean_jct_s = best
    return result
