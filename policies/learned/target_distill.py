"""Imitation of regime tables by the allocator's target head (DAgger).

The target head (`policies.learned.networks.TargetShareNet`) proposes a split of the workers from
queue and regime features; a regime table (`policies.regime`, found by
`policies.learned.regime_search`) is its teacher on the scenarios that have one. Each round records
episodes in which the policy runs its target head alone (the gate forced to it, no moves), asks the
table at every tick what targets it would set in that situation, adds those pairs to the data set,
and fits the head by cross-entropy between its shares and the table's. In the first round the
table acts; later rounds hand more episodes to the head (the fraction the table acts halves each
round, and the last round is the head's alone), so the data covers the states the head itself
reaches, where its mistakes would compound (Ross et al., AISTATS 2011).

Only the target head's weights change. No I/O here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from policies.learned.allocator import shares_to_workers
from policies.learned.policy import LearnedPolicy
from policies.learned.rollout import MapRollouts, RolloutTask
from policies.seeds import TRAIN_SEEDS
from policies.sim.scenario import Scenario


@dataclass(frozen=True)
class DistillFit:
    """How the imitation went: per round, the data set's size and the fit's mean cross-entropy,
    and on the last round's ticks, after the last fit, the fraction whose rounded targets equal
    the teacher's."""

    samples: list[int]
    cross_entropy: list[float]
    exact_targets: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "cross_entropy": self.cross_entropy,
            "exact_targets": self.exact_targets,
        }


def target_cross_entropy(logits: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """Mean over views of -sum_i share_i * log softmax(logits)_i; (B, n) each."""
    return -(shares * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def distill_targets(
    policy: LearnedPolicy,
    scenarios: Sequence[Scenario],
    teachers: Mapping[str, Mapping[str, Any]],
    map_rollouts: MapRollouts,
    rng: np.random.Generator,
    *,
    rounds: int = 4,
    episodes_per_round: int = 8,
    steps: int = 300,
    learning_rate: float = 1e-3,
    minibatch_size: int = 512,
    episode_s: float | None = None,
) -> DistillFit:
    """Fits `policy`'s target head (in place) to the regime tables `teachers` (scenario name ->
    `RegimeTargetsAllocator` parameters) on training arrivals; see the module docstring."""
    net = policy.allocator_net
    if net.target_net is None:
        raise ValueError("the policy's allocator has no target head to distill into")
    if rounds < 1 or episodes_per_round < 1 or steps < 0 or minibatch_size < 1:
        raise ValueError(
            "distillation needs rounds >= 1, episodes_per_round >= 1, steps >= 0 and "
            f"minibatch_size >= 1, got {rounds}, {episodes_per_round}, {steps}, {minibatch_size}"
        )
    labelled = [s for s in scenarios if s.name in teachers]
    if not labelled:
        raise ValueError("no scenario has a regime table to distill")
    option = len(net.config.bases)  # the target head's gate option
    optimizer = torch.optim.Adam(net.target_net.parameters(), lr=learning_rate)
    data: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = defaultdict(lambda: ([], []))
    samples: list[int] = []
    losses: list[float] = []
    last: list[tuple[np.ndarray, np.ndarray]] = []
    for k in range(rounds):
        teacher_episodes = 0 if k == rounds - 1 else math.ceil(episodes_per_round / 2**k)
        tasks = [
            RolloutTask(
                s, int(rng.integers(TRAIN_SEEDS.start, TRAIN_SEEDS.stop)),
                duration_s=min(episode_s, s.duration_s or episode_s) if episode_s else None,
                policy=policy, force_base=option, record=True,
                teacher="regime_targets", teacher_params=teachers[s.name],
                teacher_acts=i < teacher_episodes,
                initial_seed=int(rng.integers(2**31)) if i % 2 else None,
            )
            for s in labelled
            for i in range(episodes_per_round)
        ]  # fmt: skip
        last = []
        for task, r in zip(tasks, map_rollouts(tasks), strict=True):
            features, shares = data[task.scenario.name]
            for d, target in zip(r.decisions, r.teacher_targets, strict=True):
                assert d.target_features is not None
                features.append(d.target_features)
                shares.append(target / max(int(target.sum()), 1))
                last.append((d.target_features, target))
        tensors = {
            name: (torch.from_numpy(np.stack(f)), torch.from_numpy(np.stack(y)).float())
            for name, (f, y) in data.items()
            if f
        }
        samples.append(sum(len(x) for x, _ in tensors.values()))
        net.target_net.train()
        round_losses: list[float] = []
        for _ in range(steps):
            for x, y in tensors.values():
                idx = torch.from_numpy(rng.integers(0, len(x), minibatch_size))
                loss = target_cross_entropy(net.target_net(x[idx]), y[idx])
                optimizer.zero_grad()
                torch.autograd.backward(loss)
                optimizer.step()
                round_losses.append(float(loss.detach()))
        net.target_net.eval()
        losses.append(
            float(np.mean(round_losses[-len(tensors) * 20 :])) if round_losses else math.nan
        )
    with torch.no_grad():
        hits = [
            np.array_equal(
                shares_to_workers(
                    net.target_net(torch.from_numpy(np.array(x))).numpy().astype(np.float64),
                    int(t.sum()),
                ),
                t,
            )
            for x, t in last
        ]
    return DistillFit(samples, losses, float(np.mean(hits)) if hits else math.nan)
