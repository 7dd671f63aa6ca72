"""Guardrails: the constraints every allocator runs under, added by a wrapper (itself an Allocator).

Order of a tick: the wrapped allocator proposes; an invalid proposal (or an exception) is replaced by
the fallback's; then hysteresis holds near-unchanged queues, per-queue bounds clip, the total is cut
to the budget, and the changes are capped. Bounds and budget are hard limits; the move cap gives way
only to bounds (a queue below its minimum is always raised to it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral

import numpy as np

from policies.allocation import ProportionalAllocator, largest_remainder
from policies.registry import make_allocator
from policies.schema import Layout
from policies.views import Allocation, AllocationBounds, Allocator, ClusterView, queue_column


def _check_bounds(bounds: AllocationBounds) -> None:
    """Raise ValueError for limits that contradict themselves regardless of the view."""
    if bounds.default_min < 0:
        raise ValueError(f"default_min must be >= 0, got {bounds.default_min}")
    if bounds.default_max is not None and bounds.default_max < bounds.default_min:
        raise ValueError(
            f"default_max ({bounds.default_max}) is below default_min ({bounds.default_min})"
        )
    if bounds.max_moves_per_tick is not None and bounds.max_moves_per_tick < 0:
        raise ValueError(f"max_moves_per_tick must be >= 0, got {bounds.max_moves_per_tick}")
    for queue in sorted(set(bounds.min_workers) | set(bounds.max_workers)):
        low = _min_of(bounds, queue)
        high = _max_of(bounds, queue)
        if low < 0:
            raise ValueError(f"min_workers of queue {queue!r} must be >= 0, got {low}")
        if high is not None and high < low:
            raise ValueError(f"queue {queue!r}: max_workers ({high}) is below min_workers ({low})")


def _min_of(bounds: AllocationBounds, queue: str) -> int:
    return bounds.min_workers.get(queue, bounds.default_min)


def _max_of(bounds: AllocationBounds, queue: str) -> int | None:
    return bounds.max_workers.get(queue, bounds.default_max)


def _check_feasible(bounds: AllocationBounds, view: ClusterView) -> None:
    """Raise ValueError when the minimums of the view's queues cannot fit its budget."""
    mins = {q.name: _min_of(bounds, q.name) for q in view.queues}
    total = sum(mins.values())
    if total > view.budget:
        named = ", ".join(f"{name}={low}" for name, low in mins.items() if low > 0)
        raise ValueError(
            f"min_workers sum to {total}, over the budget of {view.budget} workers ({named})"
        )


def invalid_reason(allocation: object, view: ClusterView) -> str | None:
    """Why `allocation` is not a valid allocation for `view`, or None when it is.

    Valid: a mapping with exactly the view's queue names, each a non-negative int (numpy ints
    accepted, bools and floats not), summing to at most the budget.
    """
    if not isinstance(allocation, Mapping):
        return f"allocation is a {type(allocation).__name__}, not a mapping"
    names = {q.name for q in view.queues}
    missing = sorted(names - set(allocation))
    if missing:
        return f"allocation misses queues {missing}"
    unknown = sorted(str(k) for k in set(allocation) - names)
    if unknown:
        return f"allocation names unknown queues {unknown}"
    for name, value in allocation.items():
        if type(value) is int and value >= 0:  # the common case, without the slower ABC checks
            continue
        if isinstance(value, float) and math.isnan(value):
            return f"allocation of queue {name!r} is NaN"
        if isinstance(value, bool) or not isinstance(value, Integral):
            return f"allocation of queue {name!r} is {value!r}, not an int"
        if value < 0:
            return f"allocation of queue {name!r} is negative ({value})"
    total = sum(int(v) for v in allocation.values())
    if total > view.budget:
        return f"allocation uses {total} workers, over the budget of {view.budget}"
    return None


def _apply_hysteresis(target: np.ndarray, current: np.ndarray, workers: int) -> np.ndarray:
    """Hold a queue at its current count unless the target differs by at least `workers`."""
    if workers <= 1:
        return target
    held: np.ndarray = np.where(np.abs(target - current) < workers, current, target)
    return held


def _apply_bounds(target: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Clip each queue into [min, max] (`high` is a large number where there is no max)."""
    clipped: np.ndarray = np.minimum(np.maximum(target, low), high)
    return clipped


def _apply_budget(target: np.ndarray, low: np.ndarray, budget: int) -> np.ndarray:
    """Cut the total to the budget, taking from each queue in proportion to its excess over its min.

    Feasible because the minimums fit the budget (checked before); the cuts are a largest-remainder
    split of the overshoot over the excesses, and no cut exceeds its excess (see largest_remainder).
    """
    over = int(target.sum()) - budget
    if over <= 0:
        return target
    excess = target - low
    cut: np.ndarray = target - largest_remainder(excess, over)
    return cut


def _apply_move_cap(
    target: np.ndarray, current: np.ndarray, low: np.ndarray, high: np.ndarray, cap: int | None
) -> np.ndarray:
    """Keep at most `cap` workers of increase (moves), the largest increases first.

    Raising a queue to its minimum is always kept, and counts toward the cap. When increases are
    cut, as many workers of the planned decreases are given back (they were freed to fund the moves
    that no longer happen), proportionally to the decreases, so cut moves do not leave workers idle.
    """
    if cap is None:
        return target
    increase = np.maximum(target - current, 0)
    if int(increase.sum()) <= cap:
        return target
    mandatory = np.minimum(increase, np.maximum(low - current, 0))
    optional = increase - mandatory
    allowed = max(cap - int(mandatory.sum()), 0)
    # Largest optional increases first, earlier queue on ties; the last one may be partial.
    order = np.lexsort((np.arange(len(target)), -optional))
    ordered = optional[order]
    before = np.cumsum(ordered) - ordered
    kept = np.zeros_like(optional)
    kept[order] = np.clip(allowed - before, 0, ordered)
    capped = current + mandatory + kept
    capped = np.where(target < current, target, capped)
    # Decreases forced by a max bound stay; the rest may be given back.
    restorable = np.maximum(np.minimum(current, high) - target, 0)
    restore_total = min(int(optional.sum() - kept.sum()), int(restorable.sum()))
    if restore_total > 0:
        # Restoring at most what was cut keeps the total at or under the (budget-fitted) target's.
        capped = capped + largest_remainder(restorable, restore_total)
    result: np.ndarray = capped
    return result


@dataclass(frozen=True, slots=True)
class Intervention:
    """One guardrail that changed the proposal in a tick: its name ('hysteresis', 'bounds',
    'budget' or 'move_cap') and, per queue it changed, the workers before and after it."""

    guardrail: str
    changes: dict[str, tuple[int, int]]

    def describe(self) -> str:
        """One line: 'bounds: a 5->3, b 0->1'."""
        cells = ", ".join(f"{q} {a}->{b}" for q, (a, b) in self.changes.items())
        return f"{self.guardrail}: {cells}"


def _note(
    out: list[Intervention],
    guardrail: str,
    before: np.ndarray,
    after: np.ndarray,
    names: list[str],
) -> None:
    """Append what `guardrail` changed (nothing when it changed nothing)."""
    if np.array_equal(before, after):
        return
    changed = np.flatnonzero(before != after).tolist()
    out.append(
        Intervention(guardrail, {names[i]: (int(before[i]), int(after[i])) for i in changed})
    )


class Guardrails:
    """Wraps an allocator with bounds, the budget, a move cap, hysteresis and a fallback.

    `bounds` gives per-queue min/max workers and the cap on moves per tick (moves = sum of positive
    changes against the current allocation). `hysteresis_workers` h holds a queue at its current
    count unless the proposal differs from it by at least h workers (h = 1 lets every change
    through). `fallback` (square-root staffing by default) replaces a proposal that raises or is
    invalid; `last_fallback_reason` says why for the latest tick (None when the wrapped allocator's
    proposal was used) and `fallback_count` counts such ticks, for the live service to log;
    `last_proposal` is what the guardrails were given in the latest tick (the policy's, or the
    fallback's) and `last_interventions` which of them changed it, in order, and how.

    Contradictory bounds raise ValueError naming the queue: per-queue ones at construction, minimums
    over the budget at the first tick that sees them.
    """

    def __init__(
        self,
        inner: Allocator,
        bounds: AllocationBounds | None = None,
        *,
        fallback: Allocator | None = None,
        hysteresis_workers: int = 1,
    ) -> None:
        self.bounds = bounds if bounds is not None else AllocationBounds()
        _check_bounds(self.bounds)
        if hysteresis_workers < 1:
            raise ValueError(f"hysteresis_workers must be >= 1, got {hysteresis_workers}")
        self.inner = inner
        self.fallback: Allocator = fallback if fallback is not None else ProportionalAllocator()
        self.hysteresis_workers = hysteresis_workers
        # The policy in charge, so logs and comparisons read as the wrapped allocator.
        self.name: str = inner.name
        self.last_fallback_reason: str | None = None
        self.fallback_count: int = 0
        self.last_proposal: dict[str, int] = {}
        self.last_interventions: tuple[Intervention, ...] = ()

    @property
    def last_constraints(self) -> tuple[str, ...]:
        """The names of the guardrails that changed the latest tick's proposal, in pipeline
        order ('hysteresis', 'bounds', 'budget', 'move_cap')."""
        return tuple(i.guardrail for i in self.last_interventions)

    def _propose(self, view: ClusterView) -> Allocation:
        """The wrapped allocator's proposal if valid, else the fallback's, else the current one."""
        proposal, reason = _attempt(self.inner, view)
        if proposal is not None:
            self.last_fallback_reason = None
            return proposal
        self.fallback_count += 1
        fallback_proposal, fallback_reason = _attempt(self.fallback, view)
        if fallback_proposal is not None:
            self.last_fallback_reason = f"{self.inner.name}: {reason}"
            return fallback_proposal
        # Holding is always possible: the later steps bring it within bounds and budget.
        self.last_fallback_reason = (
            f"{self.inner.name}: {reason}; fallback {self.fallback.name}: {fallback_reason}; "
            "holding the current allocation"
        )
        return view.allocation()

    def allocate(self, view: ClusterView) -> Allocation:
        """The wrapped allocator's targets, constrained; always valid for `view`."""
        _check_feasible(self.bounds, view)
        proposal = self._propose(view)
        queues = view.queues
        n = len(queues)
        current = queue_column(queues, "allocated").astype(np.int64)
        target = np.fromiter((int(proposal[q.name]) for q in queues), dtype=np.int64, count=n)
        low = np.fromiter((_min_of(self.bounds, q.name) for q in queues), dtype=np.int64, count=n)
        no_max = max(view.budget, 0)
        high = np.fromiter(
            (m if (m := _max_of(self.bounds, q.name)) is not None else no_max for q in queues),
            dtype=np.int64,
            count=n,
        )
        names = [q.name for q in queues]
        self.last_proposal = dict(zip(names, target.tolist(), strict=True))
        steps: list[Intervention] = []
        held = _apply_hysteresis(target, current, self.hysteresis_workers)
        _note(steps, "hysteresis", target, held, names)
        bounded = _apply_bounds(held, low, high)
        _note(steps, "bounds", held, bounded, names)
        funded = _apply_budget(bounded, low, view.budget)
        _note(steps, "budget", bounded, funded, names)
        capped = _apply_move_cap(funded, current, low, high, self.bounds.max_moves_per_tick)
        _note(steps, "move_cap", funded, capped, names)
        self.last_interventions = tuple(steps)
        return dict(zip(names, capped.tolist(), strict=True))


def guardrails_for(layout: Layout, inner: Allocator) -> Guardrails:
    """`inner` inside a layout's guardrails (policies.schema): each queue's min and max workers,
    the move cap, the hysteresis and the fallback allocator. The live controller and the simulator
    both build their guardrails here, so a scenario's limits mean the same when it is served."""
    allocation = layout.allocation
    return Guardrails(
        inner,
        layout.bounds(),
        fallback=make_allocator(allocation.fallback),
        hysteresis_workers=allocation.hysteresis_workers,
    )


def _attempt(allocator: Allocator, view: ClusterView) -> tuple[Allocation | None, str | None]:
    """(proposal, None) when `allocator` returns a valid allocation, else (None, why not)."""
    try:
        proposal = allocator.allocate(view)
    except Exception as exc:  # any failure of a policy must degrade to the fallback, not crash
        return None, f"raised {type(exc).__name__}: {exc}"
    reason = invalid_reason(proposal, view)
    if reason is not None:
        return None, reason
    return proposal, None
