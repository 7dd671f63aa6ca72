"""The learned level-1 router: a softmax over a job's eligible queues, scored by `JobQueueScorer`.

Jobs with no eligible queue get the common rejection and jobs with exactly one go there without a
network call, as with every router (`policies.routing`). Within a batch, each routed job is charged
to its queue (one more waiting job and its size in backlog) before the next job is scored, so a burst
arriving at one instant spreads instead of herding onto the queue that looked best at its start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from policies.features import job_queue_features
from policies.learned.networks import JobQueueScorer
from policies.routing import eligible_indices, rejection_for
from policies.views import JobView, QueueView, RouteDecision


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """One routing decision among several eligible queues, for the training update."""

    features: np.ndarray  # (m, F) float32, rows of the eligible queues only
    chosen: int  # index into those m rows
    log_prob: float


def _log_softmax_np(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum())
    return out


class LearnedRouter:
    """Level 1 by a `JobQueueScorer`: argmax over eligible queues, or a sample when given `rng`.

    The argmax breaks ties uniformly at random with the rng `route_batch` is given, as the
    heuristic routers do: identical idle replicas score the same and must share the jobs.

    With `record=True` every real choice (two or more eligible queues) is appended to `choices`.
    """

    name: str = "learned"

    def __init__(
        self,
        scorer: JobQueueScorer,
        *,
        rng: np.random.Generator | None = None,
        record: bool = False,
    ) -> None:
        self.scorer = scorer.eval()
        self.rng = rng
        self.record = record
        self.choices: list[RouteChoice] = []

    def route_batch(
        self,
        jobs: Sequence[JobView],
        queues: Sequence[QueueView],
        rng: np.random.Generator,
    ) -> list[RouteDecision]:
        """One decision per job, in order. Sampling uses the router's own rng, when it has one;
        ties of the argmax are broken with `rng`."""
        current = list(queues)
        decisions: list[RouteDecision] = []
        for job in jobs:
            eligible = eligible_indices(job, current)
            if not eligible:
                decisions.append(rejection_for(job, current))
                continue
            index = eligible[0] if len(eligible) == 1 else self._choose(job, current, eligible, rng)
            queue = current[index]
            size_s = job.size_estimate_s if job.size_estimate_s > 0 else queue.service_time_s
            current[index] = dataclasses.replace(
                queue, depth=queue.depth + 1, backlog_s=queue.backlog_s + size_s
            )
            decisions.append(queue.name)
        return decisions

    def _choose(
        self,
        job: JobView,
        queues: list[QueueView],
        eligible: list[int],
        tie_rng: np.random.Generator,
    ) -> int:
        features = job_queue_features(job, [queues[i] for i in eligible])
        with torch.inference_mode():
            scores = self.scorer(torch.from_numpy(features)).double().numpy()
        log_probs = _log_softmax_np(scores)
        if self.rng is None:
            best = np.flatnonzero(log_probs == log_probs.max())
            k = int(best[0]) if len(best) == 1 else int(best[tie_rng.integers(len(best))])
        else:
            k = int(self.rng.choice(len(log_probs), p=np.exp(log_probs) / np.exp(log_probs).sum()))
        if self.record:
            self.choices.append(RouteChoice(features, k, float(log_probs[k])))
        return eligible[k]
