"""Configs and a worker-pool double shared by the service tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policies.views import Allocation, ClusterView
from scheduler.config import ServiceConfig
from scheduler.settings import Settings
from workers.pool_view import PoolView, QueuePoolView

DEMO_QUEUES: list[dict[str, Any]] = [
    {"name": "embeddings", "job_types": ["embed"]},
    {"name": "classifier", "job_types": ["classify"]},
    {"name": "generator", "job_types": ["generate"], "required_tags": []},
]


def service_config(settings: Settings, **overrides: Any) -> ServiceConfig:
    """The demo's three queues on the test's Redis and namespace, with `overrides` on top."""
    raw: dict[str, Any] = {
        "store": settings.model_dump(),
        "queues": DEMO_QUEUES,
        "allocation": {"budget": 3, "tick_s": 0.2, "policy": "proportional"},
        **overrides,
    }
    return ServiceConfig.from_mapping(raw)


class PoolDouble:
    """Bookkeeping-only pool with the WorkerPool methods: moved workers load instantly, so a
    target is in effect at the next view. For controller tests that need no Ray."""

    def __init__(self, service_time_s: float = 0.0, model_load_s: float = 0.0) -> None:
        self.workers: dict[str, int] = {}
        self.applied: list[dict[str, int]] = []
        self.service_time_s = service_time_s
        self.model_load_s = model_load_s
        self.dead = 0
        self.closed = False

    async def apply(self, target: Mapping[str, int]) -> dict[str, int]:
        self.applied.append(dict(target))
        self.workers = dict(target)
        return dict(target)

    async def view(self) -> PoolView:
        return PoolView(
            queues={
                q: QueuePoolView(
                    q, ready=n, model_load_s=self.model_load_s, service_time_s=self.service_time_s
                )
                for q, n in self.workers.items()
            }
        )

    async def replace_dead(self) -> int:
        replaced, self.dead = self.dead, 0
        return replaced

    async def shutdown(self) -> None:
        self.closed = True


class Greedy:
    """Proposes every worker for one queue."""

    name = "greedy"

    def __init__(self, queue: str) -> None:
        self.queue = queue

    def allocate(self, view: ClusterView) -> Allocation:
        return {q.name: view.budget if q.name == self.queue else 0 for q in view.queues}


class Broken:
    """An allocator that always raises, as a learned policy with a bad checkpoint might."""

    name = "broken"

    def allocate(self, view: ClusterView) -> Allocation:
        raise RuntimeError("checkpoint has the wrong shape")
