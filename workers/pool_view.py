"""What the worker pool reports to the controller each tick (the contract between the two)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class QueuePoolView:
    """Workers assigned to one queue."""

    queue: str
    # Model loaded, serving or idle; busy is a subset of ready.
    ready: int = 0
    busy: int = 0
    # Assigned here and still loading this queue's model.
    loading: int = 0
    # Leaving this queue: finishing or releasing their leases before moving or stopping.
    draining: int = 0
    # Seconds the last load of this queue's model(s) took on a worker; 0.0 if never loaded.
    model_load_s: float = 0.0
    # Moving average of service seconds per job on one worker; 0.0 if no job ran yet.
    service_time_s: float = 0.0

    @property
    def allocated(self) -> int:
        return self.ready + self.loading


@dataclass(frozen=True, slots=True)
class PoolView:
    """The whole pool: per-queue counts, plus workers alive but assigned nowhere."""

    queues: dict[str, QueuePoolView] = field(default_factory=dict)
    unassigned: int = 0
    # Worker actors that died since the last view and were (or will be) replaced.
    replaced: int = 0

    @property
    def total(self) -> int:
        return self.unassigned + sum(q.allocated + q.draining for q in self.queues.values())
