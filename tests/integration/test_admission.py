"""Admission control against a real Redis: caps published the way the router publishes them,
enforced atomically by the submit script, refusals typed, counted and reported per job."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from policies.fairshare import TenantShare
from scheduler import Rejected
from scheduler.admission import (
    DEFAULT_MAX_QUEUED,
    AdmissionConfig,
    QueueAdmission,
    publish,
    published_fields,
)
from scheduler.client import Client, JobRequest
from scheduler.codes import Code
from scheduler.settings import Settings
from scheduler.store import Store
from tests.conftest import Runner
from tests.integration.helpers import new_job, submit_to_queue

# Two queues: "fast" takes embed jobs, "slow" takes embed and rank jobs.
QUEUE_TYPES: list[tuple[str, Sequence[str]]] = [("fast", ("embed",)), ("slow", ("embed", "rank"))]


def _publish(
    store: Store,
    run: Runner,
    admission: AdmissionConfig,
    tenants: dict[str, TenantShare] | None = None,
) -> None:
    run(publish(store.redis, store.keys, published_fields(admission, tenants or {}, QUEUE_TYPES)))


async def _namespace_keys(store: Store) -> set[str]:
    return {str(k) async for k in store.redis.scan_iter(match=f"{store.keys.prefix}*", count=1000)}


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings=settings) as c:
        yield c


class TestRefusalWritesNothing:
    def test_jobs_over_the_total_cap_leave_no_trace(self, store: Store, run: Runner) -> None:
        """A refused job has no record, no ingress entry, no idempotency key, no tenant count."""
        _publish(store, run, AdmissionConfig(max_queued_total=2))
        jobs = [new_job(tenant="t1", idempotency_key=f"k{i}") for i in range(4)]
        results = run(store.submit_jobs(jobs))
        assert [r.code for r in results] == [Code.OK, Code.OK, Code.REJECTED, Code.REJECTED]
        for refused in results[2:]:
            assert run(store.redis.exists(store.keys.job(refused.job_id))) == 0
            assert run(store.redis.zscore(store.keys.ingress, refused.job_id)) is None
        assert run(store.redis.exists(store.keys.idempotency("k2"))) == 0
        assert run(store.redis.zcard(store.keys.ingress)) == 2
        assert run(store.redis.hget(store.keys.tenants_all, "t1")) == "2"

    def test_a_refused_batch_changes_no_key_but_the_counter(
        self, store: Store, run: Runner
    ) -> None:
        """At the cap, a whole refused batch writes only the rejected counter (and the sequence)."""
        _publish(store, run, AdmissionConfig(max_queued_total=1))
        run(store.submit([new_job()]))
        before = run(_namespace_keys(store))
        ingress = run(store.redis.zrange(store.keys.ingress, 0, -1))
        results = run(store.submit_jobs([new_job(), new_job("rank")]))
        assert {r.code for r in results} == {Code.REJECTED}
        assert run(_namespace_keys(store)) - before == {
            store.keys.counts("fast"),
            store.keys.counts("slow"),
        }
        assert run(store.redis.zrange(store.keys.ingress, 0, -1)) == ingress

    def test_a_retried_submit_and_an_idempotent_duplicate_are_never_refused(
        self, store: Store, run: Runner
    ) -> None:
        """At the cap, resending an admitted job (same id) or its idempotency key is not a new job."""
        _publish(store, run, AdmissionConfig(max_queued_total=1))
        job = new_job(idempotency_key="order-1")
        [first] = run(store.submit_jobs([job]))
        [again] = run(store.submit_jobs([job]))
        [dup] = run(store.submit_jobs([new_job(idempotency_key="order-1")]))
        assert (first.code, again.code, dup.code) == (Code.OK, Code.OK, Code.DUPLICATE)
        assert dup.job_id == first.job_id


class TestTheErrorNamesTheCap:
    def test_total_cap(self, store: Store, client: Client, run: Runner) -> None:
        """Rejected names max_queued_total with the count, the limit and a retry-after hint."""
        _publish(store, run, AdmissionConfig(max_queued_total=2, retry_after_s=3.0))
        client.submit("embed")
        client.submit("embed")
        with pytest.raises(Rejected) as caught:
            client.submit("embed")
        e = caught.value
        assert (e.cap, e.current, e.limit, e.queue) == ("max_queued_total", 2, 2, None)
        assert e.retry_after_s == 3.0  # no drain rate known: the configured hint
        assert "max_queued_total" in str(e)
        assert "retry after 3 s" in str(e)

    def test_queue_cap_applies_to_the_types_that_map_to_it(self, store: Store, run: Runner) -> None:
        """A rank job (only "slow") is refused when slow is full; an embed job still goes to fast."""
        _publish(store, run, AdmissionConfig(queues={"slow": QueueAdmission(max_queued=2)}))
        run(submit_to_queue(store, "slow", new_job("rank"), new_job("rank")))
        rank, embed = run(store.submit_jobs([new_job("rank"), new_job("embed")]))
        assert (rank.code, embed.code) == (Code.REJECTED, Code.OK)
        assert rank.rejected is not None
        assert (rank.rejected.cap, rank.rejected.queue) == ("queue_max_queued", "slow")
        assert (rank.rejected.current, rank.rejected.limit) == (2, 2)

    def test_a_type_whose_every_queue_is_full_is_refused(self, store: Store, run: Runner) -> None:
        """An embed job (fast or slow) is refused once both are at their caps, naming the first."""
        caps = {"fast": QueueAdmission(max_queued=1), "slow": QueueAdmission(max_queued=1)}
        _publish(store, run, AdmissionConfig(queues=caps))
        run(submit_to_queue(store, "fast", new_job()))
        [ok] = run(store.submit_jobs([new_job()]))
        assert ok.code is Code.OK  # slow had room
        run(store.enqueue([(ok.job_id, "slow")]))
        [refused] = run(store.submit_jobs([new_job()]))
        assert refused.rejected is not None
        assert refused.rejected.queue == "fast"

    def test_wait_estimate_uses_the_drain_rate(self, store: Store, run: Runner) -> None:
        """With 4 queued and 2 jobs/s drained, a fifth waits 2.5 s: over a 2 s limit, by 0.5 s."""
        _publish(store, run, AdmissionConfig(queues={"slow": QueueAdmission(max_wait_s=2.0)}))
        run(submit_to_queue(store, "slow", *[new_job("rank") for _ in range(4)]))
        [unknown] = run(store.submit_jobs([new_job("rank")]))
        assert unknown.code is Code.OK  # no drain rate measured: no estimate, no refusal
        run(store.redis.zrem(store.keys.ingress, unknown.job_id))
        run(store.redis.hset(store.keys.drain, mapping={"slow": "2"}))
        [refused] = run(store.submit_jobs([new_job("rank")]))
        assert refused.rejected is not None
        r = refused.rejected
        assert (r.cap, r.queue, r.current, r.limit) == ("queue_max_wait_s", "slow", 2.5, 2.0)
        assert r.retry_after_s == 0.5

    def test_tenant_cap_and_the_default_tenant(self, store: Store, run: Runner) -> None:
        """A tenant's own cap, and "*" for the others and for jobs without a tenant."""
        tenants = {"big": TenantShare(max_queued=2), "*": TenantShare(max_queued=1)}
        _publish(store, run, AdmissionConfig(), tenants)
        jobs = [new_job(tenant="big") for _ in range(3)] + [new_job(tenant="x"), new_job()]
        jobs += [new_job(tenant="x"), new_job()]
        codes = [r.code for r in run(store.submit_jobs(jobs))]
        ok, no = Code.OK, Code.REJECTED
        assert codes == [ok, ok, no, ok, ok, no, no]
        [refused] = list(run(store.submit_jobs([new_job(tenant="big")])))
        assert refused.rejected is not None
        assert (refused.rejected.cap, refused.rejected.tenant) == ("tenant_max_queued", "big")
        assert "tenant 'big'" in str(refused.rejected)

    def test_routed_and_leased_jobs_count_as_they_should(self, store: Store, run: Runner) -> None:
        """A tenant's jobs count while waiting (ingress or queue) and stop counting once leased."""
        _publish(store, run, AdmissionConfig(), {"t": TenantShare(max_queued=1)})
        [_a] = run(submit_to_queue(store, "slow", new_job("rank", tenant="t")))
        [refused] = run(store.submit_jobs([new_job(tenant="t")]))
        assert refused.code is Code.REJECTED
        run(store.lease("slow"))
        [admitted] = run(store.submit_jobs([new_job(tenant="t")]))
        assert admitted.code is Code.OK


class TestPerJobReports:
    def test_submit_many_reports_each_job(self, store: Store, client: Client, run: Runner) -> None:
        """submit_many admits what fits and hands back the refusal of the rest, job by job."""
        _publish(store, run, AdmissionConfig(max_queued_total=2))
        handles = client.submit_many([JobRequest("embed", {"i": i}) for i in range(3)])
        assert [h.created for h in handles] == [True, True, False]
        assert [h.rejected is None for h in handles] == [True, True, False]
        refused = handles[2].rejected
        assert refused is not None
        assert refused.job_id == handles[2].id
        with pytest.raises(Rejected):
            handles[2].result(timeout=1)


class TestCounters:
    def test_refusals_add_to_the_queue_counts(self, store: Store, run: Runner) -> None:
        """Each refusal adds 1 to 'rejected' of the queue it was refused for, seen in stats."""
        _publish(store, run, AdmissionConfig(max_queued_total=1))
        run(store.submit_jobs([new_job("rank")] * 1 + [new_job("rank") for _ in range(3)]))
        run(store.submit_jobs([new_job("other")]))
        assert run(store.redis.hget(store.keys.counts("slow"), "rejected")) == "3"
        assert run(store.redis.hget(store.keys.counts("~ingress"), "rejected")) == "1"
        stats = run(store.stats(["slow"]))
        assert stats.queues["slow"].rejected_total == 3


class TestDefaults:
    def test_the_default_config_publishes_the_total_cap(self) -> None:
        """Without an admission section only the total cap is on, at DEFAULT_MAX_QUEUED."""
        fields = published_fields(AdmissionConfig(), {}, QUEUE_TYPES)
        assert fields["total"] == str(DEFAULT_MAX_QUEUED)
        assert not {"qcaps", "tcaps", "fair", "quotas"} & fields.keys()

    def test_lua_applies_the_same_default_when_nothing_is_published(self) -> None:
        """The scripts' fallback cap is the Python default (one number, mirrored)."""
        text = (Path(__file__).parents[2] / "scheduler/lua/_common.lua").read_text()
        assert f"local DEFAULT_MAX_QUEUED = {DEFAULT_MAX_QUEUED}\n" in text

    @pytest.mark.slow
    def test_the_unpublished_default_refuses_at_the_cap(self, store: Store, run: Runner) -> None:
        """With nothing published, the total counts the delayed set too and refuses at the cap."""
        # The delayed set is only counted (ZCARD), so placeholder members stand in for jobs.
        chunk = 100_000
        for start in range(0, DEFAULT_MAX_QUEUED, chunk):
            members: dict[Any, float] = {f"x{i}": 0 for i in range(start, start + chunk)}
            run(store.redis.zadd(store.keys.delayed, members))
        [refused] = run(store.submit_jobs([new_job()]))
        assert refused.rejected is not None
        assert (refused.rejected.cap, refused.rejected.limit) == (
            "max_queued_total",
            DEFAULT_MAX_QUEUED,
        )
        run(store.redis.delete(store.keys.delayed))
