"""Prometheus metrics of a namespace, computed on scrape from Redis (a custom prometheus_client
Collector over scheduler.service.snapshot).

Why a collector that reads Redis, and not Ray's metrics API (ray.util.metrics): the numbers
that matter (queue depths, totals, histograms, decisions) are the namespace's, kept in Redis by
whichever process moved the job, not any one process's; a collector reading them on scrape gives
the same answer from any host, survives every restart and failover (no counter lives in a
process), and needs neither Ray's dashboard agent nor its metrics export port on every node
(the service starts Ray without the dashboard), only a loopback port of its own. Ray's own
metrics, where Ray runs its dashboard, stay available beside these.

Every family carries a `namespace` label. The list, with types and labels, is in
docs/operations.md; `families` is the whole mapping from a snapshot to them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from scheduler.logs import get_logger
from scheduler.retry import describe
from scheduler.service.snapshot import QueueCounts, Snapshot
from scheduler.timings import Histogram, QueueTimings

log = get_logger("bilevel.metrics")

# The states a queue's workers are counted in (busy is a subset of ready).
WORKER_STATES = ("ready", "busy", "loading", "draining")


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=["namespace", *labels])


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=["namespace", *labels])


def _le(bound_s: float) -> str:
    """A bucket's `le` label as Prometheus writes it ('+Inf', '0.005', '10.0')."""
    return "+Inf" if math.isinf(bound_s) else repr(float(bound_s))


def _histogram(
    name: str, doc: str, snap: Snapshot, pick: Callable[[QueueTimings], Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["namespace", "queue"])
    for queue, t in snap.timings.items():
        h = pick(t)
        buckets = [(_le(bound), float(n)) for bound, n in h.cumulative()]
        family.add_metric([snap.namespace, queue], buckets, sum_value=h.sum_s)
    return family


def families(snap: Snapshot) -> list[Metric]:
    """Every metric family of one snapshot."""
    ns = snap.namespace
    out: list[Metric] = []

    def per_queue(family: Any, value: Callable[[str], float | None]) -> None:
        for queue in snap.queue_names():
            v = value(queue)
            if v is not None:
                family.add_metric([ns, queue], v)
        out.append(family)

    stats = snap.stats.queues
    counts = snap.counts
    published = snap.published.queues if snap.published is not None else {}

    up = _gauge("bilevel_up", "1: this scrape read the namespace from Redis.", [])
    up.add_metric([ns], 1.0)
    read = _gauge("bilevel_scrape_read_seconds", "Seconds the scrape's Redis reads took.", [])
    read.add_metric([ns], snap.read_s)
    ingress = _gauge("bilevel_ingress_depth", "Jobs submitted and not yet routed.", [])
    ingress.add_metric([ns], float(snap.stats.ingress))
    delayed = _gauge("bilevel_delayed_jobs", "Jobs delayed or waiting to retry.", [])
    delayed.add_metric([ns], float(snap.stats.delayed))
    budget = _gauge("bilevel_allocation_budget", "Workers level 2 may hand out.", [])
    budget.add_metric([ns], float(snap.budget))
    out += [up, read, ingress, delayed, budget]

    per_queue(
        _gauge("bilevel_queue_depth", "Jobs queued (waiting for a worker).", ["queue"]),
        lambda q: float(stats[q].depth),
    )
    per_queue(
        _gauge("bilevel_queue_oldest_wait_seconds", "Age of the oldest queued job.", ["queue"]),
        lambda q: stats[q].oldest_wait_s,
    )
    per_queue(
        _gauge("bilevel_queue_in_flight", "Jobs leased to workers now.", ["queue"]),
        lambda q: float(stats[q].in_flight),
    )
    per_queue(
        _gauge("bilevel_queue_dead_letters", "Jobs in the dead-letter set now.", ["queue"]),
        lambda q: float(stats[q].dead),
    )
    per_queue(
        _counter("bilevel_jobs_arrived", "Jobs routed into the queue.", ["queue"]),
        lambda q: float(stats[q].enqueued_total),
    )
    per_queue(
        _counter("bilevel_jobs_completed", "Jobs that succeeded.", ["queue"]),
        lambda q: float(stats[q].completed_total),
    )
    per_queue(
        _counter("bilevel_job_attempts_failed", "Attempts that failed.", ["queue"]),
        lambda q: float(stats[q].failed_total),
    )
    per_queue(
        _counter("bilevel_jobs_retried", "Failed attempts scheduled to run again.", ["queue"]),
        lambda q: float(counts.get(q, QueueCounts()).retried),
    )
    per_queue(
        _counter("bilevel_jobs_dead_lettered", "Jobs dead-lettered.", ["queue"]),
        lambda q: float(counts.get(q, QueueCounts()).dead_lettered),
    )
    per_queue(
        _counter("bilevel_jobs_rejected", "Jobs refused at admission.", ["queue"]),
        lambda q: float(counts.get(q, QueueCounts()).rejected),
    )
    out.append(
        _histogram(
            "bilevel_jct_seconds",
            "Job completion time of succeeded jobs, submit to success.",
            snap,
            lambda t: t.jct,
        )
    )
    out.append(
        _histogram(
            "bilevel_queue_wait_seconds",
            "Queue wait of succeeded jobs, submit to first lease.",
            snap,
            lambda t: t.wait,
        )
    )
    out.append(
        _histogram(
            "bilevel_model_load_seconds",
            "Model loads of workers assigned to the queue (count: loads).",
            snap,
            lambda t: t.model_load,
        )
    )
    timings = snap.timings
    per_queue(
        _counter(
            "bilevel_slo_judged",
            "Succeeded jobs judged against their deadline or the queue's SLO.",
            ["queue"],
        ),
        lambda q: float(timings[q].slo_judged) if q in timings else None,
    )
    per_queue(
        _counter("bilevel_slo_met", "Judged jobs that met their deadline or SLO.", ["queue"]),
        lambda q: float(timings[q].slo_met) if q in timings else None,
    )
    per_queue(
        _gauge(
            "bilevel_slo_attainment_ratio",
            "Share of judged jobs that met their deadline or SLO, since the namespace began.",
            ["queue"],
        ),
        lambda q: timings[q].slo_attainment if q in timings else None,
    )
    per_queue(
        _gauge("bilevel_queue_slo_seconds", "The queue's SLO.", ["queue"]),
        lambda q: timings[q].slo_s if q in timings else None,
    )
    per_queue(
        _gauge(
            "bilevel_queue_arrival_rate_per_second",
            "Arrival rate as the controller estimates it.",
            ["queue"],
        ),
        lambda q: published[q].arrival_rate_per_s if q in published else None,
    )
    per_queue(
        _gauge(
            "bilevel_queue_service_time_seconds",
            "Mean service seconds per job as the workers measure it.",
            ["queue"],
        ),
        lambda q: published[q].service_time_s if q in published else None,
    )
    per_queue(
        _gauge("bilevel_workers_target", "Workers level 2 last gave the queue.", ["queue"]),
        lambda q: float(published[q].workers) if q in published else None,
    )
    workers = _gauge(
        "bilevel_workers",
        "Workers of the queue by state (busy is part of ready).",
        ["queue", "state"],
    )
    for queue, p in published.items():
        for state in WORKER_STATES:
            workers.add_metric([ns, queue, state], float(getattr(p, state)))
    out.append(workers)

    out += _role_families(snap)
    out += _decision_families(snap)
    tenant_jobs = _counter(
        "bilevel_tenant_jobs_completed", "Jobs succeeded per tenant.", ["tenant"]
    )
    tenant_s = _counter(
        "bilevel_tenant_leased_seconds",
        "Seconds a tenant's succeeded jobs held a lease (first lease to success).",
        ["tenant"],
    )
    for tenant, usage in snap.tenants.items():
        tenant_jobs.add_metric([ns, tenant], float(usage.completed))
        tenant_s.add_metric([ns, tenant], usage.leased_s)
    out += [tenant_jobs, tenant_s]
    corrupt = _counter(
        "bilevel_corrupt_records", "Job records readers found corrupt and dead-lettered.", []
    )
    corrupt.add_metric([ns], float(snap.stats.corrupt_records))
    aside = _counter("bilevel_keys_moved_aside", "Keys of the wrong type moved aside.", [])
    aside.add_metric([ns], float(snap.stats.keys_moved_aside))
    out += [corrupt, aside]
    return out


def _role_families(snap: Snapshot) -> list[Metric]:
    ns = snap.namespace
    leader = _gauge("bilevel_leader", "1 while some host holds the role's leader lock.", ["role"])
    for role, held in snap.leaders.items():
        leader.add_metric([ns, role], 1.0 if held else 0.0)
    state = _gauge(
        "bilevel_role_state",
        "1 for the state each role host is in (leading, standby, failing, stalled, gone).",
        ["role", "host", "state"],
    )
    leading = _gauge("bilevel_role_leading", "1 while the host leads its role.", ["role", "host"])
    progress = _gauge(
        "bilevel_role_last_progress_timestamp_seconds",
        "When the host's loop last completed a step (Unix time).",
        ["role", "host"],
    )
    failures = _gauge(
        "bilevel_role_failures",
        "The host's failed steps since its last good one.",
        ["role", "host"],
    )
    restarts = _counter(
        "bilevel_role_restarts", "Loop restarts by the host's watchdog.", ["role", "host"]
    )
    tick = _gauge(
        "bilevel_role_tick_seconds",
        "Duration of the host's last step (the controller's last full tick).",
        ["role", "host"],
    )
    lag_jobs = _gauge(
        "bilevel_router_lag_jobs", "Jobs in the ingress at the router's last look.", ["host"]
    )
    lag_s = _gauge("bilevel_router_lag_seconds", "Age of the oldest ingress job then.", ["host"])
    routed = _counter("bilevel_router_routed", "Jobs routed by this router host.", ["host"])
    now_s = snap.taken_s
    for r in snap.roles:
        labels = [ns, r.role, r.name]
        state.add_metric([*labels, r.state(now_s)], 1.0)
        leading.add_metric(labels, 1.0 if r.leading else 0.0)
        progress.add_metric(labels, min(r.last_progress_s, r.election_progress_s))
        failures.add_metric(labels, float(r.failures))
        restarts.add_metric(labels, float(r.restarts))
        if "last_tick_s" in r.figures:
            tick.add_metric(labels, r.figures["last_tick_s"])
        if r.role == "router":
            lag_jobs.add_metric([ns, r.name], r.figures.get("lag_jobs", 0.0))
            lag_s.add_metric([ns, r.name], r.figures.get("lag_s", 0.0))
            routed.add_metric([ns, r.name], r.figures.get("routed_total", 0.0))
    return [leader, state, leading, progress, failures, restarts, tick, lag_jobs, lag_s, routed]


def _decision_families(snap: Snapshot) -> list[Metric]:
    ns = snap.namespace
    t = snap.decision_totals
    ticks = _counter("bilevel_controller_ticks", "Full level-2 ticks.", [])
    ticks.add_metric([ns], float(t.ticks))
    changes = _counter("bilevel_allocation_changes", "Ticks that changed the allocation.", [])
    changes.add_metric([ns], float(t.changes))
    fallbacks = _counter(
        "bilevel_allocation_fallbacks", "Ticks where the fallback allocator decided.", []
    )
    fallbacks.add_metric([ns], float(t.fallbacks))
    guardrails = _counter(
        "bilevel_guardrail_interventions",
        "Ticks in which the guardrail changed the proposal.",
        ["guardrail"],
    )
    for name, n in t.guardrails.items():
        guardrails.add_metric([ns, name], float(n))
    return [ticks, changes, fallbacks, guardrails]


class SnapshotCollector(Collector):
    """Reads a fresh snapshot on every scrape (`source` raises when Redis cannot be read: then
    the scrape says bilevel_up 0 and nothing else, so an alert can tell 'no data' from 'zero')."""

    def __init__(self, source: Callable[[], Snapshot], namespace: str) -> None:
        self.source = source
        self.namespace = namespace

    def describe(self) -> Iterable[Metric]:
        # Nothing up front: registering must not read Redis.
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            snap = self.source()
        except Exception as exc:
            log.warning("metrics_read_failed", error=describe(exc))
            up = _gauge("bilevel_up", "1: this scrape read the namespace from Redis.", [])
            up.add_metric([self.namespace], 0.0)
            yield up
            return
        yield from families(snap)


__all__ = ["WORKER_STATES", "SnapshotCollector", "families"]
