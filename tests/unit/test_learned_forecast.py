"""The learned arrival-rate forecast: equivariance, bounds, targets from real runs, and a fit that
learns a bursty queue's reversion."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch

from policies.learned.forecast import (
    FORECAST_FEATURE_NAMES,
    STEADY_FORECAST_FEATURES,
    ForecasterConfig,
    RateForecaster,
    RateForecastNet,
    RateForecastNetNp,
    forecast_window_s,
)
from policies.learned.forecast_training import fit_forecaster, forecast_tasks
from policies.learned.networks import AllocatorNetConfig
from policies.learned.policy import LearnedPolicy
from policies.learned.rollout import forecast_targets_of, map_serial, run_rollout
from policies.sim.scenario import make_router_for, parse_scenario, prepare
from policies.views import ClusterView, QueueView

# One queue alternating between long quiet spells and short bursts (so a burst seen now is likely
# over within the window), one steady queue.
_BURSTY: dict[str, Any] = {
    "name": "bursty_pair",
    "queues": [
        {"name": "bursty", "job_types": ["b"], "service": {"kind": "exponential", "mean_s": 0.5},
         "model_load_s": 10.0},
        {"name": "steady", "job_types": ["s"], "service": {"kind": "exponential", "mean_s": 0.5},
         "model_load_s": 10.0},
    ],
    "allocation": {"policy": "proportional", "tick_s": 2.0, "budget": 12},
    "workload": {"generators": [
        {"kind": "mmpp", "mix": {"b": 1}, "states": [
            {"rate_per_s": 2.0, "mean_sojourn_s": 120.0},
            {"rate_per_s": 12.0, "mean_sojourn_s": 15.0}]},
        {"kind": "poisson", "rate_per_s": 4.0, "mix": {"s": 1}},
    ]},
    "duration_s": 900.0,
}  # fmt: skip


def _view(n: int, now_s: float = 0.0, seed: int = 0) -> ClusterView:
    rng = np.random.default_rng(seed)
    queues = tuple(
        QueueView(
            name=f"q{i}",
            job_types=frozenset({f"t{i}"}),
            depth=int(rng.integers(0, 30)),
            arrival_rate_per_s=float(rng.uniform(0, 5)),
            service_time_s=float(rng.uniform(0.1, 2)),
            workers_ready=int(rng.integers(0, 4)),
            model_load_s=float(rng.uniform(0, 20)),
        )
        for i in range(n)
    )
    return ClusterView(now_s=now_s, tick_s=1.0, budget=4 * n, queues=queues)


def _trained_net(seed: int = 0) -> RateForecastNet:
    """A net with random (not near-identity) weights, so the tests see a real mixture."""
    torch.manual_seed(seed)
    net = RateForecastNet(ForecasterConfig(now_bias=0.0, features=FORECAST_FEATURE_NAMES))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return net.eval()


def test_permuting_the_queues_permutes_the_forecast() -> None:
    net = _trained_net()
    features = torch.randn(3, 7, len(net.config.features))
    perm = torch.randperm(7)
    with torch.no_grad():
        out = net(features)
        permuted = net(features[:, perm])
    torch.testing.assert_close(permuted, out[:, perm])


@pytest.mark.parametrize("n", [1, 7, 200])
def test_numpy_copy_matches_torch_and_weights_are_a_distribution(n: int) -> None:
    net = _trained_net(seed=n)
    width = len(net.config.features)
    features = np.random.default_rng(n).normal(size=(n, width)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(features)[None])[0].numpy()
    got = RateForecastNetNp(net)(features)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-6)
    assert (got >= 0).all()


def test_forecast_stays_between_the_averages_and_changes_only_the_rates() -> None:
    """The forecast is a convex mix of the current, medium and slow averages, so it lies within
    them whatever the weights; every other field of the view is untouched."""
    forecaster = RateForecaster(_trained_net())
    lows = np.full(5, np.inf)
    highs = np.zeros(5)
    for t in range(60):
        view = _view(5, now_s=float(t), seed=t)
        rates = np.array([q.arrival_rate_per_s for q in view.queues])
        lows, highs = np.minimum(lows, rates), np.maximum(highs, rates)
        out = forecaster.forecast_view(view)
        got = np.array([q.arrival_rate_per_s for q in out.queues])
        assert ((got >= lows - 1e-9) & (got <= highs + 1e-9)).all()
        for before, after in zip(view.queues, out.queues, strict=True):
            assert (
                dataclasses.replace(after, arrival_rate_per_s=before.arrival_rate_per_s) == before
            )


def test_fresh_forecaster_trusts_the_current_rate() -> None:
    """An untrained forecaster puts almost all weight on the current rate: the heuristics' own
    assumption, so adding one changes little until it is fitted."""
    forecaster = RateForecaster(RateForecastNet())
    forecaster.forecast_view(_view(3, now_s=0.0, seed=1))
    view = _view(3, now_s=10.0, seed=2)
    out = forecaster.forecast_view(view)
    for before, after in zip(view.queues, out.queues, strict=True):
        assert after.arrival_rate_per_s == pytest.approx(before.arrival_rate_per_s, rel=0.1)


def test_a_forecaster_reads_only_its_configured_features() -> None:
    """By default only the slowly changing features reach the network, as the same columns of the
    full feature set; a config with every feature reads them all."""
    every = RateForecaster(_trained_net(), record=True)
    steady_net = RateForecastNet(ForecasterConfig())
    steady = RateForecaster(steady_net, record=True)
    for t in range(5):
        view = _view(4, now_s=float(t), seed=t)
        every.forecast_view(view)
        steady.forecast_view(view)
    assert steady_net.config.features == STEADY_FORECAST_FEATURES
    assert _trained_net().config.features == FORECAST_FEATURE_NAMES
    columns = [FORECAST_FEATURE_NAMES.index(name) for name in STEADY_FORECAST_FEATURES]
    for full, part in zip(every.samples, steady.samples, strict=True):
        assert full.features.shape == (4, len(FORECAST_FEATURE_NAMES))
        np.testing.assert_array_equal(part.features, full.features[:, columns])


def test_forecast_feature_lists_are_checked_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown forecast features \['queue_colour'\]"):
        ForecasterConfig(features=("log_load_slow", "queue_colour"))
    with pytest.raises(ValueError, match="non-empty and distinct"):
        ForecasterConfig(features=())
    with pytest.raises(ValueError, match="non-empty and distinct"):
        ForecasterConfig(features=("warm", "warm"))
    # JSON hands the list back; it is kept as a tuple, and an old dict gets every feature.
    config = ForecasterConfig.from_dict({**ForecasterConfig().to_dict(), "features": ["warm"]})
    assert config.features == ("warm",)
    old = ForecasterConfig().to_dict()
    del old["features"]
    assert ForecasterConfig.from_dict(old).features == FORECAST_FEATURE_NAMES


def test_queues_may_come_and_go_and_bad_readings_stay_finite() -> None:
    forecaster = RateForecaster(_trained_net(), record=True)
    forecaster.forecast_view(_view(4, now_s=0.0))
    view = _view(2, now_s=5.0)
    broken = dataclasses.replace(view.queues[0], arrival_rate_per_s=math.nan)
    out = forecaster.forecast_view(dataclasses.replace(view, queues=(broken, view.queues[1])))
    assert all(math.isfinite(q.arrival_rate_per_s) for q in out.queues)
    assert [len(s.features) for s in forecaster.samples] == [4, 2]


def test_window_is_a_few_model_loads_and_at_least_some_ticks() -> None:
    config = ForecasterConfig(window_loads=2.0, min_window_ticks=4.0)
    view = _view(3)
    longest = max(q.model_load_s for q in view.queues)
    assert forecast_window_s(config, view) == max(2.0 * longest, 4.0)
    empty = dataclasses.replace(view, queues=())
    assert forecast_window_s(config, empty) == 4.0
    with pytest.raises(ValueError, match="medium_s < slow_s"):
        ForecasterConfig(medium_s=600.0, slow_s=60.0)


def test_targets_are_what_arrived_in_the_window_and_stop_before_the_drain() -> None:
    """In a real run, each kept sample's target times its window is the number of jobs that were
    routed to the queue in that window; samples whose window passes the last arrival are dropped."""
    scenario = parse_scenario(_BURSTY)
    prepared = prepare(scenario, seed=3)
    policy = LearnedPolicy.create(forecaster_config=ForecasterConfig(window_loads=2.0), seed=0)
    allocator = policy.allocator(record_forecast=True)
    run = prepared.start(make_router_for(scenario))
    marks = []
    while (view := run.advance_to_next_tick()) is not None:
        marks.append((view.now_s, run.routed_jobs))
        run.apply(allocator.allocate(view))
    assert allocator.forecaster is not None
    samples, targets = forecast_targets_of(
        allocator.forecaster.samples, marks, prepared.spec.horizon_s
    )
    assert samples
    assert len(samples) < len(allocator.forecaster.samples)
    arrival_s = prepared.jobs.arrivals.arrival_s
    type_names = prepared.jobs.arrivals.job_types
    kinds = np.array([type_names[i] for i in prepared.jobs.arrivals.type_idx])
    for sample, target in zip(samples[::37], targets[::37], strict=True):
        assert sample.now_s + sample.window_s <= prepared.spec.horizon_s
        window = (arrival_s > sample.now_s) & (arrival_s <= sample.now_s + sample.window_s)
        for q, kind in enumerate(("b", "s")):
            # Ticks fall on whole seconds and arrivals are counted up to each tick.
            assert target[q] * sample.window_s == pytest.approx(
                np.count_nonzero(window & (kinds == kind)), abs=1e-6
            )


@pytest.mark.slow
def test_fit_learns_that_bursts_revert() -> None:
    """Fitted on episodes of a bursty queue, the forecast error drops well below that of "the
    current rate holds", and in a burst the forecast sits below the current rate (the burst is
    likely over within the window) while the steady queue's stays near its rate."""
    scenario = parse_scenario(_BURSTY)
    policy = LearnedPolicy.create(
        AllocatorNetConfig.residual([("switch_aware", {})]),
        forecaster_config=ForecasterConfig(window_loads=4.0),
        seed=0,
    )
    rng = np.random.default_rng(0)
    tasks = forecast_tasks(
        policy, [scenario], rng, episodes_per_scenario=4, episode_s=900.0, load_scale=(1.0, 1.0)
    )
    fit = fit_forecaster(policy, map_serial(tasks), rng, steps=400, learning_rate=3e-3)
    assert fit.samples > 1000
    assert fit.fitted_mse < 0.8 * fit.current_rate_mse

    # A held-out run: in bursts (current rate far above the slow average) the forecast is lower.
    result = run_rollout(dataclasses.replace(tasks[0], arrival_seed=999))
    assert result.forecast_samples
    assert policy.forecaster_net is not None
    net = RateForecastNetNp(policy.forecaster_net)
    in_burst = [
        s for s in result.forecast_samples if s.rates[0, 0] > 2.0 * s.rates[0, 2] and s.now_s > 300
    ]
    assert in_burst
    ratios = [float((net(s.features) * s.rates).sum(axis=1)[0] / s.rates[0, 0]) for s in in_burst]
    assert float(np.median(ratios)) < 0.8
    steady = [
        float((net(s.features) * s.rates).sum(axis=1)[1] / max(s.rates[1, 0], 1e-9))
        for s in result.forecast_samples
        if s.now_s > 300
    ]
    assert 0.8 < float(np.median(steady)) < 1.2
