"""Which seeds (and which part of a trace) are for training, which for tuning, which for evaluation.

This is the one place the ranges are written down. Evaluation is only honest if no policy, learned
or tuned, ever saw the arrivals it is judged on, so the ranges are disjoint by construction:

- training seeds `TRAIN_SEEDS` (0..999): RL rollouts, the Gymnasium environment's episodes, and
  the heuristics' parameter tuning (`TUNING_SEEDS`, the first few of them);
- evaluation seeds `EVAL_SEEDS` (1000..1999): `bilevel evaluate` uses the first N of them.

A trace replays the same arrivals whatever the seed (a seed only redraws service times and
within-minute placement), so for trace scenarios "held out" means a held-out time window: training
and tuning see the first `TRAIN_WINDOW_FRACTION` of the trace's span, evaluation the rest.
"""

from __future__ import annotations

from typing import Literal

TRAIN_SEEDS: range = range(0, 1000)
# Heuristic tuning replays the first training seeds: the same arrivals a learned policy trains on.
# Eight, because on a bursty scenario one seed's mean JCT can be twice another's: with two,
# bursty_switch's switch-aware grid picked a horizon that 20 other training seeds put 8% behind
# the best one, and every comparison with that heuristic would have flattered the learned policy.
TUNING_SEEDS: range = range(0, 8)
EVAL_SEEDS: range = range(1000, 2000)
# Fewer held-out seeds than this give a 95% CI too wide to rank policies (t quantile > 2.78).
MIN_EVAL_SEEDS: int = 5
DEFAULT_EVAL_SEEDS: int = 5

TRAIN_WINDOW_FRACTION: float = 0.6

# Which part of a trace a run replays: "train" (the first 60%) or "test" (the rest).
TracePart = Literal["train", "test"]


def eval_seeds(n: int) -> list[int]:
    """The first `n` held-out evaluation seeds; ValueError outside [MIN_EVAL_SEEDS, len(EVAL_SEEDS)]."""
    if n < MIN_EVAL_SEEDS:
        raise ValueError(f"need at least {MIN_EVAL_SEEDS} evaluation seeds, got {n}")
    if n > len(EVAL_SEEDS):
        raise ValueError(f"at most {len(EVAL_SEEDS)} evaluation seeds, got {n}")
    return list(EVAL_SEEDS[:n])
