"""A learned arrival-rate forecast: what the learned allocator's base heuristics plan with.

Why. The switch-aware heuristic prices a move with a fluid model that assumes each queue's current
arrival rate holds for its whole horizon. Under bursty load that is the wrong forecast: a burst
seen now is, on average, half over by the time a moved worker has loaded its model, so the
heuristic moves workers into bursts that end and out of queues that are about to need them. How
fast a queue's rate reverts, and to what, is a property of the workload, not of the heuristic; so
it is learned from simulated load, by regression on what actually arrived next.

What. Per queue, the allocator keeps three exponential averages of the observed arrival rate (the
view's own estimate, and a medium and a slow average of it, the slow one being the level a burst
reverts to). Each tick a small permutation-equivariant network (shared per-queue encoder, mean and
max pooling across queues, per-queue head, as `networks.QueueSetNet`) reads features of those
averages and outputs, per queue, softmax weights over the three; the forecast is their weighted
mean. By default it reads only the features that change slowly (`STEADY_FORECAST_FEATURES`), so
the weights follow the queue's regime rather than the noise of one tick. The forecast always lies
between the averages (it cannot run away on an unseen workload), and a fresh network puts almost all weight on the current rate, which reproduces the
heuristics' own assumption. Training fits the weights so that the forecast matches the mean arrival
rate over the next `window_s` (`forecast_window_s`: a couple of model loads, the time a move needs
to pay back), in log1p(Erlangs).

The forecast replaces `arrival_rate_per_s` in the view the allocator's bases and features see;
nothing else in the view changes. Pure: no I/O, state only in the tracker's averages.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from policies.learned.networks import linear_np, matmul_rows
from policies.views import ClusterView, queue_column, with_arrival_rates

# Per-queue forecast features, column order of `forecast_features`.
FORECAST_FEATURE_NAMES: tuple[str, ...] = (
    "log_load_now",  # log1p(offered load at the current rate estimate), Erlangs
    "log_load_medium",  # log1p(offered load at the medium average)
    "log_load_slow",  # log1p(offered load at the slow average)
    "now_over_slow",  # log_load_now - log_load_slow: how far from its usual level the queue is
    "medium_over_slow",  # log_load_medium - log_load_slow
    "volatility",  # average |change of log_load_now| per tick: bursty queues jump, others drift
    "warm",  # how much history the slow average holds, 0..1
    "log_depth",  # log1p(jobs waiting)
    "log_window_ticks",  # log1p(forecast window / tick)
    "log_service_ticks",  # log1p(service time / tick)
)
# The features a forecaster reads by default: the ones that change slowly. The weights over the
# averages then move with the queue's regime, not with the tick-to-tick noise of its current
# estimate; a forecast that jitters with that noise makes the planner move workers for nothing.
# Fits on every feature reach a lower squared error, yet plan worse, and vary more from fit to fit:
# on 40 bursty_switch seeds outside both the training and the evaluation ranges, switch-aware
# planning on their forecast beat switch-aware on the current rate by 8.8-14.8% (three fits), and
# on this set's forecast by 14.6-15.6% (two fits).
STEADY_FORECAST_FEATURES: tuple[str, ...] = (
    "log_load_medium",
    "log_load_slow",
    "volatility",
    "warm",
    "log_window_ticks",
    "log_service_ticks",
)
# The averages the forecast weighs, in the order of the network's outputs.
N_SCALES: int = 3


@dataclass(frozen=True, slots=True)
class ForecasterConfig:
    """Shape of `RateForecastNet`, its averages' time constants and its forecast window."""

    hidden: int = 32
    # Time constants of the medium and slow averages of the view's rate estimate, seconds.
    medium_s: float = 60.0
    slow_s: float = 600.0
    # The window forecast: this many of the slowest model load, and at least `min_window_ticks`.
    window_loads: float = 2.0
    min_window_ticks: float = 4.0
    # Initial bias of the current-rate logit: a fresh forecaster trusts the current rate.
    now_bias: float = 4.0
    # The features the network reads, a subset of FORECAST_FEATURE_NAMES in any order.
    features: tuple[str, ...] = STEADY_FORECAST_FEATURES

    def __post_init__(self) -> None:
        if not 0 < self.medium_s < self.slow_s:
            raise ValueError(f"need 0 < medium_s < slow_s, got {self.medium_s}, {self.slow_s}")
        if not (self.window_loads >= 0 and self.min_window_ticks > 0 and self.hidden > 0):
            raise ValueError("window_loads must be >= 0, min_window_ticks and hidden > 0")
        # JSON gives a list back; the config stays hashable and immutable.
        object.__setattr__(self, "features", tuple(self.features))
        unknown = sorted(set(self.features) - set(FORECAST_FEATURE_NAMES))
        if unknown:
            raise ValueError(
                f"unknown forecast features {unknown}; known: {list(FORECAST_FEATURE_NAMES)}"
            )
        if not self.features or len(set(self.features)) != len(self.features):
            raise ValueError(f"forecast features must be non-empty and distinct: {self.features}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ForecasterConfig:
        """The config `to_dict` wrote. One written before `features` existed read every feature,
        so it gets every feature back."""
        return cls(**{"features": FORECAST_FEATURE_NAMES, **data})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def columns(self) -> list[int]:
        """Where the features sit among FORECAST_FEATURE_NAMES."""
        return [FORECAST_FEATURE_NAMES.index(name) for name in self.features]


def forecast_window_s(config: ForecasterConfig, view: ClusterView) -> float:
    """Seconds ahead the forecast is for: `window_loads` slowest model loads, at least
    `min_window_ticks` ticks."""
    longest_load_s = max((q.model_load_s for q in view.queues), default=0.0)
    return max(config.window_loads * longest_load_s, config.min_window_ticks * view.tick_s)


class RateForecastNet(nn.Module):
    """Per-queue forecast features -> per-queue softmax weights over (now, medium, slow) rates."""

    def __init__(self, config: ForecasterConfig | None = None) -> None:
        super().__init__()
        self.config = config or ForecasterConfig()
        h = self.config.hidden
        self.encoder = nn.Sequential(nn.Linear(len(self.config.features), h), nn.Tanh())
        self.integrate = nn.Sequential(nn.Linear(2 * h, h), nn.Tanh())
        self.head = nn.Linear(2 * h, N_SCALES)
        for layer in (self.encoder[0], self.integrate[0]):
            assert isinstance(layer, nn.Linear)
            nn.init.orthogonal_(layer.weight, 2.0**0.5)
            nn.init.zeros_(layer.bias)
        nn.init.orthogonal_(self.head.weight, 0.01)
        with torch.no_grad():
            self.head.bias.copy_(torch.tensor([self.config.now_bias, 0.0, 0.0]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, n, F) features -> (B, n, N_SCALES) weights (each row sums to 1)."""
        encoded = self.encoder(features)
        pooled = torch.cat([encoded.mean(dim=1), encoded.amax(dim=1)], dim=-1)
        summary = self.integrate(pooled)
        both = torch.cat([encoded, summary[:, None, :].expand_as(encoded)], dim=-1)
        weights: torch.Tensor = torch.softmax(self.head(both), dim=-1)
        return weights


class RateForecastNetNp:
    """A frozen numpy copy of a `RateForecastNet` for one view at a time (torch's per-op dispatch
    would dominate for a few queues; see `networks.QueueSetNetNp`)."""

    def __init__(self, net: RateForecastNet) -> None:
        self.enc = linear_np(net.encoder[0])
        self.integrate = linear_np(net.integrate[0])
        self.head = linear_np(net.head)
        self.hidden = net.config.hidden

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """(n, F) features of one view -> (n, N_SCALES) weights."""
        h = self.hidden
        encoded = np.tanh(matmul_rows(features, self.enc[0]) + self.enc[1])
        pooled = np.concatenate([encoded.mean(axis=0), encoded.max(axis=0)])
        summary = np.tanh(pooled @ self.integrate[0] + self.integrate[1])
        w, b = self.head
        logits = (matmul_rows(encoded, w[:h]) + (summary @ w[h:] + b)).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        weights: np.ndarray = np.exp(logits)
        weights /= weights.sum(axis=1, keepdims=True)
        return weights


@dataclass(frozen=True, slots=True)
class ForecastSample:
    """One tick's forecast inputs, kept for training (the target comes from what arrived next)."""

    now_s: float
    window_s: float
    features: np.ndarray  # (n, len(config.features)) float32
    rates: np.ndarray  # (n, N_SCALES) float64: the averages the weights apply to, per second
    service_s: np.ndarray  # (n,) float64: the queues' mean service times (the loss is in Erlangs)


class RateForecaster:
    """The per-run forecasting state: the averages of each queue's rate, and the network.

    One instance per run (it keeps averages across ticks, keyed by queue name, so queues may come
    and go). `forecast_view(view)` updates the averages with the view and returns the view with the
    forecast as every queue's arrival rate; with `record=True` the inputs are kept in `samples`.
    """

    def __init__(self, net: RateForecastNet, *, record: bool = False) -> None:
        self.config = net.config
        self._columns = net.config.columns
        self._forward = RateForecastNetNp(net)
        # Per queue, in the order of `_names`: the medium and slow averages of the rate, the
        # average jump of log load per tick, the last log load, and when the queue was first seen.
        self._names: tuple[str, ...] = ()
        self._state = np.zeros((5, 0))
        self._last_s: float | None = None
        self.record = record
        self.samples: list[ForecastSample] = []

    def _align(
        self, names: tuple[str, ...], rate: np.ndarray, log_load: np.ndarray, now_s: float
    ) -> None:
        """Reorders the per-queue state to `names`; a queue not seen before starts at its rate."""
        if names == self._names:
            return
        fresh = np.stack([rate, rate, np.zeros_like(rate), log_load, np.full_like(rate, now_s)])
        old = {name: i for i, name in enumerate(self._names)}
        for i, name in enumerate(names):
            if name in old:
                fresh[:, i] = self._state[:, old[name]]
        self._names, self._state = names, fresh

    def _update(
        self, view: ClusterView, window_s: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Folds the view's rates into the averages; returns (rates (n, 3), features (n, F),
        service times (n,)) for a forecast `window_s` ahead."""
        config = self.config
        elapsed_s = 0.0 if self._last_s is None else max(view.now_s - self._last_s, 0.0)
        self._last_s = view.now_s
        n = len(view.queues)
        rate = queue_column(view.queues, "arrival_rate_per_s")
        service_s = queue_column(view.queues, "service_time_s")
        # A broken reading (NaN, negative) counts as no arrivals / no work, never as NaN.
        rate = np.where(np.isfinite(rate) & (rate > 0), rate, 0.0)
        service_s = np.where(np.isfinite(service_s) & (service_s > 0), service_s, 0.0)
        log_load = np.log1p(rate * service_s)
        self._align(tuple(q.name for q in view.queues), rate, log_load, view.now_s)
        medium, slow, volatility, last_log, since_s = self._state
        a_medium = 1.0 - math.exp(-elapsed_s / config.medium_s)
        a_slow = 1.0 - math.exp(-elapsed_s / config.slow_s)
        medium += a_medium * (rate - medium)
        slow += a_slow * (rate - slow)
        volatility += a_slow * (np.abs(log_load - last_log) - volatility)
        last_log[:] = log_load
        tick_s = max(view.tick_s, 1e-9)
        log_medium = np.log1p(medium * service_s)
        log_slow = np.log1p(slow * service_s)
        depth = queue_column(view.queues, "depth")
        features = np.stack(
            [
                log_load,
                log_medium,
                log_slow,
                log_load - log_slow,
                log_medium - log_slow,
                volatility,
                np.minimum((view.now_s - since_s) / config.slow_s, 1.0),
                np.log1p(np.maximum(depth, 0.0)),
                np.full(n, math.log1p(window_s / tick_s)),
                np.log1p(service_s / tick_s),
            ],
            axis=1,
        )
        rates = np.stack([rate, medium, slow], axis=1)
        return rates, features[:, self._columns].astype(np.float32), service_s

    def forecast_view(self, view: ClusterView) -> ClusterView:
        """`view` with each queue's arrival rate replaced by its forecast over the window."""
        if not view.queues:
            return view
        window_s = forecast_window_s(self.config, view)
        rates, features, service_s = self._update(view, window_s)
        weights = self._forward(features)
        if not np.isfinite(weights).all():
            raise ValueError("the rate forecaster produced non-finite outputs")
        forecast = (weights * rates).sum(axis=1)
        if self.record:
            self.samples.append(ForecastSample(view.now_s, window_s, features, rates, service_s))
        return dataclasses.replace(view, queues=with_arrival_rates(view.queues, forecast.tolist()))


def forecast_loss(
    net: RateForecastNet,
    features: torch.Tensor,
    rates: torch.Tensor,
    service_s: torch.Tensor,
    target_per_s: torch.Tensor,
) -> torch.Tensor:
    """Mean squared error of the forecast in log1p(Erlangs), over a (B, n, ...) batch of views."""
    return log_load_mse((net(features) * rates).sum(dim=-1), service_s, target_per_s)


def log_load_mse(
    forecast_per_s: torch.Tensor, service_s: torch.Tensor, target_per_s: torch.Tensor
) -> torch.Tensor:
    """Mean squared error of rate forecasts against what arrived, in log1p(Erlangs)."""
    error = torch.log1p(forecast_per_s * service_s) - torch.log1p(target_per_s * service_s)
    return (error * error).mean()
