"""Tenant fair share: the tagging rule, the simulator's fair queue, and the light-tenant figure."""

from __future__ import annotations

import numpy as np
import pytest

from policies.fairshare import FairQueue, TenantShare, cost, finish_tag, share_of
from policies.sim.cluster import PRIORITY_ARRIVAL, Cluster
from policies.sim.engine import Engine


class TestRule:
    def test_cost_is_inverse_weight_in_whole_units(self) -> None:
        """A job of weight w costs round(1000 / w), never less than 1."""
        assert (cost(1.0), cost(4.0), cost(0.5), cost(1000.0)) == (1000, 250, 2000, 1)

    def test_tag_starts_at_the_later_of_virtual_time_and_the_last_tag(self) -> None:
        """An idle tenant starts at the queue's virtual time; a busy one after its last job."""
        assert finish_tag(5000, 0, 1000) == 6000
        assert finish_tag(5000, 9000, 1000) == 10000

    def test_unlisted_tenants_take_the_default_entry(self) -> None:
        """share_of: own entry, else "*", else weight 1."""
        shares = {"a": TenantShare(weight=3), "*": TenantShare(weight=2)}
        assert share_of(shares, "a").weight == 3
        assert share_of(shares, "b").weight == 2
        assert share_of(shares, None).weight == 2
        assert share_of({}, "b").weight == 1


class TestFairQueue:
    def test_backlogged_tenants_are_served_in_weight_proportion(self) -> None:
        """Tenant a (weight 3) gets 3 of every 4 jobs served while both have a backlog."""
        tenants = tuple(["a"] * 40 + ["b"] * 40)
        q = FairQueue({"a": TenantShare(weight=3)}, tenants)
        for job in range(80):
            q.append(job)
        served = [tenants[q.popleft()] for _ in range(40)]
        assert served.count("a") == 30

    def test_a_newcomer_is_not_stuck_behind_a_backlog(self) -> None:
        """A light tenant's job arriving behind 50 heavy jobs is served second."""
        tenants = tuple(["heavy"] * 50 + ["light"])
        q = FairQueue({}, tenants)
        for job in range(50):
            q.append(job)
        q.popleft()
        q.append(50)
        assert [q.popleft(), q.popleft()] == [1, 50]

    def test_one_tenant_is_served_in_arrival_order(self) -> None:
        """With a single tenant the fair queue is a FIFO, and it counts depth per tenant."""
        q = FairQueue({}, (None,) * 5)
        for job in range(5):
            q.append(job)
        assert q.depths == {None: 5}
        assert [q.popleft() for _ in range(5)] == [0, 1, 2, 3, 4]
        assert q.depths == {}


def _light_mean_jct_s(seed: int, *, heavy: bool, fair: bool) -> float:
    """Mean job completion time of the light tenant on 16 workers (exponential 1 s jobs, light at
    1.3 jobs/s, heavy at 10x that: 89% load with both), seeded."""
    rng = np.random.default_rng(seed)
    horizon_s, light_per_s = 2000.0, 1.3

    def poisson(rate_per_s: float, tenant: str) -> list[tuple[float, str]]:
        gaps = rng.exponential(1 / rate_per_s, int(rate_per_s * horizon_s * 1.2))
        return [(float(t), tenant) for t in np.cumsum(gaps) if t < horizon_s]

    arrivals = poisson(light_per_s, "light") + (poisson(10 * light_per_s, "heavy") if heavy else [])
    arrivals.sort()
    times = [t for t, _ in arrivals]
    tenants = tuple(n for _, n in arrivals)
    engine = Engine()
    cluster = Cluster(
        engine,
        model_load_s=[0.0],
        budget=16,
        initial_allocation=[16],
        service_s=rng.exponential(1.0, len(times)).tolist(),
        size_estimate_s=[1.0] * len(times),
        routes=[0] * len(times),
        tenants=tenants,
        shares={"*": TenantShare()} if fair else None,
    )
    engine.set_stream(times, cluster.kind_arrival, PRIORITY_ARRIVAL)
    engine.run()
    jct = [cluster.completion_s[i] - times[i] for i, n in enumerate(tenants) if n == "light"]
    return float(np.mean(jct))


class TestLightTenantFigure:
    @pytest.mark.parametrize("seed", [0, 1, 2, 3])
    def test_a_heavy_tenant_raises_the_light_ones_jct_by_under_20_percent(self, seed: int) -> None:
        """With fair share, 10x the load from a heavy tenant costs the light one < 20% in mean
        JCT over its solo run; in arrival order the same load costs it more."""
        solo = _light_mean_jct_s(seed, heavy=False, fair=True)
        shared = _light_mean_jct_s(seed, heavy=True, fair=True)
        fifo = _light_mean_jct_s(seed, heavy=True, fair=False)
        assert shared / solo < 1.2
        assert fifo > shared
