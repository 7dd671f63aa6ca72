"""Level 2's loop: every tick, decide how many workers each queue gets and apply it to the pool.

A tick does the store's housekeeping (expired leases back to their queues, due delayed jobs into
theirs, dead workers replaced), builds a ClusterView from store stats and the pool view, asks the
configured allocator for targets through the guardrails, applies them, and logs one event with the
inputs and the decision per queue, so a reader can see why a queue gained or lost workers.

It also publishes its state (Keys.allocation, every tick), the history of allocation changes
(Keys.allocation_history, on change) and the decisions that changed something or that a guardrail
shaped (Keys.decisions, scheduler.service.decisions): `bilevel status`, load-aware routing, the
demo's plot, the metrics and the dashboard read them. Its first tick gives complete.lua each
queue's SLO (scheduler.timings), against which finished jobs are judged. With `allocation.shadow`
a second policy decides beside the acting one every tick and both decisions are logged and
published, with an estimate of the difference (scheduler.service.shadow).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from policies.guardrails import Guardrails, guardrails_for
from policies.registry import make_allocator
from policies.views import Allocation, Allocator, ClusterView
from scheduler.admission import DRAIN_TTL_S
from scheduler.config import ServiceConfig
from scheduler.keys import ALLOCATION_HISTORY_LEN, ALLOCATION_TTL_S
from scheduler.logs import get_logger
from scheduler.retry import describe, is_transient
from scheduler.service.autoscaling import AutoscaleRequester, workers_held
from scheduler.service.decisions import DecisionRecord, decision_record, queue_decisions
from scheduler.service.health import Progress
from scheduler.service.leader import LeaderLock
from scheduler.service.shadow import RoleRecord, ShadowDecision, ShadowMode
from scheduler.service.views import PublishedQueue, PublishedState, ViewBuilder
from scheduler.store import RequeueReport, Store, StoreStats
from scheduler.timings import write_slos
from workers.pool_view import PoolView, QueuePoolView

log = get_logger("bilevel.controller")

# In-memory allocation history kept by the loop (the Redis copy is trimmed to the same length).
HISTORY_LEN = ALLOCATION_HISTORY_LEN


class Pool(Protocol):
    """What the controller needs of a worker pool (workers.pool.WorkerPool implements it)."""

    async def apply(self, target: Mapping[str, int]) -> Any: ...

    async def view(self) -> PoolView: ...

    async def replace_dead(self) -> int: ...

    async def shutdown(self) -> None: ...


@dataclass(frozen=True, slots=True)
class AllocationChange:
    """One entry of the allocation history: at `t_s` the targets became `workers`, and why."""

    t_s: float
    workers: dict[str, int]
    # The policy that decided, what it proposed before the guardrails, the guardrails that
    # changed the proposal (policies.guardrails: hysteresis, bounds, budget, move_cap), and why
    # the fallback decided instead, if it did.
    policy: str = ""
    proposal: dict[str, int] = field(default_factory=dict)
    constraints: tuple[str, ...] = ()
    fallback: str | None = None
    # What the policy saw of each queue: depth, arrival rate, oldest wait, service time.
    inputs: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "t_s": self.t_s,
            "workers": self.workers,
            "policy": self.policy,
            "proposal": self.proposal,
            "constraints": list(self.constraints),
            "fallback": self.fallback,
            "inputs": self.inputs,
        }


@dataclass(frozen=True, slots=True)
class TickReport:
    """What one tick saw and did."""

    view: ClusterView
    before: dict[str, int]
    target: Allocation
    # Why the guardrails used the fallback allocator this tick; None when the policy's proposal
    # was used (then bounds, budget and the move cap may still have trimmed it).
    fallback: str | None
    requeue: RequeueReport
    promoted: int
    replaced: int
    # Whatever the pool's apply() returned (workers.pool.PoolChange).
    change: Any = None
    pool: PoolView = field(default_factory=PoolView)
    stats: StoreStats | None = None
    # What decided: the allocator's name, or "initial" for a first decision from
    # allocation.initial.
    policy: str = ""
    # What the policy saw and proposed, and what the guardrails made of it.
    decision: DecisionRecord | None = None
    # The guardrails that changed the deciding policy's proposal (policies.guardrails).
    constraints: tuple[str, ...] = ()
    # The shadow policy's decision for the same view (with allocation.shadow), and the estimate
    # this tick made, if it made one.
    shadow: ShadowDecision | None = None
    estimate: Any = None

    @property
    def changed(self) -> bool:
        return self.target != self.before

    @property
    def quiet(self) -> bool:
        """Nothing waiting, running, arriving, loading or changing: the next full tick can wait."""
        s = self.stats
        return (
            s is not None
            and not self.changed
            and s.ingress == 0
            and self.promoted == 0
            and self.replaced == 0
            and self.requeue.requeued == 0
            and all(q.depth == 0 and q.in_flight == 0 for q in s.queues.values())
            and all(p.loading == 0 and p.draining == 0 for p in self.pool.queues.values())
        )


def activity_marks(stats: StoreStats) -> tuple[int, ...]:
    """What changes when any job arrives, is routed, runs or finishes (the running totals
    included, so a job that came and went between two looks still counts)."""
    marks = [stats.ingress]
    for q in stats.queues.values():
        marks += (q.depth, q.in_flight, q.enqueued_total, q.completed_total, q.failed_total)
    return tuple(marks)


def make_guardrails(config: ServiceConfig, inner: Allocator | None = None) -> Guardrails:
    """The configured allocator (or `inner`) wrapped in the configured guardrails, built as the
    simulator builds a scenario's (policies.guardrails.guardrails_for)."""
    alloc = config.allocation
    return guardrails_for(
        config, inner if inner is not None else make_allocator(alloc.policy, **alloc.params)
    )


class InitialAllocation:
    """`allocation.initial` as a proposal: its counts, 0 for the queues it leaves out."""

    name: str = "initial"

    def __init__(self, workers: Mapping[str, int]) -> None:
        self.workers = dict(workers)

    def allocate(self, view: ClusterView) -> Allocation:
        return {q.name: int(self.workers.get(q.name, 0)) for q in view.queues}


class ControllerLoop:
    """Allocates workers across the configured queues; drive it with `tick()` or `run(stop)`.

    `clock` gives now_s for views and history (wall-clock seconds by default); `sleep` paces `run`
    (tests inject both). With a `leader` lock the loop ticks only while the lock is held.
    """

    def __init__(
        self,
        store: Store,
        config: ServiceConfig,
        pool: Pool,
        *,
        allocator: Allocator | None = None,
        leader: LeaderLock | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        logger: Any = None,
        autoscaler: AutoscaleRequester | None = None,
        shadow: Allocator | None = None,
    ) -> None:
        self.store = store
        # Asks the Ray autoscaler for nodes when the target needs more than the cluster has.
        self.autoscaler = autoscaler
        self.config = config
        self.pool = pool
        # With allocation.shadow, both policies and their guardrails live in `self.shadow`, and
        # `self.guardrails` is whichever of them acts (a promotion swaps them).
        self.shadow: ShadowMode | None = None
        alloc = config.allocation
        if alloc.shadow is not None:
            acting = (
                allocator if allocator is not None else make_allocator(alloc.policy, **alloc.params)
            )
            if shadow is None:
                shadow = make_allocator(alloc.shadow, **alloc.shadow_params)
            self.shadow = ShadowMode(config, acting, shadow)
            self.guardrails = self.shadow.acting
        else:
            self.guardrails = make_guardrails(config, allocator)
        # A controller that starts with no workers makes allocation.initial its first decision,
        # inside the same guardrails, as a simulated run starts from it.
        initial = config.allocation.initial
        self._initial = (
            guardrails_for(config, InitialAllocation(initial)) if initial is not None else None
        )
        self.leader = leader
        self.clock = clock
        self._sleep = sleep
        # Injectable so tests can read the decision events without reconfiguring structlog.
        self.log = logger if logger is not None else log
        self.views = ViewBuilder(config)
        self.history: deque[AllocationChange] = deque(maxlen=HISTORY_LEN)
        self.last: TickReport | None = None
        self.ticks = 0
        self._queue_names = [q.name for q in config.queues]
        # Marked by every full tick and idle check that completed (scheduler.service.health).
        self.progress = Progress(clock=clock)
        self.last_tick_s = 0.0

    @property
    def acting(self) -> bool:
        return self.leader is None or self.leader.held

    async def tick(self) -> TickReport:
        """One allocation step (housekeeping, view, decision, apply, log, publish)."""
        # The store's housekeeping (Redis) and the pool's health check (a call to each worker)
        # touch nothing of each other's: side by side, the tick waits for the slower of the two
        # instead of both. The stats follow the housekeeping, so they count what it moved.
        store_part = asyncio.ensure_future(self._housekeeping())
        try:
            replaced = await self.pool.replace_dead()
        except BaseException:
            store_part.cancel()
            with contextlib.suppress(BaseException):
                await store_part
            raise
        requeue, promoted, stats = await store_part
        pool_view = await self.pool.view()
        now_s = self.clock()
        if self.shadow is not None:
            await self._follow_role(now_s)
        view = self.views.cluster_view(stats, pool_view, now_s)
        before = view.allocation()
        deciding = self.guardrails
        if self._initial is not None and self.ticks == 0 and not any(before.values()):
            deciding = self._initial
        target = deciding.allocate(view)
        fallback = deciding.last_fallback_reason
        decision = decision_record(
            view,
            policy=deciding.name,
            before=before,
            proposal=deciding.last_proposal,
            target=target,
            fallback=fallback,
            interventions=deciding.last_interventions,
        )
        if self.autoscaler is not None:
            # One GCS round trip at most, off the event loop; it never raises.
            await asyncio.to_thread(self.autoscaler.update, target, workers_held(pool_view))
        change = await self.pool.apply(target)
        shadow_decision, estimate = None, None
        if self.shadow is not None:
            shadow_decision, estimate = await self._shadow_tick(view, stats, now_s)
        report = TickReport(
            view=view,
            before=before,
            target=target,
            fallback=fallback,
            requeue=requeue,
            promoted=promoted,
            replaced=replaced,
            change=change,
            pool=pool_view,
            stats=stats,
            policy=deciding.name,
            decision=decision,
            constraints=deciding.last_constraints,
            shadow=shadow_decision,
            estimate=estimate,
        )
        self.ticks += 1
        self.last = report
        # The history records targets, not pool states: one entry per decision that differs.
        new_entry = not self.history or self.history[-1].workers != target
        if new_entry:
            self.history.append(
                AllocationChange(
                    now_s,
                    dict(target),
                    policy=deciding.name,
                    proposal=dict(deciding.last_proposal),
                    constraints=deciding.last_constraints,
                    fallback=fallback,
                    inputs={
                        q.name: {
                            "depth": q.depth,
                            "rate_per_s": round(q.arrival_rate_per_s, 3),
                            "oldest_wait_s": round(q.oldest_wait_s, 3),
                            "service_s": round(q.service_time_s, 4),
                        }
                        for q in view.queues
                    },
                )
            )
        self._log(report)
        await self._publish(report, record_change=new_entry)
        return report

    async def _housekeeping(self) -> tuple[RequeueReport, int, StoreStats]:
        """Expired leases back to their queues and due delayed jobs into theirs (two scripts,
        each atomic, in flight together), then the stats, which count what they moved."""
        requeue, promoted = await asyncio.gather(
            self.store.requeue_expired(), self.store.promote_due(), return_exceptions=True
        )
        # Both are awaited to the end before either error is raised: none is left unretrieved.
        if isinstance(requeue, BaseException):
            raise requeue
        if isinstance(promoted, BaseException):
            raise promoted
        return requeue, promoted, await self.store.stats(self._queue_names)

    async def _follow_role(self, now_s: float) -> None:
        """Makes the role Keys.acting_policy names act (a promotion, manual or automatic)."""
        assert self.shadow is not None
        raw = await self.store.redis.get(self.store.keys.acting_policy)
        if raw is None:
            return
        try:
            record = RoleRecord.from_json(str(raw))
        except ValueError as exc:
            self.log.warning("acting_policy_unreadable", error=str(exc))
            return
        was = self.guardrails.name
        if self.shadow.apply_role(record):
            self.guardrails = self.shadow.acting
            self.log.info(
                "allocation_policy_promoted",
                acting=self.guardrails.name,
                shadow=self.shadow.shadow.name,
                previously_acting=was,
                role=record.role,
                by=record.by,
            )

    async def _shadow_tick(
        self, view: ClusterView, stats: StoreStats, now_s: float
    ) -> tuple[ShadowDecision, Any]:
        """The shadow's decision for this tick's view and, when one is due, the estimate (in a
        thread: it is CPU-bound); an automatic promotion is written for the next tick to apply."""
        assert self.shadow is not None
        decision = self.shadow.decide(view)
        self.shadow.observe(view, stats)
        if not self.shadow.due:
            return decision, None
        try:
            estimate = await asyncio.to_thread(self.shadow.run_estimate)
        except Exception:  # the estimate is advice: a failure must not fail the tick
            self.log.exception("shadow_estimate_failed")
            return decision, None
        if estimate is None:
            return decision, None
        self.log.info(
            "shadow_estimate",
            acting=self.guardrails.name,
            shadow=self.shadow.shadow.name,
            **estimate.to_dict(),
        )
        if self.shadow.record_estimate(estimate, now_s):
            record = RoleRecord("shadow", "auto", now_s)
            await self.store.redis.set(self.store.keys.acting_policy, record.to_json())
            self.log.info(
                "shadow_promotion_requested",
                shadow=self.shadow.shadow.name,
                gain=round(estimate.gain, 4),
            )
        return decision, estimate

    def _log(self, r: TickReport) -> None:
        # A compact table, one cell per queue, "name depth=.. rate=../s workers a->b".
        cells = []
        for q in r.view.queues:
            cells.append(
                f"{q.name} depth={q.depth} wait={q.oldest_wait_s:.1f}s "
                f"rate={q.arrival_rate_per_s:.2f}/s svc={q.service_time_s:.3f}s "
                f"workers {r.before[q.name]}->{r.target[q.name]}"
            )
        event: dict[str, Any] = {
            "policy": r.policy or self.guardrails.name,
            "changed": r.changed,
            "queues": " | ".join(cells),
            "budget": r.view.budget,
        }
        if r.fallback is not None:
            event["fallback"] = r.fallback
        if r.decision is not None and r.decision.interventions:
            event["guardrails"] = "; ".join(i.describe() for i in r.decision.interventions)
        if r.constraints:
            event["constraints"] = ",".join(r.constraints)
        if r.shadow is not None:
            event["shadow_policy"] = r.shadow.policy
            target = r.shadow.target
            event["shadow"] = (
                "none"
                if target is None
                else " ".join(f"{q.name}={target[q.name]}" for q in r.view.queues)
            )
            event["shadow_agrees"] = target == r.target
            if r.shadow.fallback is not None:
                event["shadow_fallback"] = r.shadow.fallback
        if r.requeue.requeued or r.requeue.dead_lettered:
            event["requeued"] = r.requeue.requeued
            event["lease_dead_lettered"] = r.requeue.dead_lettered
        if r.replaced:
            event["workers_replaced"] = r.replaced
        if r.fallback is not None:
            self.log.warning("allocation_tick", **event)
        else:
            self.log.info("allocation_tick", **event)

    def published_state(self, r: TickReport) -> PublishedState:
        completions = self.views.completions.rates_per_s
        queues = {}
        for q in r.view.queues:
            p = r.pool.queues.get(q.name, QueuePoolView(q.name))
            queues[q.name] = PublishedQueue(
                workers=r.target[q.name],
                ready=q.workers_ready,
                busy=q.workers_busy,
                loading=q.workers_loading,
                draining=p.draining,
                depth=q.depth,
                service_time_s=q.service_time_s,
                model_load_s=q.model_load_s,
                arrival_rate_per_s=q.arrival_rate_per_s,
                completion_rate_per_s=completions.get(q.name, 0.0),
            )
        return PublishedState(
            t_s=r.view.now_s,
            policy=self.guardrails.name,
            queues=queues,
            fallback=r.fallback,
            shadow=None if self.shadow is None else self.shadow.published(r.shadow),
        )

    async def _publish(self, r: TickReport, *, record_change: bool) -> None:
        keys = self.store.keys
        pipe = self.store.redis.pipeline(transaction=False)
        pipe.set(
            keys.allocation, self.published_state(r).to_json(), px=round(ALLOCATION_TTL_S * 1000)
        )
        if record_change:
            pipe.rpush(keys.allocation_history, json.dumps(self.history[-1].to_dict()))
            pipe.ltrim(keys.allocation_history, -HISTORY_LEN, -1)
        if r.decision is not None:
            queue_decisions(pipe, keys, r.decision)
        # Admission's wait estimate and retry-after hints divide by these (scheduler.admission).
        rates = {q: r for q, r in self.views.completions.rates_per_s.items() if r > 0}
        pipe.delete(keys.drain)
        if rates:
            pipe.hset(keys.drain, mapping={q: f"{r:.6g}" for q, r in rates.items()})
            pipe.pexpire(keys.drain, round(DRAIN_TTL_S * 1000))
        await pipe.execute()
        if self.ticks == 1:
            await write_slos(self.store.redis, keys, {q.name: q.slo_s for q in self.config.queues})

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        if self._sleep is not None:
            await self._sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    async def _idle_still(self, quiet: TickReport, since_s: float) -> bool:
        """While the last full tick was quiet: True when Redis shows nothing new and the next
        full tick is not yet due. Two cheap Redis calls instead of a tick's pool calls to every
        worker, which is what an idle service would otherwise spend its CPU on."""
        assert quiet.stats is not None
        idle_tick_s = max(self.config.allocation.tick_s, self.config.allocation.idle_tick_s)
        if self.clock() - since_s >= idle_tick_s:
            return False
        if await self.store.promote_due():
            return False
        stats = await self.store.stats(self._queue_names)
        return activity_marks(stats) == activity_marks(quiet.stats)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every `allocation.tick_s` until `stop` is set; while the service is idle, run the
        full tick every `allocation.idle_tick_s` and only look at Redis in between. A failing
        tick is logged and the next one runs: one Redis hiccup or pool error must not stop
        level 2."""
        tick_s = self.config.allocation.tick_s
        log.info("controller_started", policy=self.guardrails.name, tick_s=tick_s)
        quiet: TickReport | None = None
        quiet_since_s = 0.0
        while not stop.is_set():
            started = self.clock()
            if self.acting:
                try:
                    if quiet is None or not await self._idle_still(quiet, quiet_since_s):
                        recovering = self.progress.failures > 0
                        report = await self.tick()
                        self.last_tick_s = self.clock() - started
                        quiet = report if report.quiet else None
                        quiet_since_s = self.clock()
                        if recovering:
                            log.info("controller_resumed", after_failures=self.progress.failures)
                    self.progress.mark()
                except Exception as exc:
                    quiet = None
                    self.progress.failed(exc)
                    if not is_transient(exc):
                        log.exception("allocation_tick_failed")
                    elif self.progress.failures == 1:
                        log.warning("controller_redis_unavailable", error=describe(exc))
            else:
                quiet = None
                self.progress.mark()
                # A controller that lost the lead must not keep nodes up for the new leader.
                await self._withdraw_request()
            await self._pause(stop, max(0.0, started + tick_s - self.clock()))
        await self._withdraw_request()
        log.info("controller_stopped", ticks=self.ticks)

    async def _withdraw_request(self) -> None:
        if self.autoscaler is not None and self.autoscaler.standing:
            await asyncio.to_thread(self.autoscaler.withdraw)


__all__ = ["AllocationChange", "ControllerLoop", "Pool", "TickReport", "make_guardrails"]
