"""One read of everything an operator looks at, from Redis alone: what /metrics and the dashboard show.

Redis holds all of the service's state, so any process that can reach it can report on it: the
store's per-queue stats (one script call), then one pipelined round trip for the running totals,
the timing histograms, the controller's published state and its recent decisions, the allocation
history, tenant usage and the leader locks, and the role hosts' health records. Nothing here
writes, except that expired health records and dead letters drop out of their indexes as their
readers always do.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from scheduler.config import ServiceConfig
from scheduler.keys import DECISIONS_LEN
from scheduler.service.decisions import DecisionRecord, DecisionTotals
from scheduler.service.health import RoleHealth, read_health
from scheduler.service.views import PublishedQueue, PublishedState
from scheduler.store import Store, StoreStats
from scheduler.timings import Histogram, QueueTimings, TenantUsage, parse_tenants

ROLE_NAMES = ("router", "controller")
# Allocation changes the dashboard's workers-over-time chart draws.
HISTORY_SHOWN = 300


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """Running totals of a queue beside the stats script's: failed attempts scheduled again,
    jobs dead-lettered, and jobs refused at admission ('rejected')."""

    retried: int = 0
    dead_lettered: int = 0
    rejected: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything read in one look at a namespace (see the module notes)."""

    namespace: str
    taken_s: float
    budget: int
    stats: StoreStats
    counts: dict[str, QueueCounts]
    timings: dict[str, QueueTimings]
    published: PublishedState | None
    leaders: dict[str, bool]
    roles: list[RoleHealth]
    decisions: list[DecisionRecord]
    decision_totals: DecisionTotals
    tenants: dict[str, TenantUsage]
    history: list[dict[str, Any]] = field(default_factory=list)
    # Seconds the reads took.
    read_s: float = 0.0

    def queue_names(self) -> list[str]:
        return list(self.stats.queues)


def _count(value: Any) -> int:
    text = value if isinstance(value, str) else None
    return int(text) if text is not None and text.isdigit() and len(text) <= 15 else 0


def _mapping(value: Any) -> dict[str, str]:
    """A pipelined HGETALL's reply; an error (a key of the wrong type) reads as empty."""
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


async def take_snapshot(
    store: Store, config: ServiceConfig, *, decisions: int = DECISIONS_LEN
) -> Snapshot:
    """Read the namespace of `store` for the queues of `config` (errors of Redis itself raise)."""
    started = time.monotonic()
    names = [q.name for q in config.queues]
    keys = store.keys
    stats = await store.stats(names)
    pipe = store.redis.pipeline(transaction=False)
    pipe.get(keys.allocation)
    for role in ROLE_NAMES:
        pipe.exists(keys.leader(role))
    for name in names:
        pipe.hmget(keys.counts(name), "retried", "dead", "rejected")
        pipe.hgetall(keys.timing(name))
    pipe.lrange(keys.decisions, 0, max(0, decisions) - 1)
    pipe.hgetall(keys.decision_totals)
    pipe.hgetall(keys.tenant_usage)
    pipe.lrange(keys.allocation_history, -HISTORY_SHOWN, -1)
    replies = iter(await pipe.execute(raise_on_error=False))
    raw_published = next(replies)
    try:
        published = (
            PublishedState.from_json(str(raw_published)) if isinstance(raw_published, str) else None
        )
    except ValueError:
        published = None
    leaders = {role: next(replies) == 1 for role in ROLE_NAMES}
    counts: dict[str, QueueCounts] = {}
    timings: dict[str, QueueTimings] = {}
    for name in names:
        c = next(replies)
        values = c if isinstance(c, list) else [None, None, None]
        counts[name] = QueueCounts(*(_count(v) for v in values))
        timings[name] = QueueTimings.parse(_mapping(next(replies)))
    raw_decisions = next(replies)
    kept: list[DecisionRecord] = []
    for text in raw_decisions if isinstance(raw_decisions, list) and decisions > 0 else []:
        try:
            kept.append(DecisionRecord.from_json(str(text)))
        except ValueError:
            continue
    totals = DecisionTotals.parse(_mapping(next(replies)))
    tenants = parse_tenants(_mapping(next(replies)))
    history: list[dict[str, Any]] = []
    raw_history = next(replies)
    for text in raw_history if isinstance(raw_history, list) else []:
        try:
            entry = json.loads(str(text))
            history.append({"t_s": float(entry["t_s"]), "workers": dict(entry["workers"])})
        except (ValueError, KeyError, TypeError):
            continue
    roles = await read_health(store.redis, keys)
    return Snapshot(
        namespace=store.settings.namespace,
        taken_s=time.time(),
        budget=config.allocation.budget,
        stats=stats,
        counts=counts,
        timings=timings,
        published=published,
        leaders=leaders,
        roles=roles,
        decisions=kept,
        decision_totals=totals,
        tenants=tenants,
        history=history,
        read_s=time.monotonic() - started,
    )


def _histogram_json(h: Histogram) -> dict[str, Any]:
    return {
        "count": h.count,
        "mean_s": h.mean_s,
        "p50_s": h.quantile(0.5),
        "p95_s": h.quantile(0.95),
        "p99_s": h.quantile(0.99),
    }


def role_json(r: RoleHealth, now_s: float) -> dict[str, Any]:
    """One role host as /api/state shows it: its state judged now and its figures."""
    return {
        "role": r.role,
        "name": r.name,
        "state": r.state(now_s),
        "leading": r.leading,
        "last_progress_s": min(r.last_progress_s, r.election_progress_s),
        "failures": r.failures,
        "restarts": r.restarts,
        "last_error": r.last_error,
        "figures": dict(r.figures),
    }


def state_json(snap: Snapshot) -> dict[str, Any]:
    """/api/state: the snapshot as plain JSON, per queue with its JCT and wait percentiles
    (estimated from the histograms, as Prometheus' histogram_quantile would)."""
    published: Mapping[str, PublishedQueue] = (
        snap.published.queues if snap.published is not None else {}
    )
    queues = []
    for name, q in snap.stats.queues.items():
        pub = published.get(name)
        t = snap.timings.get(name, QueueTimings())
        c = snap.counts.get(name, QueueCounts())
        queues.append(
            {
                "name": name,
                "depth": q.depth,
                "oldest_wait_s": q.oldest_wait_s,
                "in_flight": q.in_flight,
                "dead": q.dead,
                "enqueued_total": q.enqueued_total,
                "completed_total": q.completed_total,
                "failed_total": q.failed_total,
                "retried_total": c.retried,
                "dead_lettered_total": c.dead_lettered,
                "rejected_total": c.rejected,
                "arrival_rate_per_s": pub.arrival_rate_per_s if pub else None,
                "completion_rate_per_s": pub.completion_rate_per_s if pub else None,
                "service_time_s": pub.service_time_s if pub else None,
                "workers": None
                if pub is None
                else {
                    "target": pub.workers,
                    "ready": pub.ready,
                    "busy": pub.busy,
                    "loading": pub.loading,
                    "draining": pub.draining,
                },
                "jct": _histogram_json(t.jct),
                "wait": _histogram_json(t.wait),
                "model_loads": {"count": t.model_load.count, "mean_s": t.model_load.mean_s},
                "slo": {
                    "slo_s": t.slo_s,
                    "judged": t.slo_judged,
                    "met": t.slo_met,
                    "attainment": t.slo_attainment,
                },
            }
        )
    totals = snap.decision_totals
    return {
        "namespace": snap.namespace,
        "t_s": snap.taken_s,
        "read_s": snap.read_s,
        "ingress": snap.stats.ingress,
        "delayed": snap.stats.delayed,
        "budget": snap.budget,
        "policy": snap.published.policy if snap.published else None,
        "fallback": snap.published.fallback if snap.published else None,
        "controller_t_s": snap.published.t_s if snap.published else None,
        "leaders": snap.leaders,
        "queues": queues,
        "roles": [role_json(r, snap.taken_s) for r in snap.roles],
        "decisions": [d.to_dict() for d in snap.decisions],
        "decision_totals": {
            "ticks": totals.ticks,
            "changes": totals.changes,
            "fallbacks": totals.fallbacks,
            "guardrails": totals.guardrails,
        },
        "tenants": {
            t: {"completed": u.completed, "leased_s": u.leased_s} for t, u in snap.tenants.items()
        },
        "history": snap.history,
        "corrupt_records": snap.stats.corrupt_records,
        "keys_moved_aside": snap.stats.keys_moved_aside,
    }


__all__ = ["QueueCounts", "Snapshot", "role_json", "state_json", "take_snapshot"]
