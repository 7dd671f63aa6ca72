"""The learned level-2 allocator: each tick, a short sequence of single-worker moves, or none.

Action design. One network pass per tick scores, for every queue, how much it should receive a
worker and how much it can spare one, plus a "stop" score. The tick's decision is then a sequence of
at most `max_moves` steps; at each step the policy either stops or picks a receiver, and then a
donor (another queue, or the unassigned pool) for that receiver. Masks keep every step legal:

- a donor must hold more than its minimum, and the pool must hold a worker;
- a receiver must be below its maximum and have some donor other than itself;
- within a tick no queue both gives and takes (that would pay two model loads for nothing).

Moves conserve the budget by construction, "hold everything" is a single cheap action (stop at
once), and the per-move structure matches the cost the simulator charges: one model load per move.
The stop score grows with each move made (a learned non-negative slope), so the mode of the
distribution (used for evaluation) also stops after a few moves instead of repeating the best move.

Residual form. With base heuristics (`bases`), a gate first picks one of them (from the queue
features alone, so only the picked heuristic runs), and the moves start from its proposal instead
of the current allocation; the per-queue head sees that proposal (`policies.features.base_features`). Stopping at once then reproduces the picked heuristic exactly,
and in a fresh network the first base's gate logit and the stop logit dominate, so an untrained
residual allocator *is* its first base in deterministic mode. Training only has to learn which
heuristic suits the situation and where a correction (undoing a needless switch, moving ahead of a
burst) pays.

Target head. A residual network may also have a target head (`AllocatorNetConfig.target_head`):
one more gate option, after the bases, whose proposal is the network's own split of the budget.
A second equivariant network turns each queue's features and its burst regime (its observed rate
against its own slow average, `policies.regime`) into target-share logits; the shares are rounded to
whole workers by largest remainder, raised to a stability floor (floor(load) + 1 workers per loaded
queue, at its calm rate) and applied through the regime allocator's hold rule. That head
is fitted by imitating a regime table found by policy search (`policies.learned.target_distill`);
the gate learns when to use it, and the moves correct it, like any base.

Forecast. With a rate forecaster (`policies.learned.forecast`), the view the bases and the network
see carries the learned forecast of each queue's arrival rate over the next few model loads
instead of the current estimate; everything else in the view is as observed.

Sampling happens in numpy on one view (fast enough for 64 queues in well under a millisecond);
`moves_log_prob` recomputes the same log-probabilities in torch, batched, for the training update.
Both use the masks of `_masks_np` / `_masks_torch`, which must stay in step (a unit test checks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from policies.allocation import largest_remainder
from policies.features import N_QUEUE_FEATURES, base_features, queue_features
from policies.learned.forecast import RateForecaster
from policies.learned.networks import QueueSetNet, QueueSetNetNp, QueueSetOutput, QueueSetOutputNp
from policies.regime import (
    SlowRates,
    calm_loads,
    hold_targets,
    regime_features,
    stability_floor,
    with_floor,
)
from policies.views import Allocation, AllocationBounds, Allocator, ClusterView, queue_column

# Codes in the receiver column of a recorded move sequence.
STOP = -1  # the policy chose to stop at this step (or had no legal move, which forces a stop)
UNUSED = -2  # the step was never reached
# A finite stand-in for -inf in masked logits: exp() of it is exactly 0 in float32 and float64,
# and unlike -inf it never produces 0 * inf = NaN in entropies or their gradients.
_MASKED = -1.0e9


@dataclass(frozen=True, slots=True)
class TickDecision:
    """One tick's observation and sampled moves, all the training update needs to re-score it."""

    features: np.ndarray  # (n, F) float32, the network's input for the view
    # (n,) int64, workers per queue before the moves: the current allocation, or the base's proposal
    counts: np.ndarray
    free: int  # unassigned workers before the moves
    low: np.ndarray  # (n,) int64, per-queue minimum the masks respect
    high: np.ndarray  # (n,) int64, per-queue maximum the masks respect
    # (max_moves, 2) int64: (receiver, donor) per step; receiver STOP / UNUSED as above, donor n
    # means the unassigned pool.
    moves: np.ndarray
    log_prob: float  # of the gate's pick and the moves together
    # Index of the gate option picked (whose proposal `counts` is): a base heuristic, or the target
    # head after them; -1 when not residual.
    base: int = -1
    # (n, F + R) float32, the target head's input (queue and regime features); None without one.
    target_features: np.ndarray | None = None


def _log_softmax_np(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum())
    return out


def _pick(log_probs: np.ndarray, rng: np.random.Generator | None) -> int:
    """Argmax (first on ties) without an rng, else a sample by inverse CDF."""
    if rng is None:
        return int(np.argmax(log_probs))
    cdf = np.cumsum(np.exp(log_probs))
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def _masks_np(
    counts: np.ndarray,
    free: int,
    low: np.ndarray,
    high: np.ndarray,
    gave: np.ndarray,
    got: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(receiver_ok (n,), donor_ok (n+1,) with the pool last) for the next step."""
    donor_ok = (counts > low) & ~got
    n_donors = int(donor_ok.sum()) + (free > 0)
    receiver_ok = (counts < high) & ~gave & ((n_donors - donor_ok) > 0)
    return receiver_ok, np.append(donor_ok, free > 0)


def _apply_move(
    counts: np.ndarray, got: np.ndarray, gave: np.ndarray, free: int, r: int, d: int
) -> int:
    """One worker to queue `r` from queue `d`, or from the free pool when `d` is past the last
    queue; marks both ends (a queue that got may not give in the same tick, and the reverse).
    Returns the free workers left."""
    counts[r] += 1
    got[r] = True
    if d < len(counts):
        counts[d] -= 1
        gave[d] = True
        return free
    return free - 1


def choose_moves(
    out: QueueSetOutputNp,
    counts: np.ndarray,
    free: int,
    low: np.ndarray,
    high: np.ndarray,
    max_moves: int,
    rng: np.random.Generator | None,
) -> tuple[np.ndarray, float, np.ndarray]:
    """Samples (with `rng`) or takes the mode of (without) one tick's moves for a single view.

    Returns (moves (max_moves, 2), log-probability of them, counts after them).
    """
    n = len(counts)
    receiver = out.receiver_logits
    donor = np.append(out.donor_logits, out.pool_logit)
    stop = out.stop_logit
    slope = out.stop_slope
    counts = counts.copy()
    gave = np.zeros(n, dtype=bool)
    got = np.zeros(n, dtype=bool)
    moves = np.full((max_moves, 2), UNUSED, dtype=np.int64)
    log_prob = 0.0
    for k in range(max_moves):
        receiver_ok, donor_ok = _masks_np(counts, free, low, high, gave, got)
        step = _log_softmax_np(
            np.append(np.where(receiver_ok, receiver, _MASKED), stop + k * slope)
        )
        r = _pick(step, rng)
        log_prob += float(step[r])
        if r == n:
            moves[k] = (STOP, 0)
            break
        donor_ok[r] = False
        donor_step = _log_softmax_np(np.where(donor_ok, donor, _MASKED))
        d = _pick(donor_step, rng)
        log_prob += float(donor_step[d])
        moves[k] = (r, d)
        free = _apply_move(counts, got, gave, free, r, d)
    return moves, log_prob, counts


def moves_toward(
    counts: np.ndarray,
    free: int,
    target: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    max_moves: int,
) -> np.ndarray:
    """The moves (in `choose_moves`' recorded form) that take `counts` toward `target` under the
    same masks: each step gives a worker to the queue furthest below its target, from the pool if
    it holds one, else from the queue furthest above its target; stop when no queue is below
    target or no donor is above it. Used to label a teacher allocator's decision for imitation.
    """
    n = len(counts)
    counts = counts.copy()
    gave = np.zeros(n, dtype=bool)
    got = np.zeros(n, dtype=bool)
    moves = np.full((max_moves, 2), UNUSED, dtype=np.int64)
    for k in range(max_moves):
        receiver_ok, donor_ok = _masks_np(counts, free, low, high, gave, got)
        deficit = np.where(receiver_ok, target - counts, 0)
        surplus = np.where(donor_ok[:n], counts - target, 0)
        r = int(np.argmax(deficit))
        if deficit[r] <= 0:
            moves[k] = (STOP, 0)
            break
        surplus[r] = 0
        if donor_ok[n]:
            d = n
        elif surplus.max() > 0:
            d = int(np.argmax(surplus))
        else:
            moves[k] = (STOP, 0)
            break
        moves[k] = (r, d)
        free = _apply_move(counts, got, gave, free, r, d)
    return moves


def moves_log_prob(
    out: QueueSetOutput,
    counts: torch.Tensor,
    free: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    moves: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability (summed over the steps taken) and mean entropy per step of recorded moves.

    The entropy is averaged over steps, not summed: a summed bonus would pay the policy for making
    more moves, each of which costs a model load.

    Batched over B views of the same queue count: counts/low/high (B, n) int64, free (B,) int64,
    moves (B, K, 2) as `choose_moves` records them. Differentiable in the network outputs.
    """
    batch, n = counts.shape
    rows = torch.arange(batch)
    counts = counts.clone()
    free = free.clone()
    gave = torch.zeros(batch, n, dtype=torch.bool)
    got = torch.zeros(batch, n, dtype=torch.bool)
    active = torch.ones(batch, dtype=torch.bool)
    donor_logits = torch.cat([out.donor_logits, out.pool_logit[:, None]], dim=1)
    log_prob = torch.zeros(batch)
    entropy = torch.zeros(batch)
    steps = torch.zeros(batch)
    for k in range(moves.shape[1]):
        donor_ok_q = (counts > low) & ~got
        pool_ok = free > 0
        n_donors = donor_ok_q.sum(dim=1) + pool_ok.long()
        receiver_ok = (counts < high) & ~gave & ((n_donors[:, None] - donor_ok_q.long()) > 0)
        stop_k = out.stop_logit + k * out.stop_slope
        step_logits = torch.cat(
            [out.receiver_logits.masked_fill(~receiver_ok, _MASKED), stop_k[:, None]], dim=1
        )
        step = torch.log_softmax(step_logits, dim=1)
        r = moves[:, k, 0]
        d = moves[:, k, 1]
        is_move = active & (r >= 0)
        step_lp = step[rows, torch.where(r >= 0, r, n)]
        log_prob = log_prob + torch.where(active, step_lp, 0.0)
        steps = steps + active.float()
        entropy = entropy + torch.where(active, -(step.exp() * step).sum(dim=1), 0.0)

        donor_ok = torch.cat([donor_ok_q, pool_ok[:, None]], dim=1)
        donor_ok[rows, r.clamp(min=0)] &= ~is_move
        # Rows without a move get an all-legal mask so their (ignored) softmax stays finite.
        donor_ok |= ~is_move[:, None]
        donor_step = torch.log_softmax(donor_logits.masked_fill(~donor_ok, _MASKED), dim=1)
        log_prob = log_prob + torch.where(is_move, donor_step[rows, d.clamp(0, n)], 0.0)
        entropy = entropy + torch.where(is_move, -(donor_step.exp() * donor_step).sum(dim=1), 0.0)

        into = torch.nn.functional.one_hot(r.clamp(min=0), n).bool() & is_move[:, None]
        taken = torch.nn.functional.one_hot(d.clamp(0, n), n + 1).bool() & is_move[:, None]
        counts = counts + into.long() - taken[:, :n].long()
        free = free - taken[:, n].long()
        got |= into
        gave |= taken[:, :n]
        active = is_move
    return log_prob, entropy / steps.clamp(min=1.0)


def shares_to_workers(logits: np.ndarray, budget: int) -> np.ndarray:
    """The target head's logits (n,) as whole workers: softmax shares of `budget`, rounded by
    largest remainder."""
    return largest_remainder(np.exp(logits - logits.max()), budget)


def _proposal(base: Allocator, view: ClusterView, budget: int) -> np.ndarray:
    """A base heuristic's allocation as counts in queue order, fitted into the budget."""
    wanted = base.allocate(view)
    counts = np.fromiter(
        (max(wanted.get(q.name, q.allocated), 0) for q in view.queues), np.int64, len(view.queues)
    )
    return largest_remainder(counts, budget) if int(counts.sum()) > budget else counts


def gate_log_prob(
    gate_logits: torch.Tensor, base: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability, entropy) of the gate's recorded picks `base` (B,) under `gate_logits`
    (B, K); zeros for a network without bases (K = 0)."""
    if gate_logits.shape[1] == 0:
        zero = torch.zeros(gate_logits.shape[0])
        return zero, zero
    log_probs = torch.log_softmax(gate_logits, dim=1)
    picked = log_probs.gather(1, base.clamp(min=0)[:, None]).squeeze(1)
    return picked, -(log_probs.exp() * log_probs).sum(dim=1)


def bound_arrays(
    view: ClusterView, bounds: AllocationBounds | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-queue (min, max) worker counts of `bounds` for the view's queues (max = budget if none)."""
    n = len(view.queues)
    if bounds is None:
        return np.zeros(n, dtype=np.int64), np.full(n, max(view.budget, 0), dtype=np.int64)
    low = np.fromiter(
        (bounds.min_workers.get(q.name, bounds.default_min) for q in view.queues), np.int64, n
    )
    no_max = max(view.budget, 0)

    def high_of(name: str) -> int:
        m = bounds.max_workers.get(name, bounds.default_max)
        return no_max if m is None else m

    high = np.fromiter((high_of(q.name) for q in view.queues), np.int64, n)
    return low, high


class LearnedAllocator:
    """Level 2 by a `QueueSetNet`: up to `max_moves` single-worker moves per tick.

    Deterministic (the mode of each step) unless `rng` is given, in which case it samples; with
    `record=True` every tick's decision is appended to `decisions` for training. `bounds` only
    shapes the masks (a move never takes a queue below its minimum or above its maximum); the hard
    enforcement stays with `policies.guardrails.Guardrails`, which should wrap this allocator as any
    other. If the budget shrank below the current allocation, it is first scaled down
    proportionally, then the moves apply. With `bases` (the heuristics a residual network was built
    for, in its config's order) the moves start from the proposal of the one the gate picks (see
    the module docstring). Only the picked base runs each tick, so the bases should be stateless
    (switch-aware MaxWeight, proportional and static are; the target-ongoing autoscaler is not).
    With a `forecaster` (`policies.learned.forecast`), the bases and the network see its forecast
    as each queue's arrival rate. `force_base` makes the gate always pick that base (training
    uses it, with `max_moves=0`, to score each base as the policy would run it).
    """

    name: str = "learned"

    def __init__(
        self,
        net: QueueSetNet,
        *,
        max_moves: int = 4,
        bounds: AllocationBounds | None = None,
        rng: np.random.Generator | None = None,
        record: bool = False,
        bases: Sequence[Allocator] = (),
        forecaster: RateForecaster | None = None,
        force_base: int | None = None,
    ) -> None:
        if len(bases) != len(net.config.bases):
            raise ValueError(
                f"the network was built for {len(net.config.bases)} base heuristics, "
                f"got {len(bases)}"
            )
        if max_moves < 0:
            raise ValueError(f"max_moves must be >= 0, got {max_moves}")
        n_options = net.config.n_options
        if force_base is not None and not 0 <= force_base < n_options:
            raise ValueError(
                f"force_base must index one of the {n_options} gate options "
                f"({len(bases)} bases{', then the target head' if net.config.target_head else ''})"
                f", got {force_base}"
            )
        self.net = net.eval()
        # The decision path runs on a numpy snapshot of the weights (see QueueSetNetNp).
        self._forward = QueueSetNetNp(net)
        self.bounds = bounds
        if bounds is not None and bounds.max_moves_per_tick is not None:
            max_moves = min(max_moves, bounds.max_moves_per_tick)
        self.max_moves = max_moves
        self.rng = rng
        self.record = record
        self.bases = tuple(bases)
        self.forecaster = forecaster
        self.force_base = force_base
        self.decisions: list[TickDecision] = []
        # The target head's regime features need each queue's slow rate average, kept per run.
        self.slow_rates = SlowRates(net.config.slow_s) if net.config.target_head else None

    def _own_targets(
        self, view: ClusterView, target_features: np.ndarray, loads: np.ndarray, budget: int
    ) -> np.ndarray:
        """The target head's proposal: its shares of the budget in whole workers, raised to the
        stability floor of the calm `loads` and passed through the hold rule, as the regime
        allocator does (`policies.regime`)."""
        with np.errstate(all="ignore"):
            logits = self._forward.target_logits(target_features)
        if not np.isfinite(logits).all():
            raise ValueError("the allocator network produced non-finite outputs")
        targets = with_floor(shares_to_workers(logits, budget), stability_floor(loads, budget))
        current = queue_column(view.queues, "allocated").astype(np.int64)
        depth = queue_column(view.queues, "depth").astype(np.int64)
        counts = hold_targets(current, targets, depth, self.net.config.target_hold)
        return largest_remainder(counts, budget) if int(counts.sum()) > budget else counts

    def allocate(self, view: ClusterView) -> Allocation:
        """The current allocation after this tick's moves; every queue covered, within budget."""
        n = len(view.queues)
        if n == 0:
            return {}
        budget = max(view.budget, 0)
        # Regimes are read from the observed rates, before the forecast replaces them.
        slow = self.slow_rates.update(view) if self.slow_rates is not None else None
        if self.forecaster is not None:
            view = self.forecaster.forecast_view(view)
        features = queue_features(view)
        target_features = (
            None
            if slow is None
            else np.concatenate([features, regime_features(view, *slow)], axis=1)
        )
        low, high = bound_arrays(view, self.bounds)
        with np.errstate(all="ignore"):
            encoding = self._forward.encode(features)
        if not np.isfinite(encoding.glob).all():
            # Raised, not patched over: guardrails then use their fallback and log why.
            raise ValueError("the allocator network produced non-finite outputs")
        base, log_prob = -1, 0.0
        if self.bases:
            # The gate picks first, so only the picked heuristic runs this tick.
            gate = _log_softmax_np(encoding.glob[3:])
            base = _pick(gate, self.rng) if self.force_base is None else self.force_base
            log_prob = float(gate[base])
            if base < len(self.bases):
                counts = _proposal(self.bases[base], view, budget)
            else:
                assert target_features is not None
                assert slow is not None
                counts = self._own_targets(view, target_features, calm_loads(view, *slow), budget)
            features = np.concatenate([features, base_features(view, counts)], axis=1)
        else:
            counts = queue_column(view.queues, "allocated").astype(np.int64)
            if int(counts.sum()) > budget:
                counts = largest_remainder(counts, budget)
        with np.errstate(all="ignore"):
            out = self._forward.heads(encoding, features[:, N_QUEUE_FEATURES:])
        if not (np.isfinite(out.receiver_logits).all() and np.isfinite(out.donor_logits).all()):
            raise ValueError("the allocator network produced non-finite outputs")
        free = budget - int(counts.sum())
        moves, moves_lp, after = choose_moves(
            out, counts, free, low, high, self.max_moves, self.rng
        )
        if self.record:
            self.decisions.append(
                TickDecision(
                    features, counts, free, low, high, moves, log_prob + moves_lp, base,
                    target_features,
                )
            )  # fmt: skip
        return {q.name: int(c) for q, c in zip(view.queues, after.tolist(), strict=True)}
