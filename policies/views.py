"""Typed, immutable views the policies see, and the decisions they return.

The live service builds these from Redis stats and the worker pool; the simulator builds them from its
own state. Policies never see anything else, which is what lets one policy object run in both places.
Times are seconds on the caller's clock (`now_s`); the simulator's clock starts at 0.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Final, Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class JobView:
    """One job as level 1 sees it when routing."""

    job_id: str
    job_type: str
    arrival_s: float
    # Expected service seconds on one worker of the job's queue; 0.0 when nothing is known.
    size_estimate_s: float = 0.0
    priority: int = 0
    # Absolute deadline on the same clock as arrival_s; None means no deadline.
    deadline_s: float | None = None
    tenant: str | None = None
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class QueueView:
    """One task queue and the workers assigned to it, as both levels see it."""

    name: str
    # Job types this queue accepts; rule routing only sends these here.
    job_types: frozenset[str]
    depth: int = 0
    # Expected seconds of work waiting, for one worker (sum of size estimates).
    backlog_s: float = 0.0
    oldest_wait_s: float = 0.0
    arrival_rate_per_s: float = 0.0
    # Mean service seconds of one job on one worker.
    service_time_s: float = 1.0
    # Workers with the model loaded (idle or busy); busy is a subset of ready.
    workers_ready: int = 0
    workers_busy: int = 0
    # Workers assigned to this queue but still loading its model.
    workers_loading: int = 0
    # Seconds a worker spends loading this queue's model when it is moved here.
    model_load_s: float = 0.0
    # Target job completion time; None means no SLO.
    slo_s: float | None = None
    # Tags a job must carry (all of them) to be routed here by rule; empty means any.
    required_tags: frozenset[str] = frozenset()
    # Queued jobs per tenant ('' for jobs without one): the demand behind `depth`, tenant by
    # tenant. Empty when tenants are not tracked (a simulator queue in arrival order).
    tenant_depths: Mapping[str, int] = field(default_factory=dict)

    @property
    def allocated(self) -> int:
        """Workers currently assigned to this queue, loaded or loading."""
        return self.workers_ready + self.workers_loading

    @property
    def in_system(self) -> int:
        """Jobs waiting or in service."""
        return self.depth + self.workers_busy


# The numeric fields of a QueueView that `queue_column` serves, and two sums of them.
_NUMERIC_FIELDS: Final = (
    "depth",
    "backlog_s",
    "oldest_wait_s",
    "arrival_rate_per_s",
    "service_time_s",
    "workers_ready",
    "workers_busy",
    "workers_loading",
    "model_load_s",
)
_COLUMN: Final = {name: i for i, name in enumerate(_NUMERIC_FIELDS)}
_numeric_values = operator.attrgetter(*_NUMERIC_FIELDS)
# The tables of the last queue tuples read, newest last: (queues, (n, fields) float64,
# read-only). Two, since a tick reads the view it was given and one derived from it (the learned
# allocator's forecast view) in turn; with one they would evict each other.
_TABLES_KEPT: Final = 2
_tables: list[tuple[tuple[QueueView, ...], np.ndarray]] = []


def _keep(queues: tuple[QueueView, ...], table: np.ndarray) -> None:
    # The cache holds the tuple, so no other object can take its identity while it is there.
    _tables.append((queues, table))
    if len(_tables) > _TABLES_KEPT:
        del _tables[0]


def _table(queues: Sequence[QueueView]) -> np.ndarray:
    for kept, found in reversed(_tables):
        if kept is queues:
            cached: np.ndarray = found
            return cached
    table: np.ndarray = np.array([_numeric_values(q) for q in queues], dtype=np.float64).reshape(
        len(queues), len(_NUMERIC_FIELDS)
    )
    table.setflags(write=False)
    # Only a tuple is immutable, so only a tuple's table may be reused.
    if isinstance(queues, tuple):
        _keep(queues, table)
    return table


_RATE_COLUMN: Final = _COLUMN["arrival_rate_per_s"]
# Every field of a QueueView in constructor order, for rebuilding one with a field changed.
_QUEUE_FIELDS: Final = tuple(f.name for f in dataclass_fields(QueueView))
_RATE_AT: Final = _QUEUE_FIELDS.index("arrival_rate_per_s")
_queue_values = operator.attrgetter(*_QUEUE_FIELDS)


def with_arrival_rates(
    queues: tuple[QueueView, ...], rates: Sequence[float]
) -> tuple[QueueView, ...]:
    """`queues` with new arrival rates, in order. The same as `dataclasses.replace` per queue at
    half its cost; and the new tuple's column table is the old one's with the rate column
    replaced, not read again queue by queue."""
    out = []
    for q, rate in zip(queues, rates, strict=True):
        values = list(_queue_values(q))
        values[_RATE_AT] = rate
        out.append(QueueView(*values))
    new = tuple(out)
    table = _table(queues).copy()
    table[:, _RATE_COLUMN] = np.asarray(rates, dtype=np.float64)
    table.setflags(write=False)
    _keep(new, table)
    return new


def queue_column(queues: Sequence[QueueView], field: str) -> np.ndarray:
    """One numeric field of every queue ("depth", "service_time_s", ..., or "allocated" and
    "in_system"), float64 in queue order, read-only.

    A tick's allocator, features and guardrails read the same queues' fields a dozen times; at
    hundreds of queues one Python pass per field cost more than the arithmetic, so all fields are
    read in one pass and kept for the last tuple of queues asked about.
    """
    table = _table(queues)
    column: np.ndarray
    if field == "allocated":
        column = table[:, _COLUMN["workers_ready"]] + table[:, _COLUMN["workers_loading"]]
    elif field == "in_system":
        column = table[:, _COLUMN["depth"]] + table[:, _COLUMN["workers_busy"]]
    else:
        column = table[:, _COLUMN[field]]
    return column


@dataclass(frozen=True, slots=True)
class ClusterView:
    """Everything level 2 sees at one tick."""

    now_s: float
    tick_s: float
    # Total workers the allocation may use.
    budget: int
    queues: tuple[QueueView, ...]

    def allocation(self) -> dict[str, int]:
        """The current allocation, {queue: workers}."""
        return {q.name: q.allocated for q in self.queues}


@dataclass(frozen=True, slots=True)
class Rejection:
    """Level 1's answer for a job no queue may take; `reason` is shown to the user."""

    reason: str


# Level 1 decides a queue name (or a rejection) per job; level 2 a target {queue: workers}.
RouteDecision = str | Rejection
Allocation = dict[str, int]


class Router(Protocol):
    """Level 1: picks a queue for each job of a batch, in order."""

    name: str

    def route_batch(
        self,
        jobs: Sequence[JobView],
        queues: Sequence[QueueView],
        rng: np.random.Generator,
    ) -> list[RouteDecision]: ...


class Allocator(Protocol):
    """Level 2: a target number of workers per queue for this tick."""

    name: str

    def allocate(self, view: ClusterView) -> Allocation: ...


@dataclass(frozen=True, slots=True)
class AllocationBounds:
    """Guardrail limits; queues missing from the maps get the defaults."""

    min_workers: Mapping[str, int] = field(default_factory=dict)
    max_workers: Mapping[str, int] = field(default_factory=dict)
    default_min: int = 0
    default_max: int | None = None
    # At most this many workers change queue per tick; None means no cap.
    max_moves_per_tick: int | None = None
