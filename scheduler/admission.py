"""Admission control and tenant fair share as the service configures them, published to Redis.

The service config's `admission:` section holds caps on queued jobs (all jobs, per queue, a
queue's estimated wait) and its `tenants:` section each tenant's weight, quota (max in flight)
and cap (max queued); `"*"` stands for every tenant not listed and for jobs without one. The
router publishes both at start as one hash (Keys.admission), which the Lua scripts read:
submit.lua refuses a job over a cap (Rejected, nothing written), enqueue.lua tags jobs for fair
share, lease.lua holds back jobs of a tenant at its quota. The controller publishes each queue's
drain rate every tick (Keys.drain), the denominator of the wait estimate. See
docs/admission-and-tenants.md.

Published fields (absent means no cap):
  v               '1': a service published this (otherwise submit applies DEFAULT_MAX_QUEUED)
  total           max_queued_total
  retry_ms        retry-after hint when no drain rate is known
  jt:<type>       the queues a job type maps to, comma-separated
  qcaps           '1' when some queue has a cap or a wait limit; then per queue
  qc:<queue>      its max_queued, qw:<queue> its max_wait_s in ms
  tcaps           '1' when some tenant has max_queued; tc:<tenant> it, tcd the default's
  fair            '1' when tenants are configured; tw:<tenant> the cost of one job
                  (policies.fairshare.cost), twd the default's
  quotas          '1' when some tenant has max_in_flight; tq:<tenant> it, tqd the default's
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from policies.fairshare import DEFAULT_TENANT, TenantShare, cost
from scheduler.keys import Keys

# Bytes of Redis memory one queued job holds with a typical payload (207 bytes of spec JSON: a
# prompt and a few options, a tenant and a tag): measured with INFO memory around 100,000 submits
# (benchmarks/bench_admission.py, Redis 7.0): 1,160 in the ingress, 1,471 once routed into a
# queue (order member, age entry, tenant counts), rounded up. Under the default total cap of a
# million queued jobs the queues hold at most about 1.5 GB.
MEASURED_BYTES_PER_JOB = 1500
# The total cap when the config says nothing: generous for any real backlog, but it stops a
# runaway producer before Redis runs out of memory (mirrored in _common.lua).
DEFAULT_MAX_QUEUED = 1_000_000
# Told to a refused client when no drain rate is known yet.
DEFAULT_RETRY_AFTER_S = 1.0
# The published drain rates outlive a few missed controller ticks, not a stopped controller: with
# no rate, no wait estimate refuses anything.
DRAIN_TTL_S = 30.0


class QueueAdmission(BaseModel):
    """Caps of one queue, checked at submit for jobs whose type maps to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The most jobs queued in it (routed, waiting for a worker); None: no cap.
    max_queued: int | None = Field(default=None, ge=0)
    # The longest estimated wait, (queued + 1) / recent drain rate, a new job may face; None:
    # the section's max_wait_s.
    max_wait_s: float | None = Field(default=None, gt=0)


class AdmissionConfig(BaseModel):
    """Caps on queued jobs, checked atomically at submit (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Jobs waiting in the ingress, the delayed set and every queue together; protects Redis
    # memory (about MEASURED_BYTES_PER_JOB each). None: no cap.
    max_queued_total: int | None = Field(default=DEFAULT_MAX_QUEUED, ge=0)
    # The wait limit of every queue without its own; None: none.
    max_wait_s: float | None = Field(default=None, gt=0)
    queues: dict[str, QueueAdmission] = Field(default_factory=dict)
    retry_after_s: float = Field(default=DEFAULT_RETRY_AFTER_S, gt=0)


def published_fields(
    admission: AdmissionConfig,
    tenants: Mapping[str, TenantShare],
    queue_types: Sequence[tuple[str, Sequence[str]]],
) -> dict[str, str]:
    """The admission hash's fields for these sections; `queue_types` is (queue, its job types)
    for every configured queue."""
    out: dict[str, str] = {"v": "1", "retry_ms": str(round(admission.retry_after_s * 1000))}
    if admission.max_queued_total is not None:
        out["total"] = str(admission.max_queued_total)
    limited: set[str] = set()
    for name, _ in queue_types:
        q = admission.queues.get(name, QueueAdmission())
        wait_s = q.max_wait_s if q.max_wait_s is not None else admission.max_wait_s
        if q.max_queued is not None:
            out[f"qc:{name}"] = str(q.max_queued)
            limited.add(name)
        if wait_s is not None:
            out[f"qw:{name}"] = str(round(wait_s * 1000))
            limited.add(name)
    if limited:
        out["qcaps"] = "1"
    # Always: a refusal of any cap is counted for the queue the job's type maps to.
    by_type: dict[str, list[str]] = {}
    for name, types in queue_types:
        for t in types:
            by_type.setdefault(t, []).append(name)
    for t, names in by_type.items():
        out[f"jt:{t}"] = ",".join(names)
    if tenants:
        out["fair"] = "1"
    for tenant, share in tenants.items():
        suffix = "d" if tenant == DEFAULT_TENANT else f":{tenant}"
        out[f"tw{suffix}"] = str(cost(share.weight))
        if share.max_queued is not None:
            out[f"tc{suffix}"] = str(share.max_queued)
            out["tcaps"] = "1"
        if share.max_in_flight is not None:
            out[f"tq{suffix}"] = str(share.max_in_flight)
            out["quotas"] = "1"
    return out


async def publish(redis: Any, keys: Keys, fields: Mapping[str, str]) -> None:
    """Replace the admission hash with `fields` in one transaction, so a submit sees the old
    caps or the new, never a mix."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.admission)
        pipe.hset(keys.admission, mapping=dict(fields))
        await pipe.execute()


async def publish_drain_rates(redis: Any, keys: Keys, rates_per_s: Mapping[str, float]) -> None:
    """Replace the drain rates (jobs/s per queue) the wait estimate divides by, with their TTL."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.drain)
        if rates_per_s:
            pipe.hset(keys.drain, mapping={q: f"{r:.6g}" for q, r in rates_per_s.items()})
            pipe.pexpire(keys.drain, round(DRAIN_TTL_S * 1000))
        await pipe.execute()
