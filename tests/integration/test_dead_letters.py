"""Listings, replays and purges against the real Redis: every status is listed from its own index,
pages cover every job once in order, a replay puts a dead job back where it died keeping its
history, a purge deletes a dead job with its entries, corrupt records in the dead-letter set are
listed and purged but never replayed, and each step is atomic while workers lease and jobs die."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from scheduler.client import AsyncClient
from scheduler.codes import Code
from scheduler.connection import client_from_url
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.errors import InvalidCursor, UnknownQueue
from scheduler.keys import FINISHED_INDEX_LEN, FINISHED_TRIM_EVERY, HISTORY_LEN, INGRESS_QUEUE
from scheduler.listing import ListOptions
from scheduler.models import ErrorInfo, JobStatus
from scheduler.settings import Settings
from scheduler.store import Store
from tests.conftest import ManualClock, Runner
from tests.integration.helpers import assert_each_job_in_one_place, new_job, submit_to_queue

BOOM = ErrorInfo(type="Boom", message="failed on purpose", traceback="Traceback: boom")


@asynccontextmanager
async def client_on(settings: Settings, clock: ManualClock) -> AsyncIterator[AsyncClient]:
    """A client whose store runs on the test's clock."""
    async with AsyncClient(settings=settings) as client:
        client.store.clock = clock
        yield client


async def kill(store: Store, queue: str, *jobs: object, retries: int = 0) -> list[str]:
    """Submit jobs to `queue`, lease them and fail them for good: their ids, now dead."""
    ids = await submit_to_queue(
        store, queue, *[new_job(payload=i, max_retries=retries) for i in range(len(jobs))]
    )
    for lease in await store.lease(queue, len(ids)):
        assert await store.fail(lease.job_id, lease.token, BOOM, retryable=False) is (
            Code.DEAD_LETTERED
        )
    return ids


async def every_status(store: Store, clock: ManualClock) -> dict[JobStatus, str]:
    """One job in each of the eight statuses (queues a, b, c)."""
    [(_, pending)] = await store.submit([new_job(payload="pending")])
    [queued] = await submit_to_queue(store, "a", new_job(payload="queued"))
    [running] = await submit_to_queue(store, "b", new_job(payload="running"))
    await store.lease("b", 1)
    [delayed] = await submit_to_queue(store, "a", new_job(payload="delayed", delay_s=60))
    [retrying] = await submit_to_queue(store, "c", new_job(payload="retrying"))
    [lease] = await store.lease("c", 1)
    await store.fail(lease.job_id, lease.token, BOOM)
    [dead] = await kill(store, "c", 1)
    [succeeded] = await submit_to_queue(store, "c", new_job(payload="ok"))
    [lease] = await store.lease("c", 1)
    await store.complete([(lease.job_id, lease.token, "done")])
    [cancelled] = await submit_to_queue(store, "a", new_job(payload="cancelled", priority=9))
    assert await store.cancel(cancelled) is Code.OK
    clock.advance(1)
    return {
        JobStatus.PENDING: pending,
        JobStatus.QUEUED: queued,
        JobStatus.RUNNING: running,
        JobStatus.DELAYED: delayed,
        JobStatus.RETRYING: retrying,
        JobStatus.DEAD: dead,
        JobStatus.SUCCEEDED: succeeded,
        JobStatus.CANCELLED: cancelled,
    }


def options(**given: object) -> ListOptions:
    values: dict[str, object] = {"status": None, "queue": None, "tenant": None, "order": "newest"}
    values.update(given)
    return ListOptions.checked(**values)  # type: ignore[arg-type]


async def list_all(store: Store, opts: ListOptions, limit: int, **kw: int) -> list[str]:
    """Every id of a listing, page by page."""
    ids: list[str] = []
    cursor = None
    for _ in range(10_000):
        page = await store.list_jobs(opts, limit=limit, cursor=cursor, **kw)
        ids += [j.id for j in page.jobs]
        if page.cursor is None:
            return ids
        cursor = page.cursor
    raise AssertionError("the listing never ended")


class TestListing:
    def test_every_status_is_listed_from_its_own_index(
        self, store: Store, clock: ManualClock, run: Runner
    ) -> None:
        """Each status filter lists exactly its job; no filter lists all eight once, by
        section (pending, queued, running, delayed, dead, finished)."""
        jobs = run(every_status(store, clock))
        for status, job_id in jobs.items():
            page = run(store.list_jobs(options(status=status.value)))
            assert [(j.id, j.status) for j in page.jobs] == [(job_id, status)], status
            assert page.cursor is None
        page = run(store.list_jobs(options()))
        assert sorted(j.id for j in page.jobs) == sorted(jobs.values())
        sections = [j.index for j in page.jobs]
        assert sections == sorted(sections, key=["pending", "queued", "running", "delayed",
                                                 "dead", "finished"].index)  # fmt: skip
        by_id = {j.id: j for j in page.jobs}
        dead = by_id[jobs[JobStatus.DEAD]]
        assert (dead.queue, dead.job_type, dead.attempts, dead.max_retries) == ("c", "embed", 1, 0)
        assert dead.error == ErrorInfo(type="Boom", message="failed on purpose")
        assert by_id[jobs[JobStatus.PENDING]].queue is None

    def test_queue_and_tenant_filters(self, store: Store, run: Runner) -> None:
        """--queue keeps one queue's jobs (the delayed set judged by each record's queue),
        --tenant one tenant's; an unknown queue is refused naming the known ones."""
        a = run(submit_to_queue(store, "a", *[new_job(tenant="acme") for _ in range(3)]))
        b = run(submit_to_queue(store, "b", new_job(tenant="acme"), new_job(delay_s=9)))
        assert sorted(run(list_all(store, options(queue="a"), 2))) == sorted(a)
        assert sorted(run(list_all(store, options(queue="b"), 2))) == sorted(b)
        assert sorted(run(list_all(store, options(tenant="acme"), 2))) == sorted([*a, b[0]])
        assert run(list_all(store, options(queue="b", status="delayed"), 5)) == [b[1]]
        assert run(list_all(store, options(queue=INGRESS_QUEUE), 5)) == []
        with pytest.raises(UnknownQueue, match=r"queue 'nope' is not a known queue \(known: a, b"):
            run(store.list_jobs(options(queue="nope")))

    def test_pages_cover_every_job_once_in_order(
        self, store: Store, clock: ManualClock, run: Runner
    ) -> None:
        """Pages of 7 over 3 queues (with many jobs queued in the same ms) list every job once,
        newest first by time queued, ties by id; --oldest is the exact reverse."""
        expected: list[tuple[float, str]] = []
        for step in range(6):
            for queue in ("a", "b", "c"):
                ids = run(submit_to_queue(store, queue, *[new_job() for _ in range(step + 4)]))
                expected += [(clock.now_s, job_id) for job_id in ids]
            clock.advance(0.5)
        newest = [job_id for _, job_id in sorted(expected, reverse=True)]
        assert run(list_all(store, options(status="queued"), 7)) == newest
        assert run(list_all(store, options(status="queued", order="oldest"), 7)) == newest[::-1]
        assert run(list_all(store, options(), 500)) == newest

    def test_a_cursor_finds_its_place_after_its_entry_left(
        self, store: Store, clock: ManualClock, run: Runner
    ) -> None:
        """The job a page ended on is leased before the next page: the next page still starts
        right after it, so the jobs still queued are each listed once."""
        ids = run(submit_to_queue(store, "a", *[new_job() for _ in range(30)]))
        opts = options(status="queued", order="oldest")
        first = run(store.list_jobs(opts, limit=10))
        assert [j.id for j in first.jobs] == sorted(ids)[:10]  # one ms: ties by id
        leased = {lease.job_id for lease in run(store.lease("a", 12))}
        rest = run(store.list_jobs(opts, limit=100, cursor=first.cursor))
        assert [j.id for j in rest.jobs] == [i for i in sorted(ids)[10:] if i not in leased]

    def test_finished_jobs_are_paged_queue_by_queue(self, store: Store, run: Runner) -> None:
        """Finished lists are read one queue after another (the ingress's last), newest first
        from each list's head or oldest first from its tail, a page's cursor resuming inside a
        list; a cursor whose entry was trimmed meanwhile ends that list."""

        async def finish(queue: str, n: int) -> list[str]:
            ids = await submit_to_queue(store, queue, *[new_job() for _ in range(n)])
            leases = await store.lease(queue, n)
            await store.complete([(lease.job_id, lease.token, None) for lease in leases])
            return ids

        async def body() -> None:
            a, b = await finish("a", 25), await finish("b", 10)
            cancelled = [job_id for _, job_id in await store.submit([new_job(), new_job()])]
            for job_id in cancelled:
                assert await store.cancel(job_id) is Code.OK
            newest = [*a[::-1], *b[::-1], *cancelled[::-1]]
            assert await list_all(store, options(), 4) == newest
            assert await list_all(store, options(order="oldest"), 3) == [*a, *b, *cancelled]
            assert await list_all(store, options(status="cancelled"), 1) == cancelled[::-1]
            assert await list_all(store, options(status="succeeded", queue="b"), 4) == b[::-1]
            page = await store.list_jobs(options(status="succeeded"), limit=30)
            assert [j.id for j in page.jobs] == newest[:30]
            await store.redis.ltrim(store.keys.finished("b"), 0, 3)  # b[-5] was the cursor
            rest = await store.list_jobs(options(status="succeeded"), cursor=page.cursor)
            assert [j.id for j in rest.jobs] == []
            assert rest.cursor is None

        run(body())

    def test_a_filtered_page_reads_at_most_its_budget(self, store: Store, run: Runner) -> None:
        """One tenant's 3 jobs among 300: a page examines at most `budget` entries, so it may be
        short, and its cursor goes on until all 3 are found."""
        jobs = [new_job(tenant="rare" if i % 100 == 50 else "common") for i in range(300)]
        run(submit_to_queue(store, "a", *jobs))
        opts = options(tenant="rare")
        page = run(store.list_jobs(opts, limit=5, budget=40))
        assert len(page.jobs) <= 1
        assert page.cursor is not None
        found = run(list_all(store, opts, 5, budget=40))
        assert sorted(found) == sorted(j.id for j in jobs if j.spec.options.tenant == "rare")

    def test_bad_options_and_cursors_are_refused(self, store: Store, run: Runner) -> None:
        """A bad status, limit or budget is a ValueError naming it; a cursor that is not one,
        or one from a listing with other options, is an InvalidCursor."""
        run(submit_to_queue(store, "a", *[new_job() for _ in range(3)]))
        with pytest.raises(ValueError, match="status 'finished' is not a status"):
            options(status="finished")
        with pytest.raises(ValueError, match="limit 0 is out of range"):
            run(store.list_jobs(options(), limit=0))
        with pytest.raises(ValueError, match="budget 5 is out of range"):
            run(store.list_jobs(options(), limit=10, budget=5))
        with pytest.raises(InvalidCursor, match="not a cursor a listing handed out"):
            run(store.list_jobs(options(), cursor="bogus!"))
        page = run(store.list_jobs(options(), limit=1))
        with pytest.raises(InvalidCursor, match="other options"):
            run(store.list_jobs(options(order="oldest"), cursor=page.cursor))


class TestFinishedIndex:
    def test_entries_whose_record_expired_are_trimmed(self, store: Store, run: Runner) -> None:
        """Finished jobs whose record expired leave the index when it next trims; an entry
        whose record is gone is dropped by the listing that meets it."""

        async def finish(n: int) -> list[str]:
            ids = await submit_to_queue(store, "a", *[new_job() for _ in range(n)])
            leases = await store.lease("a", n)
            await store.complete([(lease.job_id, lease.token, None) for lease in leases])
            return ids

        async def body() -> None:
            old = await finish(10)
            for job_id in old:  # as their result TTL does
                await store.redis.delete(store.keys.job(job_id))
            new = await finish(FINISHED_TRIM_EVERY - 10)
            index = store.keys.finished("a")
            assert await store.redis.lrange(index, 0, -1) == new[::-1]
            await store.redis.delete(store.keys.job(new[0]))
            page = await store.list_jobs(options(status="succeeded"))
            assert [j.id for j in page.jobs] == new[:0:-1]
            assert new[0] not in await store.redis.lrange(index, 0, -1)

        run(body())

    @pytest.mark.slow
    def test_the_index_keeps_the_newest_entries_only(
        self, store: Store, clock: ManualClock, run: Runner
    ) -> None:
        """Past FINISHED_INDEX_LEN (plus one trim's slack) the oldest entries go."""

        async def body() -> None:
            first: list[str] = []
            for batch in range(FINISHED_INDEX_LEN // 1000 + 1):
                ids = await submit_to_queue(store, "a", *[new_job() for _ in range(1000)])
                leases = await store.lease("a", 1000)
                await store.complete_encoded([(x.job_id, x.token, "null") for x in leases])
                if batch == 0:
                    first = ids
                clock.advance(0.01)
            index = store.keys.finished("a")
            size = await store.redis.llen(index)
            assert FINISHED_INDEX_LEN <= size < FINISHED_INDEX_LEN + FINISHED_TRIM_EVERY
            assert first[0] not in await store.redis.lrange(index, 0, -1)

        run(body())


class TestRetention:
    def test_a_dead_job_is_kept_for_the_dead_letter_ttl(
        self, store: Store, clock: ManualClock, run: Runner
    ) -> None:
        """Whether it died failing or by its lease expiring, a dead record lives dead_ttl_s
        (7 days), not the result TTL (1 day) of a finished one."""

        async def body() -> None:
            [failed] = await kill(store, "a", 1)
            [expired] = await submit_to_queue(store, "a", new_job(max_retries=0))
            await store.lease("a", 1, lease_s=5)
            clock.advance(6)
            assert (await store.requeue_expired()).dead_lettered == 1
            result_ttl_ms = store.settings.result_ttl_s * 1000
            for job_id in (failed, expired):
                ttl_ms = await store.redis.pttl(store.keys.job(job_id))
                assert result_ttl_ms < ttl_ms <= store.settings.dead_ttl_s * 1000, job_id

        run(body())


class TestHistory:
    def test_every_attempt_is_kept_not_only_the_last(
        self, store: Store, clock: ManualClock, run: Runner
    ) -> None:
        """Each failure and expired lease adds an event; the newest HISTORY_LEN are kept."""

        async def body() -> list[str]:
            [job_id] = await submit_to_queue(store, "a", new_job(max_retries=100))
            for attempt in range(1, HISTORY_LEN + 6):
                await store.promote_due()
                [lease] = await store.lease("a", 1, lease_s=5)
                if attempt == 3:
                    clock.advance(6)
                    await store.requeue_expired()
                    continue
                error = ErrorInfo(type="Boom", message=f"attempt {attempt}")
                assert await store.fail(job_id, lease.token, error) is Code.RETRY_SCHEDULED
                clock.advance(400)
            return [job_id]

        [job_id] = run(body())
        job = run(store.get(job_id))
        assert job.attempts == HISTORY_LEN + 5
        assert len(job.history) == HISTORY_LEN
        assert [e.attempt for e in job.history] == list(range(6, HISTORY_LEN + 6))
        assert job.history[-1].error == ErrorInfo(type="Boom", message=f"attempt {job.attempts}")
        full = run(store.redis.hget(store.keys.job(job_id), "history"))
        assert full is not None
        assert "lease_expired" not in full

    def test_an_expired_lease_is_an_event(
        self, store: Store, clock: ManualClock, run: Runner
    ) -> None:
        """A lease that expires is recorded with its attempt."""
        [job_id] = run(submit_to_queue(store, "a", new_job()))
        run(store.lease("a", 1, lease_s=5))
        clock.advance(6)
        run(store.requeue_expired())
        [event] = run(store.get(job_id)).history
        assert (event.event, event.attempt, event.at_s) == ("lease_expired", 1, clock.now_s)


class TestReplay:
    def test_back_into_the_queue_it_died_in_at_its_old_place(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """A replayed job is queued where it died, ahead of the later jobs of its priority, and
        keeps its attempts, error and history (a 'replayed' event added)."""

        async def body() -> None:
            [dead] = await kill(store, "a", 1)
            later = await submit_to_queue(store, "a", new_job(), new_job())
            async with client_on(settings, clock) as client:
                report = await client.replay([dead])
            assert (report.replayed, report.refused) == ((dead,), ())
            assert await store.queued_ids("a") == [dead, *later]
            job = await store.get(dead)
            assert (job.status, job.queue, job.attempts, job.error) == (
                JobStatus.QUEUED, "a", 1, BOOM,
            )  # fmt: skip
            assert [e.event for e in job.history] == ["failed", "replayed"]
            replayed = job.history[-1]
            assert (replayed.from_queue, replayed.to_queue, replayed.reset_retries) == (
                "a", "a", True,
            )  # fmt: skip
            assert await store.dead_ids("a") == []
            await assert_each_job_in_one_place(store, [dead, *later])

        run(body())

    def test_to_another_queue_or_back_to_the_ingress(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """--to queues it elsewhere (an unknown queue is refused before anything changes); a
        job that died before routing goes back to the ingress for level 1."""

        async def body() -> None:
            [dead] = await kill(store, "a", 1)
            await submit_to_queue(store, "b", new_job())
            [(_, unrouted)] = await store.submit([new_job()])
            await store.dead_letter([(unrouted, ErrorInfo(type="Unroutable", message="no"))])
            async with client_on(settings, clock) as client:
                with pytest.raises(UnknownQueue, match="'nowhere' is not a known queue"):
                    await client.replay([dead], to="nowhere")
                assert await store.dead_ids("a") == [dead]
                assert (await client.replay([dead], to="b")).replayed == (dead,)
                assert (await client.replay([unrouted])).replayed == (unrouted,)
            assert (await store.get(dead)).queue == "b"
            assert dead in await store.queued_ids("b")
            assert [p.id for p in await store.pending(10)] == [unrouted]
            await assert_each_job_in_one_place(store, [dead, unrouted])

        run(body())

    def test_reset_budget_or_keep_it(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """With the budget reset a job gets its max_retries again; kept, the next failure
        dead-letters it."""

        async def fail_until_dead(job_id: str, queue: str) -> int:
            runs = 0
            while (await store.get(job_id)).status is not JobStatus.DEAD:
                await store.promote_due()
                [lease] = await store.lease(queue, 1)
                runs += 1
                await store.fail(lease.job_id, lease.token, BOOM)
                clock.advance(400)
            return runs

        async def body() -> None:
            [reset] = await submit_to_queue(store, "a", new_job(max_retries=2))
            [kept] = await submit_to_queue(store, "b", new_job(max_retries=2))
            assert await fail_until_dead(reset, "a") == 3
            assert await fail_until_dead(kept, "b") == 3
            async with client_on(settings, clock) as client:
                await client.replay([reset])
                await client.replay([kept], reset_retries=False)
            assert (await store.get(reset)).charged_attempts == 0
            assert await fail_until_dead(reset, "a") == 3
            assert await fail_until_dead(kept, "b") == 1
            assert (await store.get(reset)).attempts == 6

        run(body())

    def test_refusals_name_the_reason_and_change_nothing(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """Unknown ids, jobs that are not dead, and corrupt records (dead-lettered as
        CorruptJob, not a hash, a field missing) are refused with the reason; they stay put."""

        async def body() -> None:
            r = store.redis
            [ok, corrupt_job, missing_order, not_hash] = await kill(store, "a", 1, 2, 3, 4)
            [queued] = await submit_to_queue(store, "a", new_job())
            await store.dead_letter([(queued, ErrorInfo(type="CorruptJob", message="garbled"))])
            await r.hset(
                store.keys.job(corrupt_job),
                "error",
                ErrorInfo(type="CorruptJob", message="bad spec").model_dump_json(),
            )
            await r.hdel(store.keys.job(missing_order), "order")
            await r.delete(store.keys.job(not_hash))
            await r.set(store.keys.job(not_hash), "garbage")
            [alive] = await submit_to_queue(store, "a", new_job())  # fmt: skip
            async with client_on(settings, clock) as client:
                report = await client.replay(
                    [ok, corrupt_job, missing_order, not_hash, queued, alive, "nope"]
                )
            assert report.replayed == (ok,)
            reasons = {x.job_id: (x.code, x.reason) for x in report.refused}
            assert reasons == {
                corrupt_job: (Code.CORRUPT, "cannot be replayed: it was dead-lettered as corrupt "
                              "(bad spec) (purge it instead)"),
                missing_order: (Code.CORRUPT, "cannot be replayed: job record has no order "
                                "(purge it instead)"),
                not_hash: (Code.CORRUPT, "cannot be replayed: job record is a string, not a "
                           "hash (purge it instead)"),
                queued: (Code.CORRUPT, "cannot be replayed: it was dead-lettered as corrupt "
                         "(garbled) (purge it instead)"),
                alive: (Code.WRONG_STATE, "the job is queued, not in the dead-letter set"),
                "nope": (Code.NOT_FOUND, "no such job"),
            }  # fmt: skip
            assert sorted(await store.dead_ids("a")) == sorted(
                [corrupt_job, missing_order, not_hash, queued]
            )
            assert await r.get(store.keys.job(not_hash)) == "garbage"

        run(body())

    def test_a_repeated_request_changes_nothing(self, store: Store, run: Runner) -> None:
        """The same token again reports OK and leaves the job alone (even if it died again
        meanwhile); another request is refused, the job being no longer dead."""

        async def body() -> None:
            [job_id] = await kill(store, "a", 1)
            first = await store.replay([job_id], token="t1", to_queue=None, reset_retries=True)
            after = await store.get(job_id)
            again = await store.replay([job_id], token="t1", to_queue=None, reset_retries=True)
            assert first == again == [(Code.OK, "")]
            assert await store.get(job_id) == after
            other = await store.replay([job_id], token="t2", to_queue=None, reset_retries=True)
            assert other == [(Code.WRONG_STATE, "the job is queued, not in the dead-letter set")]
            [lease] = await store.lease("a", 1)
            await store.fail(job_id, lease.token, BOOM, retryable=False)
            late = await store.replay([job_id], token="t1", to_queue=None, reset_retries=True)
            assert late == [(Code.OK, "")]
            assert (await store.get(job_id)).status is JobStatus.DEAD

        run(body())

    def test_replay_all_replays_each_dead_job_once(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """replay_all walks the dead-letter sets oldest first in pages: every sound job back in
        its queue, the corrupt ones refused and left to purge."""

        async def body() -> None:
            a = await kill(store, "a", *range(700))
            clock.advance(1)
            b = await kill(store, "b", *range(3))
            await store.redis.hdel(store.keys.job(a[5]), "spec")
            async with client_on(settings, clock) as client:
                report = await client.replay_all()
                assert sorted(report.replayed) == sorted([*a[:5], *a[6:], *b])
                assert [x.job_id for x in report.refused] == [a[5]]
                assert (await client.replay_all(queue="b")).replayed == ()
            assert await store.dead_ids("a") == [a[5]]
            await assert_each_job_in_one_place(store, [*a, *b])

        run(body())


class TestPurge:
    def test_by_id_deletes_the_record_and_its_entry(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """A purged job is gone (record, entry); a job not dead and an unknown id are refused
        and untouched; purging again finds nothing."""

        async def body() -> None:
            dead = await kill(store, "a", 1, 2)
            [alive] = await submit_to_queue(store, "a", new_job())
            async with client_on(settings, clock) as client:
                report = await client.purge([*dead, alive, "nope"])
                assert report.purged == 2
                assert {(x.job_id, x.code) for x in report.refused} == {
                    (alive, Code.WRONG_STATE), ("nope", Code.NOT_FOUND),
                }  # fmt: skip
                again = await client.purge(dead)
                assert (again.purged, {x.code for x in again.refused}) == (0, {Code.NOT_FOUND})
            for job_id in dead:
                assert not await store.redis.exists(store.keys.job(job_id))
            assert await store.dead_ids("a") == []
            assert (await store.get(alive)).status is JobStatus.QUEUED

        run(body())

    def test_corrupt_entries_are_listed_and_purged(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """A dead record that is not a hash, one with a garbled status, and an entry whose
        record is gone: the first two are listed (with the reason) and purged, the third is
        dropped."""

        async def body() -> None:
            r = store.redis
            [not_hash, garbled, gone, sound] = await kill(store, "a", 1, 2, 3, 4)
            await r.delete(store.keys.job(not_hash))
            await r.rpush(store.keys.job(not_hash), "x")
            await r.hset(store.keys.job(garbled), "status", "\xff?")
            await r.delete(store.keys.job(gone))
            async with client_on(settings, clock) as client:
                page = await client.dead_letters(queue="a")
                reasons = {j.id: j.unreadable for j in page.jobs}
                assert reasons == {
                    not_hash: "job record is a list, not a hash",
                    garbled: "job record has an unknown status '\\xc3\\xbf?'",
                    sound: None,
                }
                assert await r.zscore(store.keys.dead("a"), gone) is None  # dropped
                report = await client.purge([not_hash, garbled])
                assert (report.purged, report.refused) == (2, ())
            assert not await r.exists(store.keys.job(not_hash), store.keys.job(garbled))
            assert await store.dead_ids("a") == [sound]

        run(body())

    def test_purge_all_older_than(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """--all --older-than deletes only the jobs that died longer ago, in chunks, in every
        queue's set or one queue's."""

        async def body() -> None:
            old_a = await kill(store, "a", *range(1200))
            old_b = await kill(store, "b", 1)
            clock.advance(3600)
            new_a = await kill(store, "a", 1, 2)
            clock.advance(60)
            async with client_on(settings, clock) as client:
                report = await client.purge_all(queue="b", older_than_s=1800)
                assert report.purged == 1
                report = await client.purge_all(older_than_s=1800)
                assert (report.purged, report.dropped) == (1200, 0)
                assert sorted(await store.dead_ids("a")) == sorted(new_a)
                assert (await client.purge_all()).purged == 2
                with pytest.raises(ValueError, match="older_than_s must be >= 0"):
                    await client.purge_all(older_than_s=-1)
            await assert_each_job_in_one_place(store, [*old_a, *old_b, *new_a])

        run(body())


class TestAtomicity:
    def test_replay_while_a_worker_leases_runs_each_job_once(
        self, redis_server: EmbeddedRedis, settings: Settings, store: Store, run: Runner
    ) -> None:
        """A worker leases and completes from the queue while 300 dead jobs are replayed into
        it one call at a time: each replayed job succeeds exactly once, none is left dead."""

        async def body() -> None:
            replayer = Store(client_from_url(redis_server.url), settings)
            worker = Store(client_from_url(redis_server.url), settings)
            dead = await kill(replayer, "a", *range(300))
            fresh = await submit_to_queue(replayer, "a", *[new_job() for _ in range(100)])
            done: list[str] = []
            stop = asyncio.Event()

            async def serve() -> None:
                while not stop.is_set() or await worker.queued_ids("a"):
                    leases = await worker.lease("a", 7)
                    codes = await worker.complete([(x.job_id, x.token, "ok") for x in leases])
                    assert all(c is Code.OK for c in codes)
                    done.extend(x.job_id for x in leases)
                    await asyncio.sleep(0)

            async def replay() -> None:
                rng = random.Random(3)
                for job_id in rng.sample(dead, len(dead)):
                    [(code, _)] = await replayer.replay(
                        [job_id], token=job_id, to_queue=None, reset_retries=True
                    )
                    assert code is Code.OK
                stop.set()

            await asyncio.wait_for(asyncio.gather(serve(), replay()), timeout=60)
            assert sorted(done) == sorted([*dead, *fresh])
            assert await replayer.dead_ids("a") == []
            await assert_each_job_in_one_place(replayer, [*dead, *fresh])
            await _drop(worker)
            await _drop(replayer)

        run(body())

    def test_purge_while_jobs_die_keeps_the_ones_dying_after_it_began(
        self, redis_server: EmbeddedRedis, settings: Settings, store: Store, run: Runner
    ) -> None:
        """Jobs die while a purge of everything dead runs in chunks: every job dead when it
        began is gone with its entry, every job that died after is whole, none is half."""

        async def body() -> None:
            killer = Store(client_from_url(redis_server.url), settings)
            purger = Store(client_from_url(redis_server.url), settings)
            first = await kill(killer, "a", *range(1500))
            doomed = await submit_to_queue(killer, "a", *[new_job(max_retries=0)
                                                          for _ in range(300)])  # fmt: skip
            cutoff_ms = purger.now_ms()
            await asyncio.sleep(0.002)

            async def die() -> None:
                while leases := await killer.lease("a", 5):
                    for x in leases:
                        await killer.fail(x.job_id, x.token, BOOM, retryable=False)
                    await asyncio.sleep(0)

            async def purge() -> int:
                total, more = 0, True
                while more:
                    deleted, _, more = await purger.purge_dead(
                        queue=None, cutoff_ms=cutoff_ms, limit=100
                    )
                    total += deleted
                    await asyncio.sleep(0)
                return total

            _, purged = await asyncio.wait_for(asyncio.gather(die(), purge()), timeout=60)
            assert purged == len(first)
            for job_id in first:
                assert not await killer.redis.exists(killer.keys.job(job_id))
            assert sorted(await killer.dead_ids("a")) == sorted(doomed)
            await assert_each_job_in_one_place(killer, [*first, *doomed])
            await _drop(purger)
            await _drop(killer)

        run(body())

    def test_replay_and_purge_of_the_same_jobs_never_leave_one_half_done(
        self, store: Store, run: Runner
    ) -> None:
        """Each of 200 dead jobs is replayed and purged at once: it ends either purged (gone
        everywhere) or replayed (queued, its purge refused), never both or neither."""

        async def body() -> None:
            dead = await kill(store, "a", *range(200))
            other = Store(client_from_url(str(store.settings.url())), store.settings)

            async def replay(job_id: str) -> Code:
                [(code, _)] = await store.replay(
                    [job_id], token="t", to_queue=None, reset_retries=True
                )
                return code

            async def purge(job_id: str) -> Code:
                [(code, _)] = await other.purge([job_id])
                return code

            outcomes = await asyncio.gather(*(asyncio.gather(replay(j), purge(j)) for j in dead))
            for job_id, (replayed, purged) in zip(dead, outcomes, strict=True):
                exists = await store.redis.exists(store.keys.job(job_id))
                if purged is Code.OK:
                    assert replayed is Code.NOT_FOUND
                    assert not exists
                else:
                    assert (replayed, purged) == (Code.OK, Code.WRONG_STATE)
                    assert exists
            await assert_each_job_in_one_place(store, dead)
            await _drop(other)

        run(body())


async def _drop(store: Store) -> None:
    await store.close()
    await store.redis.aclose()
