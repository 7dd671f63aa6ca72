"""Level 1's loop: move jobs from the ingress into task queues with the configured routing policy.

The loop blocks on the ingress signal (a token per submit batch) instead of polling, reads the
ingress in batches, routes each batch with one policy call and moves it with one enqueue round trip.
It is crash-safe by construction: a job leaves the ingress only inside the enqueue (or dead-letter)
script, so a router that dies mid-batch leaves its jobs for the next one, and a second router that
routes the same job is refused by the store (WRONG_STATE) instead of queueing it twice.

It never stops on its own: a Redis error (a restart, a failover) is waited out with backoff, and the
next step drains the ingress first, so jobs submitted meanwhile need no wake-up token. One job that
cannot be routed never holds up the others: when the policy or the enqueue fails on a batch, the
batch is retried job by job and the job that still fails is dead-lettered with the error. Each step
marks `progress` (see scheduler.service.health), so a router that is alive but stuck shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from policies.registry import make_router
from policies.views import JobView, QueueView, Rejection, RouteDecision, Router
from scheduler.admission import publish, published_fields
from scheduler.codes import Code
from scheduler.config import ServiceConfig
from scheduler.logs import get_logger
from scheduler.models import ErrorInfo
from scheduler.retry import Backoff, describe, is_transient
from scheduler.service.health import Progress
from scheduler.service.leader import LeaderLock
from scheduler.service.views import (
    PublishedState,
    job_view,
    routing_queue_views,
    size_estimates_s,
)
from scheduler.store import RouteInfo, Store, StoreStats

log = get_logger("bilevel.router")

# Queue views are refreshed at most this often: routing a batch must not cost a stats round trip.
STATS_REFRESH_S = 0.1
# Longest single block on the ingress signal; bounds how late the loop notices a stop or a lost lock.
WAIT_S = 0.5
# The acting router republishes the admission config this often, so a Redis that lost it (a
# restart without persistence, a failover to a stale replica) enforces it again within seconds.
ADMISSION_REPUBLISH_S = 10.0


@dataclass(frozen=True, slots=True)
class RouteReport:
    """What one batch did."""

    # Jobs the store moved into a queue (or into the delayed set, for delayed jobs).
    routed: int = 0
    # Jobs no queue accepts, now dead-lettered with the router's reason.
    rejected: int = 0
    # Jobs another router moved first (the store refused them here).
    skipped: int = 0

    @property
    def total(self) -> int:
        return self.routed + self.rejected + self.skipped


class RouterLoop:
    """Routes the ingress of one namespace; drive it with `route_batch()` or `run(stop)`.

    With a `leader` lock the loop acts only while it holds the lock (it does not renew it: whoever
    owns the lock keeps it, see LeaderLock.keep).
    """

    def __init__(
        self,
        store: Store,
        config: ServiceConfig,
        *,
        router: Router | None = None,
        leader: LeaderLock | None = None,
        rng: np.random.Generator | None = None,
        stats_refresh_s: float = STATS_REFRESH_S,
        wait_s: float = WAIT_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.config = config
        self.router: Router = router or make_router(config.routing.policy, **config.routing.params)
        self.leader = leader
        self.rng = rng or np.random.default_rng()
        self.stats_refresh_s = stats_refresh_s
        self.wait_s = wait_s
        self._monotonic = monotonic
        self._queue_names = [q.name for q in config.queues]
        self._stats: StoreStats | None = None
        self._published: PublishedState | None = None
        # The published state's text as last read, and the views built since the last refresh.
        self._published_raw: object = None
        self._views: tuple[list[QueueView], dict[str, float]] | None = None
        self._stats_at = -float("inf")
        self.routed_total = 0
        self.rejected_total = 0
        self.progress = Progress()
        self.backoff = Backoff()
        # Lag behind the ingress at the last look: jobs waiting and the oldest one's age.
        self.lag_jobs = 0
        self.lag_s = 0.0
        self._admission = published_fields(
            config.admission, config.tenants, [(q.name, q.job_types) for q in config.queues]
        )
        self._admission_at = -float("inf")

    @property
    def acting(self) -> bool:
        """Whether this loop may route now (always, without a leader lock)."""
        return self.leader is None or self.leader.held

    async def _refresh(self) -> None:
        if self._monotonic() - self._stats_at < self.stats_refresh_s and self._stats is not None:
            return
        self._stats = await self.store.stats(self._queue_names)
        raw = await self.store.redis.get(self.store.keys.allocation)
        # The controller publishes once per tick and this runs several times a tick: the same
        # text need not be parsed again (at 256 queues a parse is a few ms of this process).
        if raw != self._published_raw:
            self._published_raw = raw
            try:
                self._published = None if raw is None else PublishedState.from_json(str(raw))
            except ValueError:
                self._published = None
        self._views = None
        self._stats_at = self._monotonic()

    def _queue_views(self) -> tuple[list[QueueView], dict[str, float]]:
        """The queue views and size estimates from the last refresh, built once per refresh
        rather than per batch (the batches between two refreshes see the same inputs)."""
        if self._views is None:
            assert self._stats is not None
            queues = routing_queue_views(self.config, self._stats, self._published)
            self._views = (queues, size_estimates_s(queues))
        queues, sizes = self._views
        return list(queues), sizes

    async def route_batch(self) -> RouteReport:
        """Route up to `routing.batch_size` of the oldest ingress jobs; an empty report when none."""
        pending = await self.store.pending(self.config.routing.batch_size)
        self.lag_jobs = len(pending)
        self.lag_s = max(0.0, time.time() - pending[0].created_s) if pending else 0.0
        if not pending:
            return RouteReport()
        await self._refresh()
        queues, sizes = self._queue_views()
        decisions = self._decide(pending, queues, sizes)
        routed: list[tuple[str, str]] = []
        rejected: list[tuple[str, ErrorInfo]] = []
        for info, decision in zip(pending, decisions, strict=True):
            if isinstance(decision, Rejection):
                rejected.append((info.id, ErrorInfo(type="Unroutable", message=decision.reason)))
            else:
                routed.append((info.id, decision))
        codes = await self._enqueue(routed, rejected)
        moved = sum(1 for c in codes if c in (Code.OK, Code.DELAYED))
        dead = await self.store.dead_letter(rejected)
        n_rejected = sum(1 for c in dead if c is Code.DEAD_LETTERED)
        report = RouteReport(
            routed=moved, rejected=n_rejected, skipped=len(pending) - moved - n_rejected
        )
        self.routed_total += report.routed
        self.rejected_total += report.rejected
        if rejected:
            log.warning("jobs_unroutable", count=len(rejected), first_reason=rejected[0][1].message)
        log.debug(
            "batch_routed", routed=report.routed, rejected=report.rejected, skipped=report.skipped
        )
        return report

    def _decide(
        self, pending: list[RouteInfo], queues: list[QueueView], sizes: dict[str, float]
    ) -> list[RouteDecision]:
        """The policy's decision per job, in one call; when that call fails, job by job, so a job
        the policy cannot handle is rejected with the error instead of stopping the batch."""
        try:
            jobs = [job_view(p, size_estimate_s=sizes.get(p.job_type, 0.0)) for p in pending]
            return self.router.route_batch(jobs, queues, self.rng)
        except Exception as exc:
            log.warning("routing_batch_failed", jobs=len(pending), error=describe(exc))
        decisions: list[RouteDecision] = []
        for p in pending:
            try:
                job: JobView = job_view(p, size_estimate_s=sizes.get(p.job_type, 0.0))
                decisions += self.router.route_batch([job], queues, self.rng)
            except Exception as exc:
                reason = f"the {self.router.name} router failed on this job: {describe(exc)}"
                decisions.append(Rejection(reason))
        return decisions

    async def _enqueue(
        self, routed: list[tuple[str, str]], rejected: list[tuple[str, ErrorInfo]]
    ) -> list[Code]:
        """Enqueue in one round trip; if the store refuses the batch (not an outage), job by job,
        adding a job that still fails to `rejected` with the store's error."""
        try:
            return await self.store.enqueue(routed)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.warning("enqueue_batch_failed", jobs=len(routed), error=describe(exc))
        codes: list[Code] = []
        for job_id, queue in routed:
            try:
                codes += await self.store.enqueue([(job_id, queue)])
            except Exception as exc:
                if is_transient(exc):
                    raise
                message = f"the store could not queue this job in {queue!r}: {describe(exc)}"
                rejected.append((job_id, ErrorInfo(type="CorruptJob", message=message)))
                codes.append(Code.CORRUPT)
        return codes

    async def drain(self) -> int:
        """Route batches until the ingress is empty (or the lock is lost); returns jobs handled."""
        handled = 0
        while self.acting:
            report = await self.route_batch()
            handled += report.total
            if report.total == 0 or report.total < self.config.routing.batch_size:
                break
        return handled

    async def run(self, stop: asyncio.Event) -> None:
        """Route until `stop` is set: drain the ingress, then block on its signal. Errors are
        logged and waited out with backoff; the loop only ends when told to."""
        log.info("router_started", policy=self.router.name)
        while not stop.is_set():
            try:
                await self._step(stop)
            except Exception as exc:
                self.progress.failed(exc)
                if not is_transient(exc):
                    log.exception("router_step_failed", failures=self.progress.failures)
                elif self.progress.failures == 1:
                    log.warning("router_redis_unavailable", error=describe(exc))
                await _wait_or_stop(stop, self.backoff.delay_s(self.progress.failures))
        log.info("router_stopped", routed=self.routed_total, rejected=self.rejected_total)

    async def publish_admission(self) -> None:
        """Publish the config's admission caps and tenant shares for the scripts to enforce."""
        await publish(self.store.redis, self.store.keys, self._admission)
        self._admission_at = self._monotonic()

    async def _step(self, stop: asyncio.Event) -> None:
        if not self.acting:
            # A standby: the lock keeper wakes us within its renew interval.
            self.progress.mark()
            await _wait_or_stop(stop, self.wait_s)
            return
        recovering = self.progress.failures > 0
        if recovering or self._monotonic() - self._admission_at >= ADMISSION_REPUBLISH_S:
            await self.publish_admission()
        await self.drain()
        if recovering:
            log.info("router_resumed", after_failures=self.progress.failures)
        self.progress.mark()
        if stop.is_set():
            return
        # Blocks (BLPOP) until a submit pushes a token; jobs submitted between drain() and
        # here also pushed one, so nothing waits for the timeout.
        await self.store.wait_for_ingress(self.wait_s)


async def _wait_or_stop(stop: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout_s)


__all__ = ["RouteReport", "RouterLoop"]
