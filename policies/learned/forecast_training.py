"""Fitting the rate forecaster (`policies.learned.forecast`) by regression on simulated load.

The forecast's target is exogenous (what arrives next does not depend on the allocation), so it is
learned by supervision, not by the policy gradient: a few episodes per scenario on training seeds,
at the curriculum's loads and from random worker splits, record every tick's forecast inputs and
what then arrived over the window; Adam then minimises the squared error in log1p(Erlangs), with
balanced minibatches per scenario so a scenario with more queues or ticks does not dominate.

Reported with the fit: the error of the untrained assumption (the current rate holds) on the same
data, so the log shows how much the forecast learned.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from policies.learned.forecast import forecast_loss, log_load_mse
from policies.learned.policy import LearnedPolicy
from policies.learned.rollout import MapRollouts, RolloutResult, RolloutTask
from policies.seeds import TRAIN_SEEDS
from policies.sim.scenario import Scenario


@dataclass(frozen=True)
class ForecastFit:
    """How the fit went: mean squared log1p-Erlang error, before and after, and the data size."""

    samples: int
    # The untrained assumption: the current rate holds over the window.
    current_rate_mse: float
    fitted_mse: float

    def to_dict(self) -> dict[str, float | int]:
        return {
            "samples": self.samples,
            "current_rate_mse": self.current_rate_mse,
            "fitted_mse": self.fitted_mse,
        }


def forecast_tasks(
    policy: LearnedPolicy,
    scenarios: Sequence[Scenario],
    rng: np.random.Generator,
    *,
    episodes_per_scenario: int,
    episode_s: float,
    load_scale: tuple[float, float],
) -> list[RolloutTask]:
    """Recording episodes of `policy` on training seeds: per scenario, `episodes_per_scenario` of
    up to `episode_s` seconds, loads drawn from `load_scale`, every other one from a random split."""
    return [
        RolloutTask(
            s,
            int(rng.integers(TRAIN_SEEDS.start, TRAIN_SEEDS.stop)),
            load_scale=float(rng.uniform(*load_scale)),
            duration_s=min(episode_s, s.duration_s or episode_s),
            policy=policy,
            policy_seed=int(rng.integers(2**31)),
            record_forecast=True,
            initial_seed=int(rng.integers(2**31)) if k % 2 else None,
        )
        for s in scenarios
        for k in range(episodes_per_scenario)
    ]


def _stack(results: Sequence[RolloutResult]) -> dict[str, dict[str, torch.Tensor]]:
    """Every recorded sample with a target, as tensors per scenario (one queue count each)."""
    by_scenario: dict[str, list[tuple[np.ndarray, ...]]] = defaultdict(list)
    for r in results:
        for sample, target in zip(r.forecast_samples, r.forecast_targets, strict=True):
            by_scenario[r.scenario].append(
                (sample.features, sample.rates, sample.service_s, target)
            )
    data: dict[str, dict[str, torch.Tensor]] = {}
    for name, rows in by_scenario.items():
        features, rates, service_s, target = (
            np.stack(column) for column in zip(*rows, strict=True)
        )
        data[name] = {
            "features": torch.from_numpy(features.astype(np.float32)),
            "rates": torch.from_numpy(rates.astype(np.float32)),
            "service_s": torch.from_numpy(service_s.astype(np.float32)),
            "target": torch.from_numpy(target.astype(np.float32)),
        }
    return data


def _mse(
    data: dict[str, dict[str, torch.Tensor]],
    forecast_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
) -> float:
    """Mean over scenarios of the mean squared log-load error of `forecast_of(samples)`."""
    with torch.no_grad():
        return float(
            np.mean(
                [
                    float(log_load_mse(forecast_of(d), d["service_s"], d["target"]))
                    for d in data.values()
                ]
            )
        )


def fit_forecaster(
    policy: LearnedPolicy,
    results: Sequence[RolloutResult],
    rng: np.random.Generator,
    *,
    steps: int,
    learning_rate: float,
    minibatch_size: int = 128,
    should_stop: Callable[[], bool] | None = None,
) -> ForecastFit:
    """Fits `policy.forecaster_net` (in place) to the recorded samples of `results`, for `steps`
    steps or until `should_stop()` (asked before each step) says the run has no time left."""
    net = policy.forecaster_net
    if net is None:
        raise ValueError("the policy has no forecaster to fit")
    data = _stack(results)
    if not data:
        raise ValueError("no forecast samples: the episodes were shorter than one forecast window")
    samples = sum(len(d["target"]) for d in data.values())
    # The untrained assumption: the current rate (the first of the averages) holds.
    baseline = _mse(data, lambda d: d["rates"][..., 0])
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    net.train()
    for _ in range(steps):
        if should_stop is not None and should_stop():
            break
        losses = []
        for d in data.values():
            idx = torch.from_numpy(rng.integers(0, len(d["target"]), minibatch_size))
            losses.append(
                forecast_loss(
                    net, d["features"][idx], d["rates"][idx], d["service_s"][idx], d["target"][idx]
                )
            )
        loss = torch.stack(losses).mean()
        optimizer.zero_grad()
        torch.autograd.backward(loss)
        optimizer.step()
    net.eval()
    fitted = _mse(data, lambda d: (net(d["features"]) * d["rates"]).sum(dim=-1))
    if not math.isfinite(fitted):
        raise ValueError("the forecaster's fit diverged (non-finite error)")
    return ForecastFit(samples=samples, current_rate_mse=baseline, fitted_mse=fitted)


def train_forecaster(
    policy: LearnedPolicy,
    scenarios: Sequence[Scenario],
    map_rollouts: MapRollouts,
    rng: np.random.Generator,
    *,
    episodes_per_scenario: int,
    episode_s: float,
    load_scale: tuple[float, float],
    steps: int,
    learning_rate: float,
    should_stop: Callable[[], bool] | None = None,
) -> ForecastFit:
    """Records episodes of `policy` (`forecast_tasks`) and fits its forecaster to them (until
    `should_stop()`, see `fit_forecaster`)."""
    tasks = forecast_tasks(
        policy,
        scenarios,
        rng,
        episodes_per_scenario=episodes_per_scenario,
        episode_s=episode_s,
        load_scale=load_scale,
    )
    return fit_forecaster(
        policy,
        map_rollouts(tasks),
        rng,
        steps=steps,
        learning_rate=learning_rate,
        should_stop=should_stop,
    )
