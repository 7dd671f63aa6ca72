"""A hypothesis state machine drives every store transition against the real Redis with an injected
clock, and after each step checks that each job is in exactly one place matching its status, none is
lost (only a purge deletes, and only dead jobs), a completed job is never leased again, a second
completion never replaces the first, and a replay keeps the attempts and history it had."""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from scheduler.codes import Code
from scheduler.connection import client_from_url
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.keys import HISTORY_LEN
from scheduler.models import ErrorInfo, JobStatus
from scheduler.settings import Settings
from scheduler.store import Lease, Store
from tests.conftest import ManualClock
from tests.integration.helpers import assert_each_job_in_one_place, new_job

QUEUES = ("a", "b")
BOOM = ErrorInfo(type="Boom", message="failed on purpose")


class StoreMachine(RuleBasedStateMachine):
    server: EmbeddedRedis

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = ManualClock()
        self.namespace = f"sm{uuid.uuid4().hex[:10]}"
        cfg = Settings.from_url(
            self.server.url, namespace=self.namespace, lease_s=10.0, require_service=False
        )
        self.redis = client_from_url(self.server.url)
        self.store = Store(self.redis, cfg, clock=self.clock, rng=random.Random(0))
        self.jobs: set[str] = set()
        self.held: dict[str, Lease] = {}  # leases a live worker still holds
        self.results: dict[str, Any] = {}  # first accepted result per job
        self.purged: set[str] = set()  # deleted by a purge (out of `jobs`): records gone
        self.counter = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        async def drop() -> None:
            pattern = f"bilevel:{{{self.namespace}}}:*"
            async for key in self.redis.scan_iter(match=pattern, count=1000):
                await self.redis.delete(key)
            await self.redis.aclose()

        self.run(drop())
        self.loop.close()

    # -- rules ------------------------------------------------------------------------------

    @rule(
        n=st.integers(1, 3),
        idem=st.sampled_from([None, "k1", "k2"]),
        retries=st.integers(0, 2),
        delay=st.sampled_from([0.0, 0.0, 5.0]),
        priority=st.integers(0, 3),
    )
    def submit(self, n: int, idem: str | None, retries: int, delay: float, priority: int) -> None:
        # Ids follow a counter, not uuid4: hypothesis replays a case and must draw the same jobs.
        batch = [
            replace(
                new_job(payload=self._next(), idempotency_key=idem if i == 0 else None,
                        max_retries=retries, delay_s=delay, priority=priority),
                id=f"job{self.counter:06d}",
            )
            for i in range(n)
        ]  # fmt: skip
        for code, job_id in self.run(self.store.submit(batch)):
            assert code in (Code.OK, Code.DUPLICATE)
            if code is Code.DUPLICATE:
                assert job_id in self.jobs
            self.jobs.add(job_id)

    @rule(queue=st.sampled_from(QUEUES), limit=st.integers(1, 5))
    def route(self, queue: str, limit: int) -> None:
        pending = self.run(self.store.pending(limit))
        codes = self.run(self.store.enqueue([(p.id, queue) for p in pending]))
        assert all(c in (Code.OK, Code.DELAYED) for c in codes)

    @rule(queue=st.sampled_from(QUEUES), n=st.integers(1, 4))
    def lease(self, queue: str, n: int) -> None:
        for lease in self.run(self.store.lease(queue, n)):
            assert lease.job_id not in self.results, "a completed job was leased again"
            self.held[lease.job_id] = lease

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        lease = self._pick_held(data)
        [code] = self.run(self.store.heartbeat([(lease.job_id, lease.token)]))
        assert code in (
            Code.OK, Code.CANCEL_REQUESTED, Code.STALE_LEASE, Code.ALREADY_FINISHED,
            *self._gone(lease),
        )  # fmt: skip
        if code in (Code.STALE_LEASE, Code.ALREADY_FINISHED, Code.NOT_FOUND):
            del self.held[lease.job_id]

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        lease = self._pick_held(data)
        value = self._next()
        [code] = self.run(self.store.complete([(lease.job_id, lease.token, value)]))
        del self.held[lease.job_id]
        if code is Code.OK:
            assert lease.job_id not in self.results, "a job was completed twice"
            self.results[lease.job_id] = value
        else:
            assert code in (Code.STALE_LEASE, Code.ALREADY_FINISHED, *self._gone(lease))

    @precondition(lambda self: self.results)
    @rule(data=st.data())
    def complete_again(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.results)))
        job = self.run(self.store.get(job_id))
        [code] = self.run(self.store.complete([(job_id, job.attempts, "second")]))
        assert code is Code.ALREADY_FINISHED

    @precondition(lambda self: self.held)
    @rule(data=st.data(), retryable=st.booleans())
    def fail(self, data: st.DataObject, retryable: bool) -> None:
        lease = self._pick_held(data)
        code = self.run(self.store.fail(lease.job_id, lease.token, BOOM, retryable=retryable))
        del self.held[lease.job_id]
        assert code in (
            Code.RETRY_SCHEDULED, Code.DEAD_LETTERED, Code.OK, Code.STALE_LEASE,
            Code.ALREADY_FINISHED, *self._gone(lease),
        )  # fmt: skip

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.jobs)))
        code = self.run(self.store.cancel(job_id))
        assert code in (Code.OK, Code.CANCEL_PENDING, Code.ALREADY_FINISHED)

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), queue=st.sampled_from(QUEUES))
    def move(self, data: st.DataObject, queue: str) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.jobs)))
        [code] = self.run(self.store.move([job_id], queue))
        assert code in (Code.OK, Code.WRONG_STATE)

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def dead_letter(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.jobs)))
        [code] = self.run(self.store.dead_letter([(job_id, BOOM)]))
        assert code in (Code.DEAD_LETTERED, Code.ALREADY_FINISHED)

    @precondition(lambda self: self.jobs | self.purged)
    @rule(data=st.data(), to=st.sampled_from([None, *QUEUES]), reset=st.booleans())
    def replay(self, data: st.DataObject, to: str | None, reset: bool) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.jobs | self.purged)))
        before = self.run(self.store.get(job_id)) if job_id not in self.purged else None
        token = f"t{self._next()}"
        [(code, reason)] = self.run(
            self.store.replay([job_id], token=token, to_queue=to, reset_retries=reset)
        )
        if before is None:
            assert code is Code.NOT_FOUND, reason
            return
        known = self.run(self.store.known_queues())
        if before.status is not JobStatus.DEAD or (to is not None and to not in known):
            assert code is Code.WRONG_STATE, reason
            return
        assert code is Code.OK, reason
        after = self.run(self.store.get(job_id))
        # Back where it died (the ingress, for a job never routed), or in `to`.
        if to is None and before.queue is None:
            assert (after.status, after.queue) == (JobStatus.PENDING, None)
        else:
            assert (after.status, after.queue) == (JobStatus.QUEUED, to or before.queue)
        assert after.attempts == before.attempts
        assert after.history[-1].event == "replayed"
        assert after.history == (*before.history, after.history[-1])[-HISTORY_LEN:]
        if reset:
            assert after.charged_attempts in (0, None)  # None: it never ran
        else:
            assert after.charged_attempts == before.charged_attempts
        # The same request again changes nothing.
        again = self.run(self.store.replay([job_id], token=token, to_queue=to, reset_retries=reset))
        assert again == [(Code.OK, "")]
        assert self.run(self.store.get(job_id)) == after

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def purge(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.jobs)))
        status = self.run(self.redis.hget(self.store.keys.job(job_id), "status"))
        [(code, reason)] = self.run(self.store.purge([job_id]))
        if status is None:
            assert code is Code.NOT_FOUND, reason
        elif status == JobStatus.DEAD:
            assert code is Code.OK, reason
            self._purged(job_id)
        else:
            assert code is Code.WRONG_STATE, reason

    @rule(older_than_s=st.sampled_from([0.0, 5.0, 60.0]))
    def purge_all(self, older_than_s: float) -> None:
        cutoff = self.store.now_ms() - round(older_than_s * 1000)
        dead_before = self._dead_since()
        deleted, dropped, more = self.run(
            self.store.purge_dead(queue=None, cutoff_ms=cutoff, limit=1000)
        )
        assert (dropped, more) == (0, False)
        doomed = {job_id for job_id, died_ms in dead_before.items() if died_ms <= cutoff}
        assert deleted == len(doomed)
        for job_id in doomed:
            self._purged(job_id)
        assert set(self._dead_since()) == set(dead_before) - doomed

    @rule(seconds=st.sampled_from([0.5, 3.0, 6.0, 11.0, 30.0]), worker_dies=st.booleans())
    def time_passes(self, seconds: float, worker_dies: bool) -> None:
        if worker_dies:
            self.held.clear()  # the workers holding leases vanish without a word
        self.clock.advance(seconds)
        self.run(self.store.requeue_expired())
        self.run(self.store.promote_due())

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def each_job_in_exactly_one_place(self) -> None:
        if not self.jobs and not self.purged:
            return
        self.run(assert_each_job_in_one_place(self.store, self.jobs | self.purged))
        ids = sorted(self.jobs | self.purged)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.store.keys.job(job_id), "status", "result")
        for job_id, (status, result) in zip(ids, self.run(pipe.execute()), strict=True):
            if job_id in self.purged:
                assert status is None, f"job {job_id} was purged, yet its record is there"
                continue
            assert status is not None, f"job {job_id} was lost"
            if job_id in self.results:
                assert status == JobStatus.SUCCEEDED
                assert result == f'"{self.results[job_id]}"', "the first result must stand"

    # -- helpers ----------------------------------------------------------------------------

    def _gone(self, lease: Lease) -> tuple[Code, ...]:
        """NOT_FOUND, when a report may find its job purged (and must not bring it back)."""
        return (Code.NOT_FOUND,) if lease.job_id in self.purged else ()

    def _purged(self, job_id: str) -> None:
        self.jobs.discard(job_id)
        self.purged.add(job_id)

    def _dead_since(self) -> dict[str, float]:
        """Every dead-lettered job id with the ms it died, from the dead-letter sets."""
        out: dict[str, float] = {}
        for queue in (*QUEUES, "~ingress"):
            for job_id, died_ms in self.run(
                self.redis.zrange(self.store.keys.dead(queue), 0, -1, withscores=True)
            ):
                out[job_id] = died_ms
        return out

    def _next(self) -> str:
        self.counter += 1
        return f"v{self.counter}"

    def _pick_held(self, data: st.DataObject) -> Lease:
        job_id = data.draw(st.sampled_from(sorted(self.held)))
        return self.held[job_id]


def test_store_state_machine(own_redis: EmbeddedRedis) -> None:
    """Random sequences of every transition keep the store's invariants."""
    StoreMachine.server = own_redis
    run_state_machine_as_test(
        StoreMachine,
        settings=settings(
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
