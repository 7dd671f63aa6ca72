"""Job store transitions against a real Redis, with a manual clock."""

from __future__ import annotations

import pytest

from scheduler.codes import Code
from scheduler.errors import JobNotFound
from scheduler.keys import INGRESS_QUEUE
from scheduler.models import ErrorInfo, JobStatus
from scheduler.store import Store
from tests.conftest import ManualClock, Runner
from tests.integration.helpers import new_job, submit_to_queue

BOOM = ErrorInfo(type="RuntimeError", message="boom", traceback="Traceback ...")


class TestLifecycle:
    def test_submit_route_lease_complete_read(self, store: Store, run: Runner) -> None:
        """A job goes pending → queued → running → succeeded and its result reads back."""
        [(code, job_id)] = run(store.submit([new_job(payload={"x": [1, 2]})]))
        assert code is Code.OK
        assert run(store.get(job_id)).status is JobStatus.PENDING
        [info] = run(store.pending(10))
        assert (info.id, info.job_type) == (job_id, "embed")
        assert run(store.enqueue([(job_id, "q")])) == [Code.OK]
        assert run(store.get(job_id)).status is JobStatus.QUEUED
        [lease] = run(store.lease("q", 5))
        assert (lease.job_id, lease.token, lease.spec.payload) == (job_id, 1, {"x": [1, 2]})
        assert run(store.get(job_id)).status is JobStatus.RUNNING
        assert run(store.complete([(job_id, 1, {"y": 3})])) == [Code.OK]
        job = run(store.get(job_id))
        assert (job.status, job.result, job.attempts) == (JobStatus.SUCCEEDED, {"y": 3}, 1)
        assert job.started_s is not None
        assert job.finished_s is not None

    def test_finished_record_expires_after_result_ttl(self, store: Store, run: Runner) -> None:
        """The record of a finished job carries the configured TTL; a running one has none."""
        [job_id] = run(submit_to_queue(store, "q", new_job()))
        run(store.lease("q"))
        assert run(store.redis.pttl(store.keys.job(job_id))) == -1
        run(store.complete([(job_id, 1, None)]))
        ttl_ms = run(store.redis.pttl(store.keys.job(job_id)))
        assert 0 < ttl_ms <= store.settings.result_ttl_s * 1000

    def test_unknown_job_is_not_found(self, store: Store, run: Runner) -> None:
        """Reading or cancelling a job that never existed says so."""
        with pytest.raises(JobNotFound, match="nope"):
            run(store.get("nope"))
        assert run(store.cancel("nope")) is Code.NOT_FOUND

    def test_every_key_shares_the_namespace_hash_tag(self, store: Store, run: Runner) -> None:
        """All keys sit under one hash tag, so a Redis Cluster slot holds the whole namespace."""
        [job_id] = run(submit_to_queue(store, "q", new_job(idempotency_key="k")))
        run(store.lease("q"))
        run(store.complete([(job_id, 1, 1)]))
        keys = run(store.redis.keys(f"*{store.settings.namespace}*"))
        assert keys
        assert all(k.startswith(f"bilevel:{{{store.settings.namespace}}}:") for k in keys)


class TestSubmit:
    def test_idempotency_key_returns_the_existing_job(self, store: Store, run: Runner) -> None:
        """A second submit with the same key creates nothing and returns the first id."""
        first = run(store.submit([new_job(idempotency_key="order-1")]))
        second = run(store.submit([new_job(idempotency_key="order-1", payload=2)]))
        assert first[0][0] is Code.OK
        assert second == [(Code.DUPLICATE, first[0][1])]
        assert run(store.stats()).ingress == 1

    def test_batched_submit_in_one_call(self, store: Store, run: Runner) -> None:
        """submit takes many jobs at once and keeps their order in the ingress."""
        jobs = [new_job(payload=i) for i in range(50)]
        results = run(store.submit(jobs))
        assert [job_id for _, job_id in results] == [j.id for j in jobs]
        assert [p.id for p in run(store.pending(100))] == [j.id for j in jobs]

    def test_enqueue_twice_is_refused(self, store: Store, run: Runner) -> None:
        """A job already routed cannot be routed again (a second router loses the race)."""
        [job_id] = run(submit_to_queue(store, "a", new_job()))
        assert run(store.enqueue([(job_id, "b")])) == [Code.WRONG_STATE]
        assert run(store.enqueue([("missing", "b")])) == [Code.NOT_FOUND]
        assert run(store.queued_ids("a")) == [job_id]


class TestOrdering:
    def test_priority_then_deadline_then_arrival(
        self, store: Store, run: Runner, clock: ManualClock
    ) -> None:
        """Higher priority first; among equals the earlier deadline; then the earlier arrival."""
        late = new_job(priority=1, deadline_s=100)
        soon = new_job(priority=1, deadline_s=10)
        none_first = new_job(priority=1)
        none_second = new_job(priority=1)
        urgent = new_job(priority=9)
        low = new_job(priority=0, deadline_s=1)
        for job in (late, soon, none_first, none_second, urgent, low):
            clock.advance(0.01)
            run(submit_to_queue(store, "q", job))
        order = [lease.job_id for lease in run(store.lease("q", 10))]
        assert order == [urgent.id, soon.id, late.id, none_first.id, none_second.id, low.id]

    def test_lease_takes_at_most_n(self, store: Store, run: Runner) -> None:
        """A batched lease returns up to n jobs and leaves the rest queued."""
        run(submit_to_queue(store, "q", *[new_job(payload=i) for i in range(7)]))
        assert len(run(store.lease("q", 5))) == 5
        assert run(store.stats(["q"])).queues["q"].depth == 2


class TestDelayed:
    def test_delayed_job_waits_for_its_time(
        self, store: Store, run: Runner, clock: ManualClock
    ) -> None:
        """A job with delay_s is held after routing and queued once due."""
        job = new_job(delay_s=5)
        run(store.submit([job]))
        assert run(store.enqueue([(job.id, "q")])) == [Code.DELAYED]
        assert run(store.get(job.id)).status is JobStatus.DELAYED
        assert run(store.promote_due()) == 0
        assert run(store.lease("q")) == []
        clock.advance(5)
        assert run(store.promote_due()) == 1
        [lease] = run(store.lease("q"))
        assert lease.job_id == job.id


class TestLeases:
    def test_heartbeat_keeps_the_lease(self, store: Store, run: Runner, clock: ManualClock) -> None:
        """A renewed lease does not expire; an abandoned one goes back to its queue."""
        [job_id] = run(submit_to_queue(store, "q", new_job()))
        [lease] = run(store.lease("q", lease_s=10))
        for _ in range(3):
            clock.advance(8)
            assert run(store.heartbeat([(job_id, lease.token)], lease_s=10)) == [Code.OK]
            assert run(store.requeue_expired()).requeued == 0
        clock.advance(11)
        assert run(store.requeue_expired()).requeued == 1
        assert run(store.get(job_id)).status is JobStatus.QUEUED

    def test_requeued_job_keeps_its_place(
        self, store: Store, run: Runner, clock: ManualClock
    ) -> None:
        """A job whose lease expired returns ahead of jobs that arrived after it."""
        first, second = new_job(), new_job()
        run(submit_to_queue(store, "q", first))
        run(store.lease("q", lease_s=1))
        run(submit_to_queue(store, "q", second))
        clock.advance(2)
        run(store.requeue_expired())
        assert run(store.queued_ids("q")) == [first.id, second.id]

    def test_stale_completion_is_refused_and_first_result_stands(
        self, store: Store, run: Runner, clock: ManualClock
    ) -> None:
        """After a lease expires and the job is leased again, only the new holder may complete."""
        [job_id] = run(submit_to_queue(store, "q", new_job()))
        [old] = run(store.lease("q", lease_s=1))
        clock.advance(2)
        run(store.requeue_expired())
        [new] = run(store.lease("q"))
        assert (old.token, new.token) == (1, 2)
        assert run(store.heartbeat([(job_id, old.token)])) == [Code.STALE_LEASE]
        assert run(store.complete([(job_id, old.token, "old")])) == [Code.STALE_LEASE]
        assert run(store.complete([(job_id, new.token, "new")])) == [Code.OK]
        assert run(store.complete([(job_id, new.token, "again")])) == [Code.ALREADY_FINISHED]
        assert run(store.get(job_id)).result == "new"

    def test_late_result_is_kept_while_the_job_waits_for_a_new_lease(
        self, store: Store, run: Runner, clock: ManualClock
    ) -> None:
        """A worker that finishes just after its lease expired still delivers the result once."""
        [job_id] = run(submit_to_queue(store, "q", new_job()))
        [lease] = run(store.lease("q", lease_s=1))
        clock.advance(2)
        run(store.requeue_expired())
        assert run(store.complete([(job_id, lease.token, "late")])) == [Code.OK]
        assert run(store.lease("q")) == []
        assert run(store.get(job_id)).result == "late"

    def test_job_that_keeps_killing_workers_is_dead_lettered(
        self, store: Store, run: Runner, clock: ManualClock
    ) -> None:
        """Each expired lease counts as an attempt; after max_retries the job goes dead."""
        [job_id] = run(submit_to_queue(store, "q", new_job(max_retries=2)))
        for _ in range(3):
            assert len(run(store.lease("q", lease_s=1))) == 1
            clock.advance(2)
            run(store.requeue_expired())
        job = run(store.get(job_id))
        assert job.status is JobStatus.DEAD
        assert job.error is not None
        assert job.error.type == "LeaseExpired"
        assert run(store.dead_ids("q")) == [job_id]


class TestFailure:
    def test_retry_with_exponential_backoff_then_dead_letter(
        self, store: Store, run: Runner, clock: ManualClock
    ) -> None:
        """Failures retry after 1 s, 2 s, 4 s (no jitter here), then land in the dead-letter set."""
        [job_id] = run(submit_to_queue(store, "q", new_job(max_retries=3)))
        for backoff_s in (1, 2, 4):
            [lease] = run(store.lease("q"))
            assert run(store.fail(job_id, lease.token, BOOM)) is Code.RETRY_SCHEDULED
            assert run(store.get(job_id)).status is JobStatus.RETRYING
            clock.advance(backoff_s - 0.01)
            assert run(store.promote_due()) == 0
            clock.advance(0.01)
            assert run(store.promote_due()) == 1
        [lease] = run(store.lease("q"))
        assert run(store.fail(job_id, lease.token, BOOM)) is Code.DEAD_LETTERED
        job = run(store.get(job_id))
        assert (job.status, job.attempts, job.error) == (JobStatus.DEAD, 4, BOOM)
        assert run(store.stats(["q"])).queues["q"].dead == 1

    def test_jitter_spreads_backoff(self, store: Store) -> None:
        """With jitter the delay varies within ±jitter of the exponential base."""
        store.settings = store.settings.model_copy(update={"retry_jitter": 0.5})
        delays = {round(store.backoff_s(3), 6) for _ in range(50)}
        assert len(delays) > 10
        assert all(2.0 <= d <= 6.0 for d in delays)

    def test_not_retryable_goes_dead_at_once(self, store: Store, run: Runner) -> None:
        """A failure marked not retryable skips the remaining retries."""
        [job_id] = run(submit_to_queue(store, "q", new_job(max_retries=5)))
        [lease] = run(store.lease("q"))
        assert run(store.fail(job_id, lease.token, BOOM, retryable=False)) is Code.DEAD_LETTERED

    def test_stale_failure_is_refused(self, store: Store, run: Runner) -> None:
        """A failure report from an old lease changes nothing."""
        [job_id] = run(submit_to_queue(store, "q", new_job()))
        run(store.lease("q"))
        assert run(store.fail(job_id, 99, BOOM)) is Code.STALE_LEASE
        assert run(store.get(job_id)).status is JobStatus.RUNNING


class TestCancel:
    def test_cancel_queued_job_leaves_its_queue(self, store: Store, run: Runner) -> None:
        """A waiting job is cancelled at once and never leased."""
        [job_id] = run(submit_to_queue(store, "q", new_job()))
        assert run(store.cancel(job_id)) is Code.OK
        assert run(store.get(job_id)).status is JobStatus.CANCELLED
        assert run(store.lease("q")) == []
        assert run(store.cancel(job_id)) is Code.ALREADY_FINISHED

    def test_cancel_pending_and_delayed(self, store: Store, run: Runner) -> None:
        """Jobs in the ingress and in the delayed set can be cancelled too."""
        pending, delayed = new_job(), new_job(delay_s=60)
        run(store.submit([pending, delayed]))
        run(store.enqueue([(delayed.id, "q")]))
        assert run(store.cancel(pending.id)) is Code.OK
        assert run(store.cancel(delayed.id)) is Code.OK
        stats = run(store.stats())
        assert (stats.ingress, stats.delayed) == (0, 0)

    def test_cancel_running_job_is_flagged_for_its_worker(self, store: Store, run: Runner) -> None:
        """A running job is flagged; the heartbeat tells the worker, whose report ends it."""
        [job_id] = run(submit_to_queue(store, "q", new_job()))
        [lease] = run(store.lease("q"))
        assert run(store.cancel(job_id)) is Code.CANCEL_PENDING
        assert run(store.get(job_id)).cancel_requested
        assert run(store.heartbeat([(job_id, lease.token)])) == [Code.CANCEL_REQUESTED]
        stopped = ErrorInfo(type="Cancelled", message="stopped on request")
        assert run(store.fail(job_id, lease.token, stopped)) is Code.OK
        assert run(store.get(job_id)).status is JobStatus.CANCELLED

    def test_cancelled_job_whose_worker_died_is_not_requeued(
        self, store: Store, run: Runner, clock: ManualClock
    ) -> None:
        """If the flagged job's lease expires, it ends cancelled instead of running again."""
        [job_id] = run(submit_to_queue(store, "q", new_job()))
        run(store.lease("q", lease_s=1))
        run(store.cancel(job_id))
        clock.advance(2)
        assert run(store.requeue_expired()).cancelled == 1
        assert run(store.get(job_id)).status is JobStatus.CANCELLED


class TestMoveAndStats:
    def test_move_between_queues_keeps_order(self, store: Store, run: Runner) -> None:
        """Moved jobs keep their order key, so they interleave by priority and arrival."""
        a1, a2 = new_job(), new_job(priority=5)
        b1 = new_job()
        run(submit_to_queue(store, "a", a1, a2))
        run(submit_to_queue(store, "b", b1))
        assert run(store.move([a1.id], "b")) == [Code.OK]
        assert run(store.queued_ids("b")) == [a1.id, b1.id]
        assert run(store.queued_ids("a")) == [a2.id]
        [lease] = run(store.lease("a"))
        assert run(store.move([lease.job_id], "b")) == [Code.WRONG_STATE]

    def test_stats_report_depth_wait_in_flight_dead(
        self, store: Store, run: Runner, clock: ManualClock
    ) -> None:
        """stats gives depth, oldest wait, in flight and dead per queue."""
        run(submit_to_queue(store, "q", *[new_job(max_retries=0) for _ in range(4)]))
        clock.advance(3)
        leases = run(store.lease("q", 2))
        run(store.fail(leases[0].job_id, leases[0].token, BOOM))
        stats = run(store.stats()).queues["q"]
        assert (stats.depth, stats.in_flight, stats.dead) == (2, 1, 1)
        run(store.complete([(leases[1].job_id, leases[1].token, None)]))
        stats = run(store.stats()).queues["q"]
        assert (stats.enqueued_total, stats.completed_total, stats.failed_total) == (4, 1, 1)
        assert stats.oldest_wait_s == pytest.approx(3.0)


class TestCorruptRecords:
    def test_unparsable_spec_is_dead_lettered_on_lease(self, store: Store, run: Runner) -> None:
        """A worker never receives a garbage record: it is dead-lettered with the reason."""
        [bad, good] = run(submit_to_queue(store, "q", new_job(), new_job()))
        run(store.redis.hset(store.keys.job(bad), "spec", "{not json"))
        leases = run(store.lease("q", 5))
        assert [lease.job_id for lease in leases] == [good]
        job = run(store.get(bad))
        assert job.status is JobStatus.DEAD
        assert job.error is not None
        assert job.error.type == "CorruptJob"

    def test_reader_of_corrupt_record_does_not_crash(self, store: Store, run: Runner) -> None:
        """get() on a record with an impossible status dead-letters it and reports why."""
        [job_id] = run(submit_to_queue(store, "q", new_job()))
        run(store.redis.hset(store.keys.job(job_id), "status", "exploded"))
        job = run(store.get(job_id))
        assert job.status is JobStatus.DEAD
        assert job.error is not None
        assert "corrupt" in job.error.message
        assert run(store.get(job_id)).status is JobStatus.DEAD

    def test_corrupt_job_in_ingress_is_dead_lettered_by_the_router_read(
        self, store: Store, run: Runner
    ) -> None:
        """A pending record with a broken routing view leaves the ingress for the dead set."""
        [(_, bad), (_, good)] = run(store.submit([new_job(), new_job()]))
        run(store.redis.hset(store.keys.job(bad), "rt", "[]"))
        assert [p.id for p in run(store.pending(10))] == [good]
        assert run(store.dead_ids(INGRESS_QUEUE)) == [bad]
        assert run(store.stats()).ingress == 1


class TestRelease:
    def test_released_job_runs_again_without_spending_a_retry(
        self, store: Store, run: Runner
    ) -> None:
        """A draining worker hands a job back: it is queued at its old place, a second release is
        refused, and the attempt does not count against max_retries."""
        first, second = new_job(max_retries=0), new_job()
        run(submit_to_queue(store, "q", first, second))
        [lease] = run(store.lease("q", 1))
        assert run(store.release([(first.id, lease.token)])) == [Code.OK]
        assert run(store.queued_ids("q")) == [first.id, second.id]
        assert run(store.release([(first.id, lease.token)])) == [Code.STALE_LEASE]
        [again] = run(store.lease("q", 1))
        assert again.token == 2
        # max_retries=0, yet a failure now is its first charged attempt: it may not retry, but
        # it is dead for its own failure, not for the release.
        assert run(store.fail(first.id, again.token, BOOM)) is Code.DEAD_LETTERED
        job = run(store.get(first.id))
        assert job.error == BOOM

    def test_released_attempts_do_not_count_as_expiries(
        self, store: Store, run: Runner, clock: ManualClock
    ) -> None:
        """After a release, a lease that then expires is the job's first charged attempt."""
        [job_id] = run(submit_to_queue(store, "q", new_job(max_retries=1)))
        [lease] = run(store.lease("q", lease_s=1))
        run(store.release([(job_id, lease.token)]))
        run(store.lease("q", lease_s=1))
        clock.advance(2)
        assert run(store.requeue_expired()).requeued == 1
        assert run(store.get(job_id)).status is JobStatus.QUEUED
