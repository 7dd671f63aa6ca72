"""Tenant fair share: the weighted-fair-queueing rule a queue serves its tenants by.

Each queue keeps a virtual time `v` and, per tenant, the virtual finish tag of that tenant's last
queued job. A job entering the queue is tagged

    tag = max(v, last tag of its tenant) + cost(weight of its tenant),   cost(w) = round(1000 / w)

and the queue serves the lowest tag first (within a priority band, in the service). Serving a
job advances `v` to its tag (self-clocked fair queueing). So a tenant that keeps jobs queued is
served in proportion to its weight, and one that was idle comes back at `v`, with no credit saved
up: a heavy tenant's backlog delays a light tenant's new job by at most one job of each other
tenant with queued work (its tag is v + cost, theirs are at least v + their cost each), instead
of by the whole backlog as in arrival order.

The live service runs this rule in Lua (scheduler/lua/enqueue.lua tags, lease.lua advances the
virtual time); the simulator runs `FairQueue`, built on `finish_tag`. Integers throughout, so both
compute the same tags. Nothing here does I/O.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

# Virtual time one job of a tenant of weight 1 costs. Weights go from 0.001 to 1000, so a cost is
# 1 to 1,000,000, and the 15-digit tag field of a queue order member lasts 10^12 jobs of weight 1.
COST_SCALE = 1000
MAX_TAG = 10**15 - 1
# The tenant entry that stands for every tenant not listed, and for jobs without a tenant.
DEFAULT_TENANT = "*"


class TenantShare(BaseModel):
    """One tenant's share of the queues it uses, and its caps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Relative share of service when tenants compete in one queue and priority band.
    weight: float = Field(default=1.0, ge=0.001, le=1000.0)
    # Quota: the most of its jobs leased (running) at once, over all queues; None: no quota.
    max_in_flight: int | None = Field(default=None, ge=1)
    # Admission cap: the most of its jobs waiting (ingress and queues) at once; None: no cap.
    max_queued: int | None = Field(default=None, ge=0)


def cost(weight: float) -> int:
    """Virtual time one job of a tenant of `weight` costs (at least 1)."""
    return max(1, round(COST_SCALE / weight))


def finish_tag(virtual_time: int, last_tag: int, job_cost: int) -> int:
    """The tag of a job entering a queue at `virtual_time` whose tenant's last tag there is
    `last_tag` (0 when it has none): its virtual finish time."""
    return min(max(virtual_time, last_tag) + job_cost, MAX_TAG)


def share_of(shares: Mapping[str, TenantShare], tenant: str | None) -> TenantShare:
    """The share of `tenant` (None: a job without one): its own entry, else the default entry,
    else weight 1 with no caps."""
    if tenant is not None and tenant in shares:
        return shares[tenant]
    return shares.get(DEFAULT_TENANT) or _PLAIN


_PLAIN = TenantShare()


class FairQueue:
    """A queue of job indices served by weighted fair queueing over their tenants (the same rule
    and integers as the service). Quacks like the simulator's deque: `append`, `popleft`, `len`,
    and `[0]` is the job served next."""

    def __init__(self, shares: Mapping[str, TenantShare], tenants: tuple[str | None, ...]):
        """`tenants[job]` is each job's tenant (None: none)."""
        self._tenants = tenants
        self._costs: dict[str | None, int] = {}
        self._shares = shares
        self._heap: list[tuple[int, int, int]] = []
        self._last: dict[str | None, int] = {}
        self._seq = 0
        self.virtual_time = 0
        # Queued jobs per tenant: the demand the allocator sees.
        self.depths: dict[str | None, int] = {}

    def _cost(self, tenant: str | None) -> int:
        c = self._costs.get(tenant)
        if c is None:
            c = self._costs[tenant] = cost(share_of(self._shares, tenant).weight)
        return c

    def append(self, job: int) -> None:
        tenant = self._tenants[job]
        tag = finish_tag(self.virtual_time, self._last.get(tenant, 0), self._cost(tenant))
        self._last[tenant] = tag
        # Equal tags (tenants in step) go in arrival order.
        self._seq += 1
        heapq.heappush(self._heap, (tag, self._seq, job))
        self.depths[tenant] = self.depths.get(tenant, 0) + 1

    def popleft(self) -> int:
        tag, _, job = heapq.heappop(self._heap)
        tenant = self._tenants[job]
        self.virtual_time = max(self.virtual_time, tag)
        # As lease.lua does: a tenant whose last tag v has reached changes no later tag.
        if self._last.get(tenant, 0) <= self.virtual_time:
            self._last.pop(tenant, None)
        left = self.depths[tenant] - 1
        if left:
            self.depths[tenant] = left
        else:
            del self.depths[tenant]
        return job

    def __len__(self) -> int:
        return len(self._heap)

    def __getitem__(self, index: int) -> int:
        if index != 0:
            raise IndexError("a fair queue shows only its head")
        return self._heap[0][2]
