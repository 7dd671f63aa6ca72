"""Level 2 heuristics: every tick, a target number of workers per queue.

Each allocator is a small class with a `name` and `allocate(view) -> {queue: workers}` that covers
every queue of the view with a non-negative int and never exceeds `view.budget`. All are
deterministic given the view and their own state; ties go to the earlier queue. Bounds, move caps
and fallbacks are not their business: `policies.guardrails.Guardrails` adds those around any of them.

Moving a worker to another queue costs that queue's `model_load_s` of dead time; only the
switch-aware MaxWeight prices it explicitly, the others rely on guardrails (hysteresis, move caps).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from policies.views import Allocation, ClusterView, QueueView, queue_column

# --- shared helpers ---------------------------------------------------------------------------


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Split `total` workers into non-negative ints proportional to `weights`, summing to `total`.

    Hamilton's method: floors of the exact quotas, then one more to the largest remainders (earlier
    index first on ties). Non-finite or negative weights count as 0; all-zero weights split equally.
    When the weights are ints and `total <= sum(weights)` no queue gets more than its weight, since
    a quota below an integer weight rounds up to at most that weight; scaling down relies on this.
    """
    n = len(weights)
    if n == 0 or total <= 0:
        return np.zeros(n, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    w = np.where(np.isfinite(w) & (w > 0.0), w, 0.0)
    w_sum = float(w.sum())
    if w_sum <= 0.0:
        w = np.ones(n)
        w_sum = float(n)
    quota = w * (total / w_sum)
    counts = np.floor(quota).astype(np.int64)
    short = total - int(counts.sum())
    if short != 0:
        # Stable sort so equal remainders go to the earlier queue; `short` is in (-n, n) even after
        # float rounding, and negative only in pathological rounding, handled symmetrically.
        order = np.argsort(-(quota - counts), kind="stable")
        if short > 0:
            counts[order[:short]] += 1
        else:
            taken = [i for i in order[::-1] if counts[i] > 0][:-short]
            counts[taken] -= 1
    return counts


def _column(queues: tuple[QueueView, ...], attr: str) -> np.ndarray:
    return queue_column(queues, attr)


def _current(view: ClusterView) -> np.ndarray:
    return queue_column(view.queues, "allocated").astype(np.int64)


def _as_allocation(view: ClusterView, counts: np.ndarray) -> Allocation:
    return {q.name: int(c) for q, c in zip(view.queues, counts.tolist(), strict=True)}


def _fit_to_budget(counts: np.ndarray, budget: int) -> np.ndarray:
    """`counts` unchanged when they fit the budget, else scaled down proportionally (each <= before)."""
    if int(counts.sum()) <= budget:
        return counts
    return largest_remainder(counts, max(budget, 0))


def hold_allocation(view: ClusterView) -> Allocation:
    """The current allocation, scaled down proportionally if the budget shrank below it."""
    return _as_allocation(view, _fit_to_budget(_current(view), view.budget))


# --- static -----------------------------------------------------------------------------------


class StaticAllocator:
    """Fixed shares of the budget, rounded by largest remainder so they sum exactly to it.

    `shares` maps queue names to non-negative weights (normalised over the queues present; a queue
    missing from the map gets 0). None, or all-zero weights for the queues present, means equal shares.
    """

    name: str = "static"

    def __init__(self, shares: Mapping[str, float] | None = None) -> None:
        if shares is not None:
            for queue, share in shares.items():
                if not math.isfinite(share) or share < 0:
                    raise ValueError(
                        f"share of queue {queue!r} must be finite and >= 0, got {share}"
                    )
        self.shares: dict[str, float] | None = dict(shares) if shares is not None else None

    def allocate(self, view: ClusterView) -> Allocation:
        """Budget split by the fixed shares; ignores load entirely."""
        shares = self.shares
        if shares is None:
            weights = np.ones(len(view.queues))
        else:
            weights = np.array([shares.get(q.name, 0.0) for q in view.queues], dtype=np.float64)
        return _as_allocation(view, largest_remainder(weights, view.budget))


# --- proportional / square-root staffing ------------------------------------------------------


class ProportionalAllocator:
    """Square-root staffing: queue i wants a_i + beta*sqrt(a_i) workers, a_i its offered load.

    a_i = arrival rate * mean service time (Erlangs). The square-root safety margin keeps the
    probability of waiting roughly constant as load grows (Halfin-Whitt regime); beta trades
    waiting against over-provisioning. The wanted numbers are scaled to the whole budget by largest
    remainder, and every queue with load or waiting work gets at least one worker while the budget
    allows (a queue with jobs and no worker waits forever). With no load and no work anywhere, the
    current allocation is held so idle workers are not moved for nothing.
    """

    name: str = "proportional"

    def __init__(self, beta: float = 1.0) -> None:
        if not math.isfinite(beta) or beta < 0:
            raise ValueError(f"beta must be finite and >= 0, got {beta}")
        self.beta = beta

    def staffing(self, view: ClusterView) -> np.ndarray:
        """Unscaled square-root staffing level of each queue, a + beta*sqrt(a)."""
        offered = _column(view.queues, "arrival_rate_per_s") * _column(
            view.queues, "service_time_s"
        )
        offered = np.maximum(offered, 0.0)
        staffing: np.ndarray = offered + self.beta * np.sqrt(offered)
        return staffing

    def allocate(self, view: ClusterView) -> Allocation:
        """Budget split by square-root staffing, at least one worker per queue with work."""
        wanted = self.staffing(view)
        needy = (wanted > 0.0) | (_column(view.queues, "depth") > 0.0)
        needy |= _column(view.queues, "workers_busy") > 0.0
        if not needy.any():
            return hold_allocation(view)
        counts = _proportional_with_floor(wanted, needy, _current(view), view.budget)
        return _as_allocation(view, counts)


def _proportional_with_floor(
    weights: np.ndarray, floor_mask: np.ndarray, current: np.ndarray, total: int
) -> np.ndarray:
    """`total` split proportionally to `weights`, with at least 1 for every `floor_mask` queue.

    Water-filling: a floored queue whose proportional share falls below one worker is pinned at one
    and the rest is re-split among the others, until no share falls below one (each round pins at
    least one queue, so at most n rounds; usually one). Budget with no weight left to follow goes to
    the current holders. When there are more floored queues than workers, the heaviest get one.
    """
    n = len(weights)
    counts = np.zeros(n, dtype=np.int64)
    n_floor = int(floor_mask.sum())
    if n_floor >= total:
        # Heaviest floored queues first, earlier index on ties.
        order = np.lexsort((np.arange(n), -weights))
        chosen = [i for i in order if floor_mask[i]][:total]
        counts[chosen] = 1
        return counts
    pinned = np.zeros(n, dtype=bool)
    for _ in range(n):
        free = ~pinned
        remaining = total - int(pinned.sum())
        free_weight = float(weights[free].sum())
        share = np.zeros(n)
        if free_weight > 0.0:
            share[free] = weights[free] * (remaining / free_weight)
        newly = free & floor_mask & (share < 1.0)
        if not newly.any():
            break
        pinned |= newly
    free = ~pinned
    remaining = total - int(pinned.sum())
    counts[pinned] = 1
    free_weights = weights[free]
    if float(free_weights.sum()) <= 0.0:
        free_weights = current[free].astype(np.float64)
    counts[free] = largest_remainder(free_weights, remaining)
    return counts


# --- Ray Serve-style target ongoing requests --------------------------------------------------


@dataclass(slots=True)
class _ScalerState:
    """Ray Serve's per-deployment autoscaling state, kept for one queue."""

    # The queue's target worker count: the last decision (Ray's `target_num_replicas`). The
    # allocation can fall short of it while the budget is taken by other queues.
    target: int
    # Consecutive ticks wishing to scale up (> 0) or down (< 0); 0 after a decision or no wish.
    decision_counter: int = 0
    # (now_s, jobs in system) at the recent ticks, for the look-back average.
    samples: deque[tuple[float, int]] = field(default_factory=deque)


class TargetOngoingRequestsAllocator:
    """Ray Serve's default autoscaling policy, run per queue: about `target_ongoing_requests` jobs
    (waiting or in service) per worker.

    Each tick, per queue, as `ray.serve.autoscaling_policy` does per deployment:

    - ongoing = jobs in system averaged over the last `look_back_period_s` (Ray averages its
      ongoing-request metric over `look_back_period_s` too);
    - desired = ongoing / target_ongoing_requests, smoothed from the running (model loaded) workers
      by the up/down smoothing factor, ceil'd, and lowered by one if smoothing would leave it stuck
      above a smaller wish;
    - the decision counter counts consecutive ticks with desired above (+1) or below (-1) the
      queue's target; a change of direction restarts it, desired == target resets it. The target
      moves to desired only once the counter passes upscale_delay_s / tick_s (up) or
      downscale_delay_s / tick_s (down) ticks, and the counter restarts after every decision;
      scaling down stops at one worker, except from exactly one to zero;
    - cold start: with no running worker, the target is held (no decision while the queue's workers
      all load) and raised to at least one worker if there are jobs.

    Each target is capped at the budget (Ray's max_replicas). When the targets fit the budget they
    are the allocation, and workers no target asks for stay unassigned, as Ray leaves capacity
    unused. When they do not fit, every queue with a target gets one worker, and the rest of the
    budget is split in proportion to the targets by D'Hondt. The split depends on the targets alone,
    so workers move only when a decision moves a target. D'Hondt is population-monotone, so a change
    of one queue's target never moves workers between the other queues.

    The delays default shorter than Ray Serve's (30 s / 600 s) because a move here costs one model
    load rather than a replica start-up; the look-back period is Ray's default. The target defaults
    to 1 job per worker, not Ray's 2: a worker here runs one job at a time (Ray's
    max_ongoing_requests = 1), and Ray's guidance keeps the target below max_ongoing_requests
    (1.0 was also its default before 2.32). At 2, one job waits behind every running one, so each
    queue is steered to about 100% utilisation and cycles between overload and scale-up.
    """

    name: str = "target_ongoing"

    def __init__(
        self,
        target_ongoing_requests: float = 1.0,
        upscale_delay_s: float = 10.0,
        downscale_delay_s: float = 60.0,
        upscale_smoothing_factor: float = 1.0,
        downscale_smoothing_factor: float = 1.0,
        look_back_period_s: float = 30.0,
    ) -> None:
        if not target_ongoing_requests > 0:
            raise ValueError(f"target_ongoing_requests must be > 0, got {target_ongoing_requests}")
        if upscale_delay_s < 0 or downscale_delay_s < 0:
            raise ValueError("upscale_delay_s and downscale_delay_s must be >= 0")
        for factor in (upscale_smoothing_factor, downscale_smoothing_factor):
            if not 0 < factor <= 1:
                raise ValueError(f"smoothing factors must be in (0, 1], got {factor}")
        if not look_back_period_s >= 0:
            raise ValueError(f"look_back_period_s must be >= 0, got {look_back_period_s}")
        self.target_ongoing_requests = target_ongoing_requests
        self.upscale_delay_s = upscale_delay_s
        self.downscale_delay_s = downscale_delay_s
        self.upscale_smoothing_factor = upscale_smoothing_factor
        self.downscale_smoothing_factor = downscale_smoothing_factor
        self.look_back_period_s = look_back_period_s
        self._states: dict[str, _ScalerState] = {}

    def desired_workers(self, queue: QueueView, ongoing: float | None = None) -> int:
        """Ray's smoothed desired count for `ongoing` jobs (default: the queue's now), before the
        delays and the budget; smoothing starts from the running (model loaded) workers."""
        running = queue.workers_ready
        if ongoing is None:
            ongoing = float(queue.in_system)
        raw = ongoing / self.target_ongoing_requests
        delta = raw - running
        factor = self.upscale_smoothing_factor if delta > 0 else self.downscale_smoothing_factor
        desired = math.ceil(running + factor * delta)
        # Smoothing can leave a downscale stuck at the running count; Ray then goes down by one.
        if math.ceil(raw) < running and desired == running:
            desired -= 1
        return max(desired, 0)

    def _periods(self, delay_s: float, tick_s: float) -> int:
        """The delay in ticks, as Ray counts control-loop periods (a hair of float slack)."""
        return int(delay_s / tick_s + 1e-9) if tick_s > 0 else 0

    def _decide(self, queue: QueueView, state: _ScalerState, view: ClusterView) -> int:
        """The queue's new target (Ray's `_apply_delay_logic` after the cold-start fast path)."""
        samples = state.samples
        samples.append((view.now_s, queue.in_system))
        while len(samples) > 1 and samples[0][0] <= view.now_s - self.look_back_period_s:
            samples.popleft()
        ongoing = sum(n for _, n in samples) / len(samples)
        if queue.workers_ready == 0:
            if ongoing > 0:
                return max(math.ceil(self.upscale_smoothing_factor), state.target)
            return state.target
        desired = min(self.desired_workers(queue, ongoing), max(view.budget, 0))
        if desired > state.target:
            state.decision_counter = max(state.decision_counter, 0) + 1
            if state.decision_counter > self._periods(self.upscale_delay_s, view.tick_s):
                state.decision_counter = 0
                return desired
        elif desired < state.target:
            state.decision_counter = min(state.decision_counter, 0) - 1
            if state.target != 1:
                desired = max(desired, 1)
            if state.decision_counter < -self._periods(self.downscale_delay_s, view.tick_s):
                state.decision_counter = 0
                return desired
        else:
            state.decision_counter = 0
        return state.target

    def allocate(self, view: ClusterView) -> Allocation:
        """Per-queue Ray decisions, placed within the budget without robbing any queue."""
        present = {q.name for q in view.queues}
        for gone in [name for name in self._states if name not in present]:
            del self._states[gone]
        targets = np.zeros(len(view.queues), dtype=np.int64)
        for i, queue in enumerate(view.queues):
            state = self._states.get(queue.name)
            if state is None:
                state = self._states[queue.name] = _ScalerState(target=queue.allocated)
            state.target = self._decide(queue, state, view)
            targets[i] = state.target
        budget = max(view.budget, 0)
        if int(targets.sum()) <= budget:
            return _as_allocation(view, targets)
        # A function of the targets alone, so workers move only when some target moves. D'Hondt
        # is population-monotone: when one queue's target changes, no other queue gains a worker,
        # so workers never move between queues whose targets stayed put.
        # Every queue with a target first gets one worker (heaviest first if too few), so that no
        # queue is starved: with none running it could not even make a decision.
        wanting = targets > 0
        floor = np.zeros(len(targets), dtype=np.int64)
        order = np.lexsort((np.arange(len(targets)), -targets))
        floor[[i for i in order if wanting[i]][:budget]] = 1
        rest = budget - int(floor.sum())
        share = floor + _greedy_divisor(targets.astype(np.float64), targets - floor, rest)
        return _as_allocation(view, share)


# --- MaxWeight --------------------------------------------------------------------------------


def _useful_workers(view: ClusterView, horizon_s: float) -> np.ndarray:
    """Workers a queue can keep busy: one per job in system plus the arrivals expected in horizon."""
    in_system = queue_column(view.queues, "in_system")
    arrivals = np.ceil(np.maximum(_column(view.queues, "arrival_rate_per_s"), 0.0) * horizon_s)
    useful: np.ndarray = (in_system + arrivals).astype(np.int64)
    return useful


def _greedy_divisor(weights: np.ndarray, caps: np.ndarray, total: int) -> np.ndarray:
    """Give `total` workers one at a time to the queue with the largest weight / (given + 1).

    That greedy is D'Hondt's method with per-queue caps. It meets lower quota (each uncapped queue
    gets at least floor(weight * seats / weight of uncapped queues)), so the floors are handed out in
    one vectorised step, capped queues are removed and the rest re-split, and only the last few
    (< number of queues) workers go through the heap. Queues with zero weight or cap get nothing;
    ties go to the earlier queue.
    """
    n = len(weights)
    given = np.zeros(n, dtype=np.int64)
    caps = np.where(weights > 0.0, np.maximum(caps, 0), 0)
    for _ in range(n):
        active = given < caps
        remaining = total - int(given.sum())
        if remaining <= 0 or not active.any():
            return given
        active_weight = float(weights[active].sum())
        seats = remaining + int(given[active].sum())
        floors = np.floor(weights[active] * (seats / active_weight)).astype(np.int64)
        new = np.minimum(np.maximum(floors, given[active]), caps[active])
        if int(new.sum()) > seats:  # float rounding at exact quotas; fall back to the heap
            break
        if np.array_equal(new, given[active]):
            break
        given[active] = new
    remaining = total - int(given.sum())
    heap = [(-weights[i] / (given[i] + 1), i) for i in np.flatnonzero(given < caps).tolist()]
    heapq.heapify(heap)
    while remaining > 0 and heap:
        _, i = heapq.heappop(heap)
        given[i] += 1
        remaining -= 1
        if given[i] < caps[i]:
            heapq.heappush(heap, (-weights[i] / (given[i] + 1), i))
    return given


class MaxWeightAllocator:
    """Greedy MaxWeight: workers go where queue length * service rate per worker is largest.

    Weight of a queue = jobs in system / mean service time (the rate at which one worker drains it,
    times how much is waiting). The budget is handed out one worker at a time to the queue with the
    largest weight / (workers given + 1), only to queues with work and no more workers than the
    queue can keep busy this tick. Budget left over stays with the queues that hold it now (idle
    workers are not moved for no gain); if not all can stay, the queues with the costliest model load
    keep theirs first.
    """

    name: str = "maxweight"

    def allocate(self, view: ClusterView) -> Allocation:
        """MaxWeight targets for this tick."""
        queues = view.queues
        in_system = np.fromiter((q.in_system for q in queues), dtype=np.float64, count=len(queues))
        weights = in_system / np.maximum(_column(queues, "service_time_s"), 1e-9)
        caps = _useful_workers(view, view.tick_s)
        given = _greedy_divisor(weights, caps, max(view.budget, 0))
        left = max(view.budget, 0) - int(given.sum())
        if left > 0:
            keep = np.maximum(_current(view) - given, 0)
            order = np.lexsort((np.arange(len(queues)), -_column(queues, "model_load_s")))
            keep_sorted = keep[order]
            before = np.cumsum(keep_sorted) - keep_sorted
            given[order] += np.clip(left - before, 0, keep_sorted)
        return _as_allocation(view, given)


# --- switch-aware MaxWeight -------------------------------------------------------------------


def fluid_cost_job_s(
    q0: np.ndarray, net_rate_per_s: np.ndarray, horizon_s: np.ndarray
) -> np.ndarray:
    """Job-seconds in system over `horizon_s` of fluid queues: integral of max(q0 + net_rate*t, 0) dt.

    Elementwise over arrays (broadcasting); a non-positive horizon costs 0.
    """
    horizon_s = np.maximum(horizon_s, 0.0)
    net_rate_per_s = np.broadcast_to(net_rate_per_s, np.broadcast(q0, net_rate_per_s).shape)
    full = q0 * horizon_s + 0.5 * net_rate_per_s * horizon_s * horizon_s
    draining = net_rate_per_s < 0.0
    drain_s = np.full(net_rate_per_s.shape, np.inf)
    np.divide(q0, -net_rate_per_s, out=drain_s, where=draining)
    # Drained before the horizon ends: the triangle under the line, then nothing.
    partial = 0.5 * q0 * np.where(draining, drain_s, 0.0)
    cost: np.ndarray = np.where(drain_s < horizon_s, partial, full)
    return cost


@dataclass(frozen=True, slots=True)
class _FluidQueues:
    """The fluid model of all queues at the start of one tick (arrays in queue order)."""

    q0: np.ndarray  # jobs in system now
    arrival_rate_per_s: np.ndarray
    service_rate_per_s: np.ndarray  # of one worker
    load_s: np.ndarray  # dead time of a worker moved in, capped at the horizon
    useful: np.ndarray  # more workers than this cannot be kept busy
    n_now: np.ndarray  # workers assigned now
    horizon_s: float

    def cost_job_s(self, i: np.ndarray, n_now: np.ndarray, n_new: np.ndarray) -> np.ndarray:
        """Fluid job-seconds of queues `i` over the horizon with `n_now` workers serving from the
        start and `n_new` more serving only after the queue's model load."""
        lam = self.arrival_rate_per_s[i]
        mu = self.service_rate_per_s[i]
        delay_s = self.load_s[i]
        q0 = self.q0[i]
        rate_before = lam - n_now * mu
        before = fluid_cost_job_s(q0, rate_before, delay_s)
        q_at_delay = np.maximum(q0 + rate_before * delay_s, 0.0)
        rate_after = lam - (n_now + n_new) * mu
        after = fluid_cost_job_s(q_at_delay, rate_after, self.horizon_s - delay_s)
        total: np.ndarray = before + after
        return total

    def marginal_gains(self, max_added: int) -> tuple[np.ndarray, np.ndarray]:
        """(queue, gain) of every worker that could be moved in: the m-th added worker of queue i
        saves cost(n_i, m-1 new) - cost(n_i, m new); only up to the useful count or `max_added`."""
        room = np.clip(self.useful - self.n_now, 0, max_added)
        # Each cost once, for 0..room added workers; a gain is the difference of two neighbours
        # of one queue (the cost of a queue's first entry is never the minuend of another's).
        queue, m = _ragged(room + 1)
        cost = self.cost_job_s(queue, self.n_now[queue], m)
        same_queue = m[1:] > 0
        gain: np.ndarray = (cost[:-1] - cost[1:])[same_queue]
        return queue[:-1][same_queue], gain

    def marginal_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """(queue, loss) of every worker that could be moved out: taking the k-th worker from
        queue i adds cost(n_i - k) - cost(n_i - k + 1), the removal being immediate."""
        queue, k = _ragged(self.n_now)
        zero = np.zeros(len(queue))
        remaining = self.n_now[queue] - k
        loss = self.cost_job_s(queue, remaining - 1, zero) - self.cost_job_s(queue, remaining, zero)
        return queue, loss


def _ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For counts [2, 0, 3]: queue indices [0, 0, 2, 2, 2] and ranks within each [0, 1, 0, 1, 2]."""
    counts = np.maximum(counts, 0)
    queue = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(queue)) - np.repeat(starts, counts)
    return queue, rank


class SwitchAwareMaxWeightAllocator:
    """MaxWeight that pays for model loads: moves a worker only when the move pays for itself.

    Starting from the current allocation, it repeatedly takes the queue B that gains most from one
    more worker and the queue A that loses least from one fewer, and moves a worker A -> B while

        gain_B - loss_A > min_net_gain_job_s,

    where both are job-seconds in system over a horizon H under a fluid model of each queue
    (jobs q0 now, arrivals lam, per-worker service rate mu). loss_A = C_A(n_A - 1) - C_A(n_A) with
    the removal immediate; gain_B = C_B(n_B) - C_B(n_B, +1 after load_B), where the moved worker
    only serves during the last H - load_B seconds. So a long model load, or a horizon too short to
    recover it, shrinks gain_B to nothing and the worker stays.

    Why it never thrashes: C(n) = integral of max(q0 + (lam - n*mu)t, 0) dt is convex in n (the
    integrand is convex in n for every t), so for two queues in the same state the immediate marginal
    loss C(n-1) - C(n) is at least the immediate marginal gain C(n) - C(n+1), which is at least the
    delayed gain; hence with balanced load no move passes the strict inequality. The same chain shows
    a move is not undone on the next tick if the queues have not changed: after A -> B,
    gain_A (delayed) <= C_A(n_A-1) - C_A(n_A) = loss_A < gain_B <= loss_B now. A queue that received
    a worker this tick does not donate one, and vice versa.

    Convexity also makes each queue's marginal gains non-increasing and marginal losses
    non-decreasing in the number of workers moved, so the one-at-a-time greedy is the same as
    pairing the k-th largest marginal gain with the k-th smallest marginal loss for as long as the
    pair pays; that is how it runs (vectorised costs, one sort each, no Python loop per move).

    Free budget (workers assigned nowhere) goes to the largest gains with no donor loss; an
    allocation over budget sheds the workers whose removal loses least.
    """

    name: str = "switch_aware"

    def __init__(
        self,
        horizon_s: float | None = None,
        horizon_ticks: float = 4.0,
        min_net_gain_job_s: float = 0.0,
        max_moves_per_tick: int | None = None,
    ) -> None:
        if horizon_s is not None and not horizon_s > 0:
            raise ValueError(f"horizon_s must be > 0, got {horizon_s}")
        if not horizon_ticks > 0:
            raise ValueError(f"horizon_ticks must be > 0, got {horizon_ticks}")
        if min_net_gain_job_s < 0:
            raise ValueError(f"min_net_gain_job_s must be >= 0, got {min_net_gain_job_s}")
        if max_moves_per_tick is not None and max_moves_per_tick < 0:
            raise ValueError(f"max_moves_per_tick must be >= 0, got {max_moves_per_tick}")
        self.horizon_s = horizon_s
        self.horizon_ticks = horizon_ticks
        self.min_net_gain_job_s = min_net_gain_job_s
        self.max_moves_per_tick = max_moves_per_tick

    def horizon_for(self, view: ClusterView) -> float:
        """The horizon H: as configured, else the longer of `horizon_ticks` ticks and twice the
        longest model load (so that a worker moved anywhere serves at least half the horizon)."""
        if self.horizon_s is not None:
            return self.horizon_s
        longest_load_s = max((q.model_load_s for q in view.queues), default=0.0)
        return max(self.horizon_ticks * view.tick_s, 2.0 * longest_load_s)

    def _pays(self, gain_job_s: np.ndarray, loss_job_s: np.ndarray) -> np.ndarray:
        """The move rule, gain - loss > min_net_gain_job_s, elementwise, with a relative tolerance:
        where the fluid cost is linear in n (overloaded queues) equal queues give gain == loss
        exactly in theory, and float rounding must not turn that tie into a move."""
        scale = np.maximum(np.maximum(np.abs(gain_job_s), np.abs(loss_job_s)), 1.0)
        passes: np.ndarray = gain_job_s - loss_job_s > self.min_net_gain_job_s + 1e-9 * scale
        return passes

    def _model(self, view: ClusterView) -> _FluidQueues:
        queues = view.queues
        horizon_s = self.horizon_for(view)
        return _FluidQueues(
            q0=queue_column(queues, "in_system"),
            arrival_rate_per_s=np.maximum(_column(queues, "arrival_rate_per_s"), 0.0),
            service_rate_per_s=1.0 / np.maximum(_column(queues, "service_time_s"), 1e-9),
            load_s=np.clip(_column(queues, "model_load_s"), 0.0, horizon_s),
            useful=_useful_workers(view, horizon_s),
            n_now=_current(view),
            horizon_s=horizon_s,
        )

    def allocate(self, view: ClusterView) -> Allocation:
        """The current allocation, improved by the moves that pay for their model loads."""
        n = len(view.queues)
        if n == 0:
            return {}
        model = self._model(view)
        budget = max(view.budget, 0)
        gain_queue, gain = model.marginal_gains(max_added=budget)
        loss_queue, loss = model.marginal_losses()
        # Over budget: shed the cheapest removals. Free budget: fill the largest gains.
        n_shed = max(int(model.n_now.sum()) - budget, 0)
        free = budget - (int(model.n_now.sum()) - n_shed)
        # At most `free` fills and one move per loss left can use a gain: only the largest that
        # many need sorting (every gain tied with the last of them is kept, so the order of those
        # used is the full sort's).
        usable = max(free + len(loss) - n_shed, 1)
        candidates = np.arange(len(gain))
        if usable < len(gain):
            cutoff = np.partition(gain, len(gain) - usable)[len(gain) - usable]
            candidates = np.flatnonzero(gain >= cutoff)
        # Best first; equal values go to the earlier queue, and within a queue stay in rank order.
        by_gain = candidates[np.lexsort((candidates, gain_queue[candidates], -gain[candidates]))]
        by_loss = np.lexsort((np.arange(len(loss)), loss_queue, loss))
        gain_queue, gain = gain_queue[by_gain], gain[by_gain]
        loss_queue, loss = loss_queue[by_loss], loss[by_loss]

        n_fill = int(_leading_true(self._pays(gain[:free], np.zeros(min(free, len(gain))))))
        # Then pair the k-th best remaining gain with the k-th least remaining loss. Sorted that way
        # gain - loss is non-increasing in k, so the moves that pay are a prefix.
        gains_left, losses_left = gain[n_fill:], loss[n_shed:]
        pairs = min(len(gains_left), len(losses_left))
        n_moves = int(_leading_true(self._pays(gains_left[:pairs], losses_left[:pairs])))
        if self.max_moves_per_tick is not None:
            n_moves = min(n_moves, self.max_moves_per_tick)
        # No queue both gives and takes: a queue's first gain is at most its first loss (the
        # delayed gain <= immediate gain <= loss, by convexity), so if its gain pays against the
        # k-th loss, its own losses all sort after the k-th and are never paired.
        counts = model.n_now - np.bincount(loss_queue[: n_shed + n_moves], minlength=n)
        counts += np.bincount(gain_queue[: n_fill + n_moves], minlength=n)
        return _as_allocation(view, counts)


def _leading_true(mask: np.ndarray) -> int:
    """Length of the run of True at the start of `mask`."""
    if mask.all():
        return len(mask)
    return int(np.argmin(mask))
