"""Regime targets: one fixed split of the workers per combination of burst states of a few queues.

A queue is *bursting* while its observed arrival rate is above `threshold` times its own slow
average (an exponential average with time constant `slow_s`, tracked across ticks). With k tracked
queues there are 2**k regimes, and a table holds one target split per regime. Targets are applied
through a hold rule: a queue holding more than `hold` times as many waiting jobs as workers keeps
the workers it has even if its target is lower, and the receivers of the move give way instead,
so a backlog is never stranded by a regime change.

Nobody writes these tables by hand: a policy search on a scenario's training arrivals finds one
(`policies.learned.regime_search`), and the learned allocator's target head learns to imitate it
from features any queue has (`policies.learned.allocator`). The class is in the allocator registry
so rollouts can run it by name, but it is not one of the heuristics `evaluate` compares against:
it is part of training, with a table fitted to one scenario's queues.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from policies.allocation import largest_remainder
from policies.views import Allocation, ClusterView, queue_column

# Per-queue features of the regime a queue is in, column order of `regime_features`.
REGIME_FEATURE_NAMES: tuple[str, ...] = (
    "log_slow_load",  # log1p(slow-average arrival rate * service time), in Erlangs
    "log_rate_over_slow",  # log((rate + eps) / (slow rate + eps)), clipped to [-3, 3]
)
N_REGIME_FEATURES: int = len(REGIME_FEATURE_NAMES)
# Arrivals per second added to both rates of the ratio, so an idle queue reads 0, not 0/0.
_RATE_EPS = 1.0e-3
_RATIO_CAP = 3.0
# With more tracked queues the table (2**k rows) outgrows what a search can fill on one scenario.
MAX_TRACKED = 4


class SlowRates:
    """Each queue's arrival rate averaged with time constant `slow_s`, by queue name.

    A queue seen for the first time starts its average at its current rate; ticks of any length
    are weighted by 1 - exp(-dt / slow_s), so the average does not depend on the tick.
    """

    def __init__(self, slow_s: float = 600.0) -> None:
        if not (math.isfinite(slow_s) and slow_s > 0):
            raise ValueError(f"slow_s must be a finite number > 0, got {slow_s}")
        self.slow_s = slow_s
        self._slow: dict[str, float] = {}
        self._last_s: float | None = None

    def update(self, view: ClusterView) -> tuple[np.ndarray, np.ndarray]:
        """(rates now, slow averages) in the view's queue order, after folding in this tick."""
        n = len(view.queues)
        rates = np.maximum(queue_column(view.queues, "arrival_rate_per_s"), 0.0)
        rates = np.where(np.isfinite(rates), rates, 0.0)
        dt = 0.0 if self._last_s is None else max(view.now_s - self._last_s, 0.0)
        weight = 1.0 - math.exp(-dt / self.slow_s)
        self._last_s = view.now_s
        slow = np.empty(n)
        for i, (q, rate) in enumerate(zip(view.queues, rates.tolist(), strict=True)):
            old = self._slow.get(q.name)
            value = rate if old is None else old + weight * (rate - old)
            self._slow[q.name] = value
            slow[i] = value
        return rates, slow


def _service(view: ClusterView) -> np.ndarray:
    service_s: np.ndarray = np.maximum(queue_column(view.queues, "service_time_s"), 0.0)
    return service_s


def calm_loads(view: ClusterView, rates: np.ndarray, slow: np.ndarray) -> np.ndarray:
    """Per queue, the offered load (Erlangs) at the lower of its current and slow-average rates:
    what it needs even when calm. A floor on the current rate would chase every burst, which is
    what the regime tables gain by not doing."""
    calm: np.ndarray = np.minimum(rates, slow) * _service(view)
    return calm


def regime_features(view: ClusterView, rates: np.ndarray, slow: np.ndarray) -> np.ndarray:
    """(n, N_REGIME_FEATURES) float32 in `REGIME_FEATURE_NAMES` order."""
    service = _service(view)
    ratio = np.log((rates + _RATE_EPS) / (slow + _RATE_EPS))
    out = np.stack([np.log1p(slow * service), np.clip(ratio, -_RATIO_CAP, _RATIO_CAP)], axis=1)
    clean: np.ndarray = np.nan_to_num(out, nan=0.0, posinf=_RATIO_CAP, neginf=-_RATIO_CAP)
    return clean.astype(np.float32)


def cut_largest(amounts: np.ndarray, excess: int) -> np.ndarray:
    """How much to take from each of `amounts` (non-negative ints) to take `excess` in all, or
    everything when they hold less: as if one at a time from the largest (first on ties). That
    greedy order cuts every amount to some level L and the first few at L one lower, which is
    computed directly (a tick at hundreds of queues must not loop once per worker)."""
    amounts = np.maximum(amounts.astype(np.int64), 0)
    if excess <= 0:
        return np.zeros_like(amounts)
    if int(amounts.sum()) <= excess:
        return amounts
    levels = np.arange(int(amounts.max()) + 1)
    removed = np.maximum(amounts[None, :] - levels[:, None], 0).sum(axis=1)
    level = int(np.argmax(removed <= excess))  # the lowest level that takes no more than excess
    kept = np.minimum(amounts, level)
    left = excess - int((amounts - kept).sum())
    kept[np.flatnonzero(kept == level)[:left]] -= 1
    taken: np.ndarray = amounts - kept
    return taken


def stability_floor(loads: np.ndarray, budget: int) -> np.ndarray:
    """Per queue, the fewest workers that keep up with its offered load (Erlangs): floor(load)
    + 1, or 0 for a queue with none; scaled down by largest remainder when they pass the budget."""
    floor = np.where(loads > 0, np.floor(np.nan_to_num(loads, posinf=budget)) + 1, 0).astype(
        np.int64
    )
    return largest_remainder(floor, budget) if int(floor.sum()) > budget else floor


def with_floor(targets: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """`targets` raised to `floor` (whose sum must not pass theirs), the workers that takes
    coming from the queues furthest above their floor."""
    raised: np.ndarray = np.maximum(targets, floor)
    excess = int(raised.sum() - targets.sum())
    out: np.ndarray = raised - cut_largest(raised - floor, excess)
    return out


def hold_targets(
    current: np.ndarray, targets: np.ndarray, depth: np.ndarray, hold: float
) -> np.ndarray:
    """`targets` (summing to the budget), except that a queue above its target with more than
    `hold` waiting jobs per worker keeps its current workers; the workers that keeps are taken
    back from the queues the targets would grow, largest growth first, so the sum never passes
    the targets' sum. Donors and receivers of the result never swap roles against `current`."""
    want = targets.astype(np.int64).copy()
    keep = (current > targets) & (depth > hold * np.maximum(current, 1))
    want[keep] = current[keep]
    growth = np.where(keep, 0, want - current)
    cut: np.ndarray = want - cut_largest(growth, int(want.sum() - targets.sum()))
    return cut


def _check_positive(name: str, value: float, low: float) -> None:
    if not (math.isfinite(value) and value >= low):
        raise ValueError(f"{name} must be a finite number >= {low}, got {value}")


class RegimeTargetsAllocator:
    """Level 2 by a table of target splits, one per burst regime of the `tracked` queues.

    `table[r]` maps queue names to worker weights for regime r, whose bit i is set while
    `tracked[i]` bursts; weights are scaled to the budget by largest remainder, and a queue a row
    does not name gets none (the guardrails' minimum still applies). A tracked queue missing from
    the view counts as calm. Stateful (the slow averages): one instance per run.
    """

    name: str = "regime_targets"

    def __init__(
        self,
        tracked: Sequence[str],
        table: Sequence[Mapping[str, float]],
        threshold: float = 1.5,
        hold: float = 2.0,
        slow_s: float = 600.0,
        floor: bool = True,
    ) -> None:
        tracked = [str(name) for name in tracked]
        if len(set(tracked)) != len(tracked):
            raise ValueError(f"tracked queues must be distinct, got {tracked}")
        if len(tracked) > MAX_TRACKED:
            raise ValueError(f"at most {MAX_TRACKED} tracked queues, got {len(tracked)}")
        if len(table) != 2 ** len(tracked):
            raise ValueError(
                f"the table needs 2**{len(tracked)} = {2 ** len(tracked)} rows, one per regime of "
                f"{tracked}, got {len(table)}"
            )
        rows: list[dict[str, float]] = []
        for r, row in enumerate(table):
            clean = {str(k): float(v) for k, v in dict(row).items()}
            bad = {k: v for k, v in clean.items() if not (math.isfinite(v) and v >= 0)}
            if bad or sum(clean.values()) <= 0:
                raise ValueError(
                    f"table row {r} needs finite weights >= 0 with a positive sum, got {clean}"
                )
            rows.append(clean)
        _check_positive("threshold", threshold, 1.0)
        _check_positive("hold", hold, 0.0)
        self.tracked = tuple(tracked)
        self.table = tuple(rows)
        self.threshold = float(threshold)
        self.hold = float(hold)
        self.floor = bool(floor)
        self.rates = SlowRates(slow_s)
        # The last tick's targets before the hold rule, in view order: what a student imitates.
        self.last_targets: np.ndarray | None = None

    def regime(self, view: ClusterView, rates: np.ndarray, slow: np.ndarray) -> int:
        """The table row for the view: bit i set while tracked queue i bursts."""
        index = {q.name: i for i, q in enumerate(view.queues)}
        regime = 0
        for bit, name in enumerate(self.tracked):
            i = index.get(name)
            if i is not None and rates[i] > self.threshold * slow[i]:
                regime |= 1 << bit
        return regime

    def allocate(self, view: ClusterView) -> Allocation:
        n = len(view.queues)
        if n == 0:
            return {}
        rates, slow = self.rates.update(view)
        row = self.table[self.regime(view, rates, slow)]
        weights = np.fromiter((row.get(q.name, 0.0) for q in view.queues), np.float64, n)
        budget = max(view.budget, 0)
        targets = largest_remainder(weights, budget)
        if self.floor:
            targets = with_floor(targets, stability_floor(calm_loads(view, rates, slow), budget))
        self.last_targets = targets
        current = np.fromiter((q.allocated for q in view.queues), np.int64, n)
        depth = np.fromiter((q.depth for q in view.queues), np.int64, n)
        want = hold_targets(current, targets, depth, self.hold)
        return {q.name: int(c) for q, c in zip(view.queues, want.tolist(), strict=True)}
