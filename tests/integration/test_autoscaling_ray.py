"""AutoscaleRequester against a real local Ray: Ray's own request_resources and available_resources."""

from __future__ import annotations

import ray

from scheduler.service.autoscaling import AutoscaleRequester, WorkerShape, ray_available


def test_real_request_resources_without_an_autoscaler(ray_local: None) -> None:
    """A local Ray has no autoscaler: requesting and withdrawing are accepted no-ops."""
    free = ray_available()
    assert free["CPU"] > 0
    requester = AutoscaleRequester({"q": WorkerShape(num_cpus=1.0)})
    # Far more CPUs than the local Ray has (it has 4): a shortfall, so a real request is sent.
    decision = requester.update({"q": 1000}, held={})
    assert decision.changed
    assert decision.requesting
    total_cpus = ray.cluster_resources()["CPU"]  # type: ignore[no-untyped-call]
    assert decision.shortfall["CPU"] >= 1000 - total_cpus
    # The load falls: the request is withdrawn through the real API as well.
    decision = requester.update({"q": 1}, held={})
    assert decision.changed
    assert not decision.requesting
    assert requester.withdraw() is False
