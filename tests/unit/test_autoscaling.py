"""AutoscaleRequester's decisions, driven by injected `request` and `available` functions (no Ray)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from scheduler.config import ServiceConfig
from scheduler.service.autoscaling import (
    MIB,
    AutoscaleRequester,
    Bundle,
    WorkerShape,
    workers_held,
)
from workers.pool_view import PoolView, QueuePoolView
from workers.registry import HandlerRegistry, Resources


class FakeRay:
    """The two functions the requester takes: records requests, serves a settable free pool."""

    def __init__(self, free: Mapping[str, float]) -> None:
        self.free = dict(free)
        self.requests: list[list[Bundle]] = []
        self.fail_requests = 0

    def request(self, bundles: Sequence[Bundle]) -> None:
        if self.fail_requests:
            self.fail_requests -= 1
            raise ConnectionError("GCS unavailable")
        self.requests.append([dict(b) for b in bundles])

    def available(self) -> Mapping[str, float]:
        return dict(self.free)


SHAPES = {
    "cpu": WorkerShape(num_cpus=1.0),
    "gpu": WorkerShape(num_cpus=2.0, num_gpus=0.5, memory_mb=1024),
}


def make(free: Mapping[str, float]) -> tuple[AutoscaleRequester, FakeRay]:
    fake = FakeRay(free)
    return AutoscaleRequester(SHAPES, request=fake.request, available=fake.available), fake


def test_no_request_while_the_target_fits() -> None:
    """Free resources cover the target: Ray is never called."""
    requester, fake = make({"CPU": 8.0, "GPU": 1.0, "memory": 8 * 1024 * MIB})
    decision = requester.update({"cpu": 2, "gpu": 2}, held={})
    assert fake.requests == []
    assert not decision.requesting
    assert decision.shortfall == {}


def test_short_target_requests_one_bundle_per_worker() -> None:
    """Short of CPUs: the whole target is requested, shaped per queue (Ray sizes it on totals)."""
    requester, fake = make({"CPU": 2.0, "GPU": 1.0, "memory": 8 * 1024 * MIB})
    decision = requester.update({"cpu": 3, "gpu": 1}, held={})
    assert decision.shortfall == {"CPU": 3.0}
    assert decision.changed
    assert fake.requests == [
        [
            {"CPU": 1.0},
            {"CPU": 1.0},
            {"CPU": 1.0},
            {"CPU": 2.0, "GPU": 0.5, "memory": float(1024 * MIB)},
        ]
    ]


def test_unchanged_request_is_not_sent_again() -> None:
    """Ray keeps a request until replaced: the same shortfall tick after tick calls it once."""
    requester, fake = make({"CPU": 1.0})
    for _ in range(5):
        decision = requester.update({"cpu": 4}, held={})
    assert len(fake.requests) == 1
    assert decision.requesting
    assert not decision.changed


def test_a_larger_target_replaces_the_request() -> None:
    """The load grows further while still short: the new, larger request replaces the old."""
    requester, fake = make({"CPU": 1.0})
    requester.update({"cpu": 3}, held={})
    requester.update({"cpu": 5}, held={})
    assert [len(r) for r in fake.requests] == [3, 5]


def test_request_is_withdrawn_when_the_load_falls() -> None:
    """The target fits again: one empty request withdraws it, and nothing more is sent."""
    requester, fake = make({"CPU": 1.0})
    requester.update({"cpu": 4}, held={})
    decision = requester.update({"cpu": 1}, held={})
    requester.update({"cpu": 1}, held={})
    assert fake.requests[-1] == []
    assert len(fake.requests) == 2
    assert decision.changed
    assert not decision.requesting


def test_request_is_withdrawn_when_nodes_arrive() -> None:
    """The autoscaler added a node (more free CPU): the shortfall is gone, so is the request."""
    requester, fake = make({"CPU": 1.0})
    requester.update({"cpu": 4}, held={})
    fake.free["CPU"] = 8.0
    assert not requester.update({"cpu": 4}, held={}).requesting
    assert fake.requests == [[{"CPU": 1.0}] * 4, []]


def test_resources_held_by_the_pool_count_as_capacity() -> None:
    """Moving 2 workers between queues needs nothing new: their own CPUs are reused."""
    requester, fake = make({"CPU": 0.0})
    decision = requester.update({"cpu": 2}, held={"gpu": 0, "cpu": 2})
    assert fake.requests == []
    assert decision.shortfall == {}


def test_gpu_shortfall_alone_triggers_a_request() -> None:
    """Plenty of CPU but no GPU: a GPU queue's workers are requested with their GPU share."""
    requester, fake = make({"CPU": 64.0, "memory": 64 * 1024 * MIB})
    decision = requester.update({"gpu": 2}, held={})
    assert decision.shortfall == {"GPU": 1.0}
    assert fake.requests == [[{"CPU": 2.0, "GPU": 0.5, "memory": float(1024 * MIB)}] * 2]


def test_fractional_cpus_add_up_exactly() -> None:
    """Ten workers of 0.1 CPU fit in one free CPU despite float rounding."""
    fake = FakeRay({"CPU": 1.0})
    requester = AutoscaleRequester(
        {"tiny": WorkerShape(num_cpus=0.1)}, request=fake.request, available=fake.available
    )
    assert requester.update({"tiny": 10}, held={}).shortfall == {}
    assert fake.requests == []


def test_a_failing_request_is_retried_on_the_next_update() -> None:
    """A Ray error is logged, not raised; the request goes out on the next tick."""
    requester, fake = make({"CPU": 0.0})
    fake.fail_requests = 1
    first = requester.update({"cpu": 2}, held={})
    assert not first.requesting
    assert not first.changed
    second = requester.update({"cpu": 2}, held={})
    assert second.changed
    assert fake.requests == [[{"CPU": 1.0}] * 2]


def test_a_failing_available_keeps_the_standing_request() -> None:
    """available() raising: no change is made, the standing request stays."""
    requester, fake = make({"CPU": 0.0})
    requester.update({"cpu": 2}, held={})

    def broken() -> Mapping[str, float]:
        raise ConnectionError("GCS unavailable")

    requester._available = broken
    decision = requester.update({"cpu": 0}, held={})
    assert decision.requesting
    assert not decision.changed
    assert len(fake.requests) == 1


def test_withdraw_on_stop() -> None:
    """withdraw() drops a standing request once; without one it calls nothing."""
    requester, fake = make({"CPU": 0.0})
    assert requester.withdraw() is False
    requester.update({"cpu": 1}, held={})
    assert requester.withdraw() is True
    assert requester.withdraw() is False
    assert fake.requests == [[{"CPU": 1.0}], []]


def test_unknown_and_zero_queues_are_ignored() -> None:
    """A queue without a shape (not configured) or with 0 workers adds no bundle."""
    requester, fake = make({"CPU": 0.0})
    requester.update({"cpu": 1, "other": 3, "gpu": 0}, held={})
    assert fake.requests == [[{"CPU": 1.0}]]


def test_workers_held_counts_every_worker_holding_resources() -> None:
    """Ready (busy included), loading and draining workers all hold their reservation."""
    view = PoolView(
        queues={
            "cpu": QueuePoolView("cpu", ready=2, busy=1, loading=1, draining=1),
            "gpu": QueuePoolView("gpu"),
        }
    )
    assert workers_held(view) == {"cpu": 4, "gpu": 0}


def test_from_config_takes_shapes_from_the_handlers() -> None:
    """Handler Resources decide a queue's shape; `worker.num_cpus` fills in a missing CPU need."""
    registry = HandlerRegistry()
    registry.register("vision", loader=dict, run=_echo, resources=Resources(gpu_fraction=0.25))
    registry.register(
        "text", loader=dict, run=_echo, resources=Resources(num_cpus=2.0, memory_mb=512)
    )
    config = ServiceConfig.from_mapping(
        {
            "handlers": [],
            "queues": [
                {"name": "vision", "job_types": ["vision"]},
                {"name": "text", "job_types": ["text"]},
            ],
            "allocation": {"budget": 2},
            "worker": {"num_cpus": 0.5},
        }
    )
    fake = FakeRay({})
    requester = AutoscaleRequester.from_config(
        config, registry, request=fake.request, available=fake.available
    )
    assert requester.shapes == {
        "vision": WorkerShape(num_cpus=0.5, num_gpus=0.25),
        "text": WorkerShape(num_cpus=2.0, memory_mb=512),
    }


def _echo(model: Any, payload: Any) -> Any:
    return payload


@pytest.mark.parametrize(
    ("shape", "bundle"),
    [
        (WorkerShape(num_cpus=0.5), {"CPU": 0.5}),
        (WorkerShape(num_cpus=0.0, num_gpus=1.0), {"GPU": 1.0}),
        (WorkerShape(num_cpus=1.0, memory_mb=2), {"CPU": 1.0, "memory": float(2 * MIB)}),
    ],
)
def test_bundle_shapes(shape: WorkerShape, bundle: Bundle) -> None:
    """Zero amounts are left out; memory is in bytes, as Ray counts it."""
    assert shape.bundle() == bundle
