"""The controller's and router's views, built from hand-made store stats and pool views."""

from __future__ import annotations

import dataclasses
import json

import pytest

from policies.views import AllocationBounds
from scheduler.config import ServiceConfig
from scheduler.service.views import (
    DEFAULT_SERVICE_TIME_S,
    PublishedQueue,
    PublishedShadow,
    PublishedState,
    RateEstimator,
    ViewBuilder,
    job_view,
    routing_queue_views,
    size_estimates_s,
)
from scheduler.store import QueueStats, RouteInfo, StoreStats
from workers.pool_view import PoolView, QueuePoolView


def _config() -> ServiceConfig:
    return ServiceConfig.from_mapping(
        {
            "queues": [
                {"name": "emb", "job_types": ["embed"], "min_workers": 1, "max_workers": 3},
                {"name": "gen", "job_types": ["generate"], "slo_s": 2.5, "required_tags": ["gpu"]},
            ],
            "allocation": {"budget": 4, "max_moves_per_tick": 1},
        }
    )


def _stats(emb_enqueued: int, gen_enqueued: int, *, depth: int = 0) -> StoreStats:
    return StoreStats(
        ingress=0,
        delayed=0,
        queues={
            "emb": QueueStats("emb", depth, 1.5, 1, 0, enqueued_total=emb_enqueued),
            "gen": QueueStats("gen", 0, 0.0, 0, 0, enqueued_total=gen_enqueued),
        },
    )


class TestRateEstimator:
    def test_first_sample_sets_a_baseline(self) -> None:
        """The first total seen gives rate 0, not total/elapsed-since-epoch."""
        rates = RateEstimator(half_life_s=1.0).update({"q": 500}, now_s=100.0)
        assert rates == {"q": 0.0}

    def test_first_delta_is_taken_as_is_then_smoothed(self) -> None:
        """With no previous rate the instant rate is used; later ones move toward new samples."""
        est = RateEstimator(half_life_s=1.0)
        est.update({"q": 0}, 0.0)
        assert est.update({"q": 10}, 1.0)["q"] == pytest.approx(10.0)
        # One half-life later with rate 0: half of the way from 10 to 0.
        assert est.update({"q": 10}, 2.0)["q"] == pytest.approx(5.0)

    def test_equal_spans_weigh_equally_whatever_the_tick(self) -> None:
        """Two half ticks move the estimate as far as one full tick at the same rate."""
        one, two = RateEstimator(2.0), RateEstimator(2.0)
        for est in (one, two):
            est.update({"q": 0}, 0.0)
            est.update({"q": 10}, 1.0)
        one.update({"q": 10}, 3.0)
        two.update({"q": 10}, 2.0)
        two.update({"q": 10}, 3.0)
        assert one.rates_per_s["q"] == pytest.approx(two.rates_per_s["q"])

    def test_a_total_that_goes_down_resets(self) -> None:
        """A flushed namespace (totals restart) never yields a negative rate."""
        est = RateEstimator(1.0)
        est.update({"q": 100}, 0.0)
        est.update({"q": 110}, 1.0)
        assert est.update({"q": 3}, 2.0)["q"] >= 0.0


class TestClusterView:
    def test_view_combines_store_pool_and_config(self) -> None:
        """Depth, wait and rate come from the store, workers and times from the pool, SLO and
        types from the config; backlog is depth x service time."""
        builder = ViewBuilder(_config(), rate_half_life_s=1.0)
        pool = PoolView(
            queues={
                "emb": QueuePoolView(
                    "emb", ready=2, busy=1, loading=1, model_load_s=0.75, service_time_s=0.2
                )
            }
        )
        builder.cluster_view(_stats(0, 0, depth=5), pool, now_s=10.0)
        view = builder.cluster_view(_stats(4, 2, depth=5), pool, now_s=12.0)
        assert (view.now_s, view.budget, view.tick_s) == (12.0, 4, 1.0)
        emb, gen = view.queues
        assert (emb.depth, emb.oldest_wait_s, emb.workers_ready, emb.workers_busy) == (5, 1.5, 2, 1)
        assert (emb.workers_loading, emb.model_load_s, emb.service_time_s) == (1, 0.75, 0.2)
        assert emb.backlog_s == pytest.approx(1.0)
        assert emb.arrival_rate_per_s == pytest.approx(2.0)
        assert gen.arrival_rate_per_s == pytest.approx(1.0)
        assert gen.slo_s == 2.5
        assert gen.job_types == frozenset({"generate"})
        assert gen.required_tags == frozenset({"gpu"})
        assert view.allocation() == {"emb": 3, "gen": 0}

    def test_unmeasured_service_time_falls_back_and_measured_is_remembered(self) -> None:
        """Before any job ran the service time is the default; after the workers leave, the last
        measured service and load times stay in the view."""
        builder = ViewBuilder(_config())
        empty = builder.cluster_view(_stats(0, 0), PoolView(), now_s=0.0)
        assert empty.queues[1].service_time_s == DEFAULT_SERVICE_TIME_S
        measured = PoolView(
            queues={"gen": QueuePoolView("gen", ready=1, model_load_s=3.0, service_time_s=0.4)}
        )
        builder.cluster_view(_stats(0, 0), measured, now_s=1.0)
        later = builder.cluster_view(_stats(0, 0), PoolView(), now_s=2.0)
        assert (later.queues[1].service_time_s, later.queues[1].model_load_s) == (0.4, 3.0)
        assert later.queues[1].allocated == 0


class TestBoundsAndJobs:
    def test_bounds_from_config(self) -> None:
        """Per-queue min/max and the move cap become the guardrails' bounds."""
        assert _config().bounds() == AllocationBounds(
            min_workers={"emb": 1, "gen": 0}, max_workers={"emb": 3}, max_moves_per_tick=1
        )

    def test_job_view_makes_the_deadline_absolute(self) -> None:
        """The store keeps deadlines relative to submission; the view's are on the arrival clock."""
        info = RouteInfo("j1", "embed", 3, 2.0, "acme", ("gpu",), 100.0)
        view = job_view(info, size_estimate_s=0.5)
        assert (view.deadline_s, view.arrival_s, view.priority) == (102.0, 100.0, 3)
        assert view.tags == frozenset({"gpu"})
        assert (view.tenant, view.size_estimate_s) == ("acme", 0.5)

    def test_routing_views_use_the_published_state(self) -> None:
        """The router sees the workers and service times the controller last published."""
        published = PublishedState(
            t_s=1.0,
            policy="x",
            queues={"emb": PublishedQueue(workers=2, ready=2, busy=1, service_time_s=0.25)},
        )
        restored = PublishedState.from_json(published.to_json())
        assert restored == published
        emb, gen = routing_queue_views(_config(), _stats(0, 0, depth=4), restored)
        assert (emb.workers_ready, emb.backlog_s) == (2, 1.0)
        assert gen.workers_ready == 0
        assert size_estimates_s([emb, gen]) == {"embed": 0.25, "generate": 1.0}

    def test_published_state_json_is_what_asdict_gives(self) -> None:
        """The shallow encoding writes exactly what dataclasses.asdict would, shadow included."""
        published = PublishedState(
            t_s=1.0,
            policy="x",
            queues={"emb": PublishedQueue(workers=2, ready=2), "gen": PublishedQueue(depth=3)},
            fallback="stale",
            shadow=PublishedShadow(
                policy="y", workers={"emb": 1}, estimate={"gain": 0.1}, promoted={"role": "a"}
            ),
        )
        assert json.loads(published.to_json()) == dataclasses.asdict(published)
        assert PublishedState.from_json(published.to_json()) == published

    def test_malformed_published_state_is_a_value_error(self) -> None:
        """Garbage under the key is reported, so the router can ignore it."""
        with pytest.raises(ValueError, match="malformed"):
            PublishedState.from_json('{"t_s": 1}')
