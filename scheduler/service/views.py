"""Building the policies' views (policies.views) from store stats, the pool view and the config.

Rates are not stored anywhere: the store keeps running totals per queue (enqueued, completed), and
`RateEstimator` turns their deltas between ticks into per-second rates smoothed by an EWMA whose
weight depends on the time elapsed, so an irregular tick (a slow round trip) weighs what it covers.

The controller publishes what it knows of the pool each tick (`PublishedState`, JSON in Redis) so
the router, which has no pool of its own, can give load-aware routers the same worker counts.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from policies.views import ClusterView, JobView, QueueView
from scheduler.config import QueueConfig, ServiceConfig
from scheduler.store import QueueStats, RouteInfo, StoreStats
from workers.pool_view import PoolView, QueuePoolView

# Service seconds assumed for a queue until a worker has measured one.
DEFAULT_SERVICE_TIME_S = 1.0
# Rates forget half of their past in this many seconds: fast enough to follow a load shift within
# a few ticks, slow enough that one burst does not swing the allocation.
DEFAULT_RATE_HALF_LIFE_S = 5.0


class RateEstimator:
    """Per-key rates (per second) from running totals, smoothed by a time-aware EWMA.

    The first observation of a key only sets its baseline (rate 0.0). A total that goes down (the
    namespace was flushed) resets the baseline instead of producing a negative rate.
    """

    def __init__(self, half_life_s: float = DEFAULT_RATE_HALF_LIFE_S) -> None:
        if half_life_s <= 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self.half_life_s = half_life_s
        self._last: dict[str, tuple[float, int]] = {}
        # Only keys with at least one delta; the first delta is taken as is (no prior to smooth).
        self.rates_per_s: dict[str, float] = {}

    def update(self, totals: Mapping[str, int], now_s: float) -> dict[str, float]:
        """Feed the totals seen at `now_s`; returns the current rate of every key fed so far."""
        for key, total in totals.items():
            last = self._last.get(key)
            self._last[key] = (now_s, total)
            if last is None or total < last[1]:
                continue
            dt_s = now_s - last[0]
            if dt_s <= 0:
                continue
            instant = (total - last[1]) / dt_s
            # Weight of the new sample: 1 - 2^(-dt/half_life), so equal time spans weigh equally
            # whatever the tick length.
            alpha = 1.0 - math.exp(-dt_s * math.log(2) / self.half_life_s)
            previous = self.rates_per_s.get(key)
            self.rates_per_s[key] = (
                instant if previous is None else previous + alpha * (instant - previous)
            )
        return {key: self.rates_per_s.get(key, 0.0) for key in self._last}


def job_view(info: RouteInfo, *, size_estimate_s: float = 0.0) -> JobView:
    """Level 1's view of a pending job. The stored deadline is relative to submission; the view's
    is absolute on the same clock as arrival_s."""
    return JobView(
        job_id=info.id,
        job_type=info.job_type,
        arrival_s=info.created_s,
        size_estimate_s=size_estimate_s,
        priority=info.priority,
        deadline_s=None if info.deadline_s is None else info.created_s + info.deadline_s,
        tenant=info.tenant,
        tags=frozenset(info.tags),
    )


def queue_view(
    queue: QueueConfig,
    stats: QueueStats | None,
    *,
    ready: int = 0,
    busy: int = 0,
    loading: int = 0,
    service_time_s: float = DEFAULT_SERVICE_TIME_S,
    model_load_s: float = 0.0,
    arrival_rate_per_s: float = 0.0,
) -> QueueView:
    """One queue's view: depth and oldest wait from the store, workers from the pool, backlog as
    depth x mean service time (the store does not know job sizes)."""
    depth = stats.depth if stats is not None else 0
    return QueueView(
        name=queue.name,
        job_types=frozenset(queue.job_types),
        depth=depth,
        backlog_s=depth * service_time_s,
        oldest_wait_s=stats.oldest_wait_s if stats is not None else 0.0,
        arrival_rate_per_s=arrival_rate_per_s,
        service_time_s=service_time_s,
        workers_ready=ready,
        workers_busy=min(busy, ready),
        workers_loading=loading,
        model_load_s=model_load_s,
        slo_s=queue.slo_s,
        required_tags=frozenset(queue.required_tags),
        tenant_depths=dict(stats.tenants) if stats is not None else {},
    )


class ViewBuilder:
    """Builds the controller's ClusterView each tick, remembering what the pool measured.

    A queue whose workers all left reports no service or load time in the pool view; the last
    measured values are kept so the allocator still knows what moving a worker back would cost.
    """

    def __init__(
        self, config: ServiceConfig, *, rate_half_life_s: float = DEFAULT_RATE_HALF_LIFE_S
    ) -> None:
        self.config = config
        self.arrivals = RateEstimator(rate_half_life_s)
        self.completions = RateEstimator(rate_half_life_s)
        self.service_time_s: dict[str, float] = {}
        self.model_load_s: dict[str, float] = {}

    def cluster_view(self, stats: StoreStats, pool: PoolView, now_s: float) -> ClusterView:
        names = [q.name for q in self.config.queues]
        per_queue = stats.queues
        arrivals = self.arrivals.update(
            {n: per_queue[n].enqueued_total for n in names if n in per_queue}, now_s
        )
        self.completions.update(
            {n: per_queue[n].completed_total for n in names if n in per_queue}, now_s
        )
        views = []
        for q in self.config.queues:
            p = pool.queues.get(q.name, QueuePoolView(q.name))
            if p.service_time_s > 0:
                self.service_time_s[q.name] = p.service_time_s
            if p.model_load_s > 0:
                self.model_load_s[q.name] = p.model_load_s
            views.append(
                queue_view(
                    q,
                    per_queue.get(q.name),
                    ready=p.ready,
                    busy=p.busy,
                    loading=p.loading,
                    service_time_s=self.service_time_s.get(q.name, DEFAULT_SERVICE_TIME_S),
                    model_load_s=self.model_load_s.get(q.name, 0.0),
                    arrival_rate_per_s=arrivals.get(q.name, 0.0),
                )
            )
        return ClusterView(
            now_s=now_s,
            tick_s=self.config.allocation.tick_s,
            budget=self.config.allocation.budget,
            queues=tuple(views),
        )


# Per dataclass: its field names, and one getter of all of them (a C-level loop).
_FIELD_GETTERS: dict[type, tuple[tuple[str, ...], Callable[[Any], Any]]] = {}


def field_values(obj: Any) -> dict[str, Any]:
    """A dataclass's fields by name, in order, values as they are (not copied): asdict without
    its recursion and deep copies, for records whose fields are JSON values already."""
    known = _FIELD_GETTERS.get(type(obj))
    if known is None:
        names = tuple(f.name for f in fields(obj))
        # attrgetter of one name returns the value, not a 1-tuple.
        getter = (
            operator.attrgetter(*names) if len(names) > 1 else lambda o: (getattr(o, names[0]),)
        )
        known = _FIELD_GETTERS[type(obj)] = (names, getter)
    names, getter = known
    return dict(zip(names, getter(obj), strict=True))


@dataclass(frozen=True, slots=True)
class PublishedQueue:
    """One queue in the controller's published state."""

    workers: int = 0
    ready: int = 0
    busy: int = 0
    loading: int = 0
    draining: int = 0
    depth: int = 0
    service_time_s: float = DEFAULT_SERVICE_TIME_S
    model_load_s: float = 0.0
    arrival_rate_per_s: float = 0.0
    completion_rate_per_s: float = 0.0


@dataclass(frozen=True, slots=True)
class PublishedShadow:
    """The shadow policy in the controller's published state (scheduler.service.shadow)."""

    # The policy deciding beside the acting one, and what it decided this tick.
    policy: str
    workers: dict[str, int] = field(default_factory=dict)
    # Which of the two configured policies acts: "configured" (allocation.policy) or "shadow"
    # (allocation.shadow, after a promotion; then `policy` above is allocation.policy).
    acting_role: str = "configured"
    fallback: str | None = None
    # The latest estimate (policies.sim.counterfactual.CounterfactualEstimate.to_dict() and its
    # t_s); None until the first window is long enough.
    estimate: dict[str, float] | None = None
    # allocation.shadow_promote as configured ({after_s, min_gain}); None: manual promotion only.
    auto_promote: dict[str, float] | None = None
    # The last promotion this controller applied: {role, by, t_s}.
    promoted: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class PublishedState:
    """What the controller publishes each tick (JSON under Keys.allocation)."""

    t_s: float
    policy: str
    queues: dict[str, PublishedQueue] = field(default_factory=dict)
    # Why the guardrails replaced the policy's proposal this tick, if they did.
    fallback: str | None = None
    # Present when allocation.shadow names a shadow policy.
    shadow: PublishedShadow | None = None

    def to_json(self) -> str:
        # What dataclasses.asdict would give, built shallowly: every field already holds JSON
        # values, and asdict's deep copy of 256 queues was most of a controller tick's time.
        raw = field_values(self)
        raw["queues"] = {name: field_values(q) for name, q in self.queues.items()}
        raw["shadow"] = None if self.shadow is None else field_values(self.shadow)
        return json.dumps(raw, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> PublishedState:
        """Parse published state; ValueError when it is not what `to_json` writes."""
        try:
            raw: dict[str, Any] = json.loads(text)
            queues = {str(k): PublishedQueue(**v) for k, v in raw["queues"].items()}
            shadow = raw.get("shadow")
            return cls(
                t_s=float(raw["t_s"]),
                policy=str(raw["policy"]),
                queues=queues,
                fallback=raw.get("fallback"),
                shadow=None if shadow is None else PublishedShadow(**shadow),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"published state is malformed: {exc}") from exc


def routing_queue_views(
    config: ServiceConfig, stats: StoreStats, published: PublishedState | None
) -> list[QueueView]:
    """Level 1's queue views: depth from the store, workers and service times as the controller
    last published them (none before its first tick, which load-aware routers treat as unstaffed)."""
    views = []
    for q in config.queues:
        p = published.queues.get(q.name) if published is not None else None
        if p is None:
            views.append(queue_view(q, stats.queues.get(q.name)))
            continue
        views.append(
            queue_view(
                q,
                stats.queues.get(q.name),
                ready=p.ready,
                busy=p.busy,
                loading=p.loading,
                service_time_s=p.service_time_s,
                model_load_s=p.model_load_s,
                arrival_rate_per_s=p.arrival_rate_per_s,
            )
        )
    return views


def size_estimates_s(queues: Iterable[QueueView]) -> dict[str, float]:
    """Expected service seconds per job type: the fastest queue that accepts the type (what a
    load-aware router would pick when the queues are idle)."""
    out: dict[str, float] = {}
    for q in queues:
        for job_type in q.job_types:
            out[job_type] = min(out.get(job_type, math.inf), q.service_time_s)
    return out


__all__ = [
    "DEFAULT_SERVICE_TIME_S",
    "PublishedQueue",
    "PublishedShadow",
    "PublishedState",
    "RateEstimator",
    "ViewBuilder",
    "field_values",
    "job_view",
    "queue_view",
    "routing_queue_views",
    "size_estimates_s",
]
