"""Tenant fair share and quotas in the store scripts, against a real Redis: the order they serve
is the pure rule's (policies.fairshare), quotas hold jobs back, and per-tenant counts add up."""

from __future__ import annotations

import random

from policies.fairshare import FairQueue, TenantShare
from scheduler.admission import AdmissionConfig, publish, published_fields
from scheduler.codes import Code
from scheduler.models import ErrorInfo
from scheduler.store import Store
from tests.conftest import ManualClock, Runner
from tests.integration.helpers import new_job, submit_to_queue

# Costs 333, 1000 and 1429: no two tenants' tags meet in these tests, so the order is the rule's
# alone (the service breaks equal tags by job id, the simulator by arrival).
SHARES = {"a": TenantShare(weight=3.0), "c": TenantShare(weight=0.7), "*": TenantShare()}


def _publish(store: Store, run: Runner, tenants: dict[str, TenantShare]) -> None:
    fields = published_fields(AdmissionConfig(), tenants, [("q", ("embed",))])
    run(publish(store.redis, store.keys, fields))


def _tenant_of(store: Store, run: Runner, job_id: str) -> str | None:
    return run(store.get(job_id)).spec.options.tenant


class TestOrder:
    def test_leases_follow_the_pure_rule(self, store: Store, run: Runner) -> None:
        """Routing in rounds and leasing one by one serves tenants exactly as FairQueue does."""
        _publish(store, run, SHARES)
        rng = random.Random(3)
        arrivals = [rng.choice(["a", "b", "c"]) for _ in range(60)]
        model = FairQueue(SHARES, tuple(arrivals))
        served_live: list[str | None] = []
        served_model: list[str | None] = []
        for start in range(0, 60, 12):
            batch = range(start, start + 12)
            run(submit_to_queue(store, "q", *[new_job(tenant=arrivals[i]) for i in batch]))
            for i in batch:
                model.append(i)
            for _ in range(7):
                [lease] = run(store.lease("q"))
                served_live.append(lease.spec.options.tenant)
                served_model.append(arrivals[model.popleft()])
        assert served_live == served_model

    def test_priority_bands_come_before_fair_share(self, store: Store, run: Runner) -> None:
        """A higher-priority job of a tenant far behind is still served before the band below."""
        _publish(store, run, SHARES)
        run(submit_to_queue(store, "q", *[new_job(tenant="b") for _ in range(5)]))
        [urgent] = run(submit_to_queue(store, "q", new_job(tenant="b", priority=5)))
        assert run(store.lease("q"))[0].job_id == urgent

    def test_without_tenants_the_order_is_arrival(self, store: Store, run: Runner) -> None:
        """No tenants section: a heavy tenant's earlier jobs all go first, as before."""
        _publish(store, run, {})
        heavy = run(submit_to_queue(store, "q", *[new_job(tenant="h") for _ in range(5)]))
        run(submit_to_queue(store, "q", new_job(tenant="l")))
        assert [lease.job_id for lease in run(store.lease("q", 5))] == heavy


class TestQuotas:
    def test_a_tenant_at_its_quota_is_passed_over(self, store: Store, run: Runner) -> None:
        """With max_in_flight 2, a lease of 10 takes 2 of q's jobs and the others' behind them."""
        _publish(store, run, {"q": TenantShare(max_in_flight=2)})
        run(submit_to_queue(store, "q", *[new_job(tenant="q") for _ in range(4)]))
        run(submit_to_queue(store, "q", new_job(tenant="r"), new_job(tenant="r")))
        leases = run(store.lease("q", 10))
        assert sorted(str(x.spec.options.tenant) for x in leases) == ["q", "q", "r", "r"]
        assert run(store.lease("q", 10)) == []
        assert run(store.redis.hget(store.keys.inflight, "q")) == "2"
        first = next(x for x in leases if x.spec.options.tenant == "q")
        run(store.redis.delete(store.keys.queue_signal("q")))
        assert run(store.complete([(first.job_id, first.token, None)])) == [Code.OK]
        # The freed slot wakes the queue's workers, and the next job of q can be leased.
        assert run(store.redis.llen(store.keys.queue_signal("q"))) == 1
        [again] = run(store.lease("q", 10))
        assert again.spec.options.tenant == "q"

    def test_every_end_of_a_lease_gives_the_slot_back(
        self, store: Store, run: Runner, clock: ManualClock
    ) -> None:
        """Failing, releasing and expiring leases all return the tenant's in-flight count to 0."""
        _publish(store, run, {"*": TenantShare(max_in_flight=5)})
        run(submit_to_queue(store, "q", *[new_job(tenant="t", max_retries=3) for _ in range(3)]))
        a, b, c = run(store.lease("q", 3, lease_s=5))
        assert run(store.redis.hget(store.keys.inflight, "t")) == "3"
        run(store.fail(a.job_id, a.token, ErrorInfo(type="E", message="m"), retryable=True))
        run(store.release([(b.job_id, b.token)]))
        clock.advance(10)
        run(store.requeue_expired())
        assert run(store.redis.hget(store.keys.inflight, "t")) is None
        assert {c.job_id} <= {x.job_id for x in run(store.lease("q", 5))}


class TestTenantCounts:
    def test_counts_follow_jobs_in_and_out_of_the_queue(self, store: Store, run: Runner) -> None:
        """stats shows per-tenant waiting jobs per queue and in the ingress, back to none."""
        _publish(store, run, SHARES)
        ids = [r[1] for r in run(store.submit([new_job(tenant="a"), new_job(), new_job()]))]
        assert run(store.stats(["q"])).ingress_tenants == {"a": 1, "": 2}
        run(store.enqueue([(i, "q") for i in ids]))
        stats = run(store.stats(["q"]))
        assert (stats.ingress_tenants, stats.queues["q"].tenants) == ({}, {"a": 1, "": 2})
        run(store.cancel(ids[1]))
        run(store.lease("q", 5))
        assert run(store.stats(["q"])).queues["q"].tenants == {}
        assert run(store.redis.exists(store.keys.tenants_all)) == 0
