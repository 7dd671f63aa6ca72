"""A training run's wall-clock budget, and what its episodes have cost so far.

Every stage of `policies.learned.ppo.train` asks the budget before it starts a batch of episodes,
validation included, so `minutes` bounds the whole run. The cost of a batch is predicted from the
episodes run so far (`meter` wraps the rollout executor and times every batch): the wall seconds
per episode, with whatever parallelism the executor has, times the batch's episodes. The
prediction is crude (episodes differ in length) but every stage's batches are alike, and a batch
that nothing predicts yet (the run's first) is allowed once, so the budget holds to within one
batch of the first stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from policies.learned.rollout import MapRollouts, RolloutResult, RolloutTask


@dataclass
class Budget:
    """`total_s` wall seconds from the moment it is made, read from `clock`."""

    total_s: float
    clock: Callable[[], float] = time.monotonic
    started_s: float = field(init=False)
    episodes: int = field(default=0, init=False)
    episodes_wall_s: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.started_s = self.clock()

    def elapsed_s(self) -> float:
        return self.clock() - self.started_s

    def remaining_s(self) -> float:
        return self.total_s - self.elapsed_s()

    def fraction(self) -> float:
        """Elapsed share of the budget, at most 1 (1 for a budget of 0)."""
        return min(self.elapsed_s() / self.total_s, 1.0) if self.total_s > 0 else 1.0

    def episode_s(self) -> float | None:
        """Mean wall seconds per episode so far (None before the first batch)."""
        return self.episodes_wall_s / self.episodes if self.episodes else None

    def predict_s(self, episodes: int) -> float:
        """Predicted wall seconds of a batch of `episodes` (0 while nothing is measured)."""
        per_episode_s = self.episode_s()
        return 0.0 if per_episode_s is None else episodes * per_episode_s

    def affords(self, episodes: int, also_s: float = 0.0) -> bool:
        """True when a batch of `episodes`, plus `also_s` more seconds, is predicted to end
        within the budget (always, while there is time left and nothing is measured)."""
        remaining_s = self.remaining_s()
        return remaining_s > 0 and self.predict_s(episodes) + also_s <= remaining_s

    def meter(self, map_rollouts: MapRollouts) -> MapRollouts:
        """`map_rollouts` that adds each batch's episodes and wall time to this budget."""

        def timed(tasks: Sequence[RolloutTask]) -> list[RolloutResult]:
            started_s = self.clock()
            results = map_rollouts(tasks)
            self.episodes += len(tasks)
            self.episodes_wall_s += self.clock() - started_s
            return results

        return timed
