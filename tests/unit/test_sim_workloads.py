"""Service-time models and arrival generators draw what they claim."""

from __future__ import annotations

import numpy as np
import pytest

from policies.sim.arrivals import Arrival
from policies.sim.service import (
    ExponentialService,
    LognormalService,
    ParetoService,
    TokenLinearService,
)
from policies.sim.workloads import (
    ArrivalTable,
    DiurnalWorkload,
    MmppState,
    MmppWorkload,
    PoissonWorkload,
    generate,
)

N = 200_000
NAN = np.full(N, np.nan)


@pytest.mark.parametrize(
    "model",
    [
        ExponentialService(mean_s=0.5),
        LognormalService(mean_s=2.0, cv=1.5),
        LognormalService(mean_s=2.0, sigma=0.5),
        ParetoService(mean_s=1.0, alpha=2.5),
    ],
)
def test_service_models_have_their_mean(model: ExponentialService) -> None:
    """Sample means match the configured mean."""
    draws = model.sample_s(N, np.random.default_rng(1), NAN, NAN)
    assert draws.mean() == pytest.approx(model.nominal_mean_s, rel=0.03)
    assert (draws > 0).all()


def test_token_model_is_the_linear_formula() -> None:
    """Without noise, service = a + b * tokens_in + c * tokens_out, and that is the estimate."""
    model = TokenLinearService(a_s=0.1, b_s_per_token_in=0.001, c_s_per_token_out=0.01)
    t_in = np.array([100.0, 1000.0])
    t_out = np.array([10.0, 0.0])
    expected = np.array([0.1 + 0.1 + 0.1, 0.1 + 1.0])
    assert model.sample_s(2, np.random.default_rng(0), t_in, t_out) == pytest.approx(expected)
    assert model.estimate_s(t_in, t_out) == pytest.approx(expected)


def test_poisson_rate_and_mix() -> None:
    """Arrival count matches the rate; job types follow the mix weights."""
    gen = PoissonWorkload(rate_per_s=50.0, mix={"a": 3, "b": 1})
    table = generate([gen], np.random.default_rng(2), duration_s=2000.0, max_jobs=None)
    assert len(table) / 2000.0 == pytest.approx(50.0, rel=0.02)
    share_a = np.mean(np.array(table.job_types)[table.type_idx] == "a")
    assert share_a == pytest.approx(0.75, abs=0.01)
    assert (np.diff(table.arrival_s) >= 0).all()


def test_mmpp_long_run_rate_and_burstiness() -> None:
    """MMPP: long-run rate is the sojourn-weighted mean, and counts are over-dispersed."""
    gen = MmppWorkload(
        states=[
            MmppState(rate_per_s=2.0, mean_sojourn_s=30.0),
            MmppState(rate_per_s=20.0, mean_sojourn_s=10.0),
        ],
        mix={"a": 1},
    )
    assert gen.mean_rate_per_s == pytest.approx((2 * 30 + 20 * 10) / 40)
    table = generate([gen], np.random.default_rng(3), duration_s=40_000.0, max_jobs=None)
    assert len(table) / 40_000.0 == pytest.approx(gen.mean_rate_per_s, rel=0.05)
    counts = np.bincount(table.arrival_s.astype(int) // 10)
    # A Poisson process has variance == mean per window; bursts make it far larger.
    assert counts.var() > 3 * counts.mean()


def test_diurnal_rate_follows_the_sinusoid() -> None:
    """More arrivals near the peak of the cycle than near its trough."""
    gen = DiurnalWorkload(base_rate_per_s=10.0, amplitude=0.8, period_s=1000.0, mix={"a": 1})
    table = generate([gen], np.random.default_rng(4), duration_s=10_000.0, max_jobs=None)
    phase = (table.arrival_s % 1000.0) / 1000.0
    peak = np.count_nonzero((phase > 0.2) & (phase < 0.3))
    trough = np.count_nonzero((phase > 0.7) & (phase < 0.8))
    assert peak / trough == pytest.approx(1.8 / 0.2, rel=0.2)
    assert len(table) / 10_000.0 == pytest.approx(10.0, rel=0.03)


def test_max_jobs_cuts_exactly() -> None:
    """max_jobs without a duration yields exactly that many arrivals."""
    gen = PoissonWorkload(rate_per_s=5.0, mix={"a": 1})
    assert len(generate([gen], np.random.default_rng(5), duration_s=None, max_jobs=1234)) == 1234


def test_arrival_records_round_trip_through_the_table() -> None:
    """Arrival records convert to columns and back unchanged (sorted by time)."""
    arrivals = [
        Arrival(arrival_s=2.0, job_type="b", service_s=0.5, tokens_in=10, tenant="t1"),
        Arrival(arrival_s=1.0, job_type="a", priority=2, deadline_s=3.0, tokens_out=7),
    ]
    table = ArrivalTable.from_arrivals(arrivals)
    assert table.to_arrivals() == sorted(arrivals, key=lambda a: a.arrival_s)
