"""The control plane's Ray actor: `ControlPlane`, hosting a `RoleHost` per role (plain classes).

A RoleHost runs one role (router or controller) of one namespace: it campaigns for the role's
leader lock and runs the role's loop, which acts only while the lock is held. Any number of hosts
of a role may run; one leads, the others stand by and take over when its lock lapses.

Both roles share one actor process. Each keeps its own lock, loop and Redis connections, so they
lead and fail over independently; what they share is the process, because every Ray actor process
costs about 0.3% of a core while idle (Ray's core worker wakes its main thread every 10 ms to
check for signals), and the idle service is meant to cost under 2% of a core in all.

The controller host owns the worker pool of its term as leader: it creates the pool when it gains
the lock and drains and shuts it down when it loses the lock or stops. Pool workers are created by
the host's process, so if that process dies its workers die with it (Ray's owner fate-sharing) and
the next leader starts a fresh pool; the jobs they held return to their queues when their leases
lapse (the new controller's requeue_expired), so none is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from typing import Any, Literal

from scheduler.config import ServiceConfig
from scheduler.connection import client_from_url
from scheduler.logs import configure_logging, get_logger
from scheduler.retry import Backoff, describe
from scheduler.service.autoscaling import AutoscaleRequester
from scheduler.service.controller_loop import ControllerLoop, Pool
from scheduler.service.health import PUBLISH_EVERY_S, RECORD_TTL_S, Progress, RoleHealth
from scheduler.service.leader import LeaderLock
from scheduler.service.policies import (
    LoadedPolicies,
    configured_allocator,
    configured_router,
    configured_shadow,
    load_policies,
)
from scheduler.service.router_loop import RouterLoop
from scheduler.store import Store

Role = Literal["router", "controller"]
ROLES: tuple[Role, ...] = ("router", "controller")

# Default leader TTL: a standby takes over within about this long after a leader dies.
DEFAULT_LEADER_TTL_S = 10.0

log = get_logger("bilevel.service")

PoolFactory = Callable[[ServiceConfig, str], Pool]


def _worker_pool(config: ServiceConfig, name_prefix: str) -> Pool:
    from workers.pool import WorkerPool  # imports Ray; only the controller's process needs it

    pool: Pool = WorkerPool(config, name_prefix=name_prefix)
    return pool


class RoleHost:
    """Runs one role of the service under its leader lock until `stop()`.

    `redis_url` overrides the config's store URL (an embedded server's, say). `pool_factory` builds
    the controller's pool for each term as leader (workers.pool.WorkerPool by default). `policies`
    are the config's learned policies, loaded by the starting process (see service.policies); by
    default they are loaded here.

    Beside the lock keeper and the role's loop it runs two small tasks: one publishes the role's
    health record (scheduler.service.health) every few seconds, the other is the watchdog, which
    restarts the loop or the lock keeper when it stalls (alive, not failing, not progressing),
    with fresh Redis connections, and logs why.
    """

    def __init__(
        self,
        config: ServiceConfig,
        role: Role,
        *,
        redis_url: str,
        name: str,
        leader_ttl_s: float = DEFAULT_LEADER_TTL_S,
        pool_factory: PoolFactory | None = None,
        policies: LoadedPolicies | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        self.config = config
        self.role: Role = role
        self.redis_url = redis_url
        self.name = name
        self.leader_ttl_s = leader_ttl_s
        self.pool_factory: PoolFactory = pool_factory or _worker_pool
        self.policies = policies if policies is not None else load_policies(config)
        self.clock = clock
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._store: Store | None = None
        self._lock: LeaderLock | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._loop: asyncio.Task[None] | None = None
        self._router: RouterLoop | None = None
        self._controller: ControllerLoop | None = None
        self._controller_task: asyncio.Task[None] | None = None
        # The controller host's own progress while it has no term (standing by).
        self._standby = Progress(clock=clock)
        self._terms = 0
        self.restarts = 0
        # Set whenever leadership changes, so the controller's supervisor reacts at once.
        self._leadership_changed = asyncio.Event()
        self._publish_now = asyncio.Event()

    @property
    def stall_after_s(self) -> float:
        """How long the role's loop may go without a step: a controller ticks every tick_s, so
        at least five ticks' time."""
        return max(self.config.health.stall_after_s, 5 * self.config.allocation.tick_s)

    @property
    def election_stall_after_s(self) -> float:
        """The lock keeper steps once per renew interval, a third of the lock's TTL: three missed
        steps are the TTL."""
        return max(self.config.health.stall_after_s, self.leader_ttl_s)

    async def start(self) -> None:
        """Connect to Redis and start campaigning and the role's loop (returns at once)."""
        if self._tasks:
            return
        configure_logging(self.config.store.log_format, self.config.store.log_level)
        self._store = Store(client_from_url(self.redis_url), self.config.store)
        self._lock = LeaderLock(
            self._store.redis, self._store.keys, self.role, ttl_s=self.leader_ttl_s
        )
        if self.role == "router":
            self._router = RouterLoop(
                self._store,
                self.config,
                router=configured_router(self.config, self.policies),
                leader=self._lock,
            )
        self._keeper = asyncio.create_task(self._lock.keep(self._stop, self._on_change))
        self._loop = asyncio.create_task(self._run_loop())
        self._tasks += [self._keeper, self._loop, asyncio.create_task(self._publish_health())]
        if self.config.health.watchdog:
            self._tasks.append(asyncio.create_task(self._watchdog()))
        log.info("role_started", role=self.role, name=self.name, token=self._lock.token[:8])

    def _run_loop(self) -> Coroutine[Any, Any, None]:
        if self._router is not None:
            return self._router.run(self._stop)
        return self._supervise_controller()

    def _on_change(self, held: bool) -> None:
        log.info("leadership_changed", role=self.role, name=self.name, leading=held)
        self._leadership_changed.set()
        # A reader (status, a second serve) must learn of the change now, not at the next beat.
        self._publish_now.set()

    async def _supervise_controller(self) -> None:
        """One term per leadership: a fresh pool and loop while the lock is held. A term that
        fails is logged and the next one starts after a pause; the supervisor never ends early."""
        assert self._lock is not None
        lock = self._lock
        failures = 0
        while not self._stop.is_set():
            if not lock.held:
                self._standby.mark()
                self._leadership_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._leadership_changed.wait(), lock.renew_interval_s)
                continue
            try:
                await self._term()
                failures = 0
            except Exception:
                failures += 1
                log.exception("controller_term_failed", name=self.name, term=self._terms)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), Backoff().delay_s(failures))

    async def _term(self) -> None:
        """Lead with a fresh pool until the lock is lost or the host stops. A loop the watchdog
        cancelled is replaced by a fresh one over the same pool (its workers keep their models)."""
        assert self._store is not None
        assert self._lock is not None
        self._terms += 1
        prefix = f"bilevel:{self.config.store.namespace}:w{self._terms}:{self._lock.token[:6]}:"
        pool = self.pool_factory(self.config, prefix)
        term_stop = asyncio.Event()
        watcher = asyncio.create_task(self._end_term_when_lost(term_stop))
        try:
            while not term_stop.is_set():
                self._controller = ControllerLoop(
                    self._store,
                    self.config,
                    pool,
                    allocator=configured_allocator(self.config, self.policies),
                    shadow=configured_shadow(self.config, self.policies),
                    leader=self._lock,
                    autoscaler=AutoscaleRequester.from_config(self.config),
                )
                self._controller_task = asyncio.create_task(self._controller.run(term_stop))
                await asyncio.wait({self._controller_task})
                if not self._controller_task.cancelled():
                    self._controller_task.result()
                    break
        finally:
            watcher.cancel()
            self._controller_task = None
            log.info("controller_term_ended", name=self.name, term=self._terms)
            await pool.shutdown()

    async def _end_term_when_lost(self, term_stop: asyncio.Event) -> None:
        """End the term once another process holds the lock, or once ours has lapsed for longer
        than TERM_GRACE_TTLS lock TTLs without coming back. A claim that lapsed only because Redis
        was away (a restart shorter than that) is taken up again by the keeper, and the term and
        its pool, models loaded, go on: nobody else led meanwhile."""
        assert self._lock is not None
        lock = self._lock
        lost_since: float | None = None
        while not self._stop.is_set():
            if lock.held:
                lost_since = None
            else:
                now = time.monotonic()
                lost_since = lost_since if lost_since is not None else now
                if now - lost_since > TERM_GRACE_TTLS * lock.ttl_s or await self._taken(lock):
                    break
            self._leadership_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._leadership_changed.wait(), lock.renew_interval_s)
        term_stop.set()

    @staticmethod
    async def _taken(lock: LeaderLock) -> bool:
        """Whether another process holds the lock now (False when Redis cannot say)."""
        try:
            holder = await lock.holder()
        except Exception:
            return False
        return holder is not None and holder != lock.token

    # -- health -----------------------------------------------------------------------------

    def _loop_progress(self) -> Progress:
        if self._router is not None:
            return self._router.progress
        if self._controller_task is not None and self._controller is not None:
            return self._controller.progress
        return self._standby

    def _health_key(self) -> str:
        # Two services started on separate Ray clusters may share a host name: the lock token
        # keeps their records apart.
        assert self._store is not None
        assert self._lock is not None
        return self._store.keys.health(self.role, f"{self.name}#{self._lock.token[:8]}")

    def health(self) -> RoleHealth:
        """This host's health record now."""
        assert self._lock is not None
        loop = self._loop_progress()
        election = self._lock.progress
        # The worse of the two parts is what a reader must see.
        erring = max((loop, election), key=lambda p: (p.failures, p.last_error_s or 0.0))
        figures: dict[str, float] = {}
        if self._router is not None:
            figures = {
                "routed_total": self._router.routed_total,
                "rejected_total": self._router.rejected_total,
                "lag_jobs": self._router.lag_jobs,
                "lag_s": self._router.lag_s,
            }
        elif self._controller is not None:
            figures = {
                "ticks_total": self._controller.ticks,
                "last_tick_s": self._controller.last_tick_s,
                "terms_total": self._terms,
            }
        return RoleHealth(
            role=self.role,
            name=self.name,
            process=_PROCESS,
            leading=self._lock.held,
            published_s=self.clock(),
            last_progress_s=loop.last_progress_s,
            election_progress_s=election.last_progress_s,
            stall_after_s=self.stall_after_s,
            election_stall_after_s=self.election_stall_after_s,
            steps=loop.steps,
            failures=erring.failures,
            failures_total=loop.failures_total + election.failures_total,
            last_error=erring.last_error,
            last_error_s=erring.last_error_s,
            restarts=self.restarts,
            figures=figures,
        )

    async def _publish_health(self) -> None:
        """Write the health record every PUBLISH_EVERY_S (best effort: while Redis is away the
        record ages, which is what a reader should see)."""
        assert self._store is not None
        keys = self._store.keys
        key = self._health_key()
        while not self._stop.is_set():
            self._publish_now.clear()
            try:
                pipe = self._store.redis.pipeline(transaction=False)
                pipe.set(key, self.health().to_json(), px=round(RECORD_TTL_S * 1000))
                pipe.sadd(keys.health_index, key)
                await pipe.execute()
            except Exception as exc:
                log.debug("health_publish_failed", role=self.role, error=describe(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._publish_now.wait(), PUBLISH_EVERY_S)

    async def _watchdog(self) -> None:
        """Restart the loop or the lock keeper when it stalls, and log why."""
        assert self._lock is not None
        check_s = min(2.0, self.stall_after_s / 4)
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), check_s)
            if self._stop.is_set():
                return
            if self._lock.progress.stalled(self.election_stall_after_s):
                await self._restart("lock keeper", self._lock.progress)
            elif self._loop_progress().stalled(self.stall_after_s):
                await self._restart("loop", self._loop_progress())

    async def _restart(self, part: str, progress: Progress) -> None:
        assert self._store is not None
        assert self._lock is not None
        log.error(
            "role_stalled",
            role=self.role,
            name=self.name,
            part=part,
            no_progress_for_s=round(self.clock() - progress.last_progress_s, 1),
            last_error=progress.last_error,
            action="restarting it with fresh Redis connections",
        )
        self.restarts += 1
        if part == "lock keeper":
            old = self._keeper
        elif self._router is not None:
            old = self._loop
        else:
            # The controller's term (and its pool) stays; only its loop is replaced.
            old = self._controller_task
        if old is not None:
            old.cancel()
        # Whatever was stuck may be stuck on a connection: drop them all (which also ends a
        # command the cancelled task still waits on); the pool reconnects on the next command.
        with contextlib.suppress(Exception):
            await self._store.redis.connection_pool.disconnect()
        if old is not None:
            await asyncio.wait({old}, timeout=_CANCEL_WAIT_S)
        progress.restarted()
        if part == "lock keeper":
            self._keeper = asyncio.create_task(self._lock.keep(self._stop, self._on_change))
            self._tasks.append(self._keeper)
        elif self._router is not None:
            self._loop = asyncio.create_task(self._run_loop())
            self._tasks.append(self._loop)

    async def stop(self) -> None:
        """Stop the loop, drain and shut down the pool (controller), release the lock."""
        self._stop.set()
        self._publish_now.set()
        if self.role == "router" and self._store is not None:
            # The router may be blocked on the ingress signal: a token wakes it now.
            with contextlib.suppress(Exception):
                await self._store.redis.rpush(self._store.keys.ingress_signal, "stop")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self._store.redis.delete(self._health_key())
            await self._store.redis.aclose()
            self._store = None
        log.info("role_stopped", role=self.role, name=self.name)

    async def status(self) -> dict[str, Any]:
        """A small JSON-able summary: role, name, whether it leads, its health state and record,
        and its loop's counters."""
        out: dict[str, Any] = {
            "role": self.role,
            "name": self.name,
            "running": bool(self._tasks),
            "leading": self._lock is not None and self._lock.held,
        }
        if self._lock is not None:
            record = self.health()
            out["state"] = record.state(self.clock())
            out["health"] = asdict(record)
        if self._router is not None:
            out["routed"] = self._router.routed_total
            out["rejected"] = self._router.rejected_total
        if self._controller is not None:
            out["ticks"] = self._controller.ticks
            out["last_tick_s"] = self._controller.last_tick_s
            out["terms"] = self._terms
            last = self._controller.last
            out["target"] = None if last is None else dict(last.target)
        return out

    async def pool_view(self) -> dict[str, Any] | None:
        """The current term's last pool view as plain dicts (None when not leading)."""
        if self._controller is None or self._controller.last is None or not self.status_leading:
            return None
        view = self._controller.last.pool
        return {
            "unassigned": view.unassigned,
            "replaced": view.replaced,
            "queues": {
                name: {
                    "ready": q.ready,
                    "busy": q.busy,
                    "loading": q.loading,
                    "draining": q.draining,
                    "model_load_s": q.model_load_s,
                    "service_time_s": q.service_time_s,
                }
                for name, q in view.queues.items()
            },
        }

    @property
    def status_leading(self) -> bool:
        return self._lock is not None and self._lock.held

    def ping(self) -> str:
        return self.name


# A controller whose claim lapsed keeps its term (and its pool) this many lock TTLs while nobody
# else holds the lock: long enough to ride out a Redis restart, short enough that a partitioned
# controller's workers do not serve long beside the new leader's.
TERM_GRACE_TTLS = 3.0

# Where this host runs, for an operator looking for it.
_PROCESS = f"{socket.gethostname()}:{os.getpid()}"

# How long a restart waits for the stalled task to end after cancelling it (a task stuck in a
# command may not end at once; the dropped connections end it).
_CANCEL_WAIT_S = 5.0


class ControlPlane:
    """The router and controller hosts of one namespace in one process (see the module notes).
    `name` is the actor's name; each host is named after it and its role."""

    def __init__(
        self,
        config: ServiceConfig,
        *,
        redis_url: str,
        name: str,
        leader_ttl_s: float = DEFAULT_LEADER_TTL_S,
        pool_factory: PoolFactory | None = None,
        policies: LoadedPolicies | None = None,
    ) -> None:
        self.name = name
        loaded = policies if policies is not None else load_policies(config)
        self.hosts: dict[Role, RoleHost] = {
            role: RoleHost(
                config,
                role,
                redis_url=redis_url,
                name=f"{name}/{role}",
                leader_ttl_s=leader_ttl_s,
                pool_factory=pool_factory,
                policies=loaded,
            )
            for role in ROLES
        }

    async def start(self) -> None:
        for host in self.hosts.values():
            await host.start()

    async def stop(self) -> None:
        """Router first: no new jobs reach the queues while the controller drains its pool."""
        for role in ROLES:
            await self.hosts[role].stop()

    async def status(self) -> dict[Role, dict[str, Any]]:
        return {role: await host.status() for role, host in self.hosts.items()}

    async def pool_view(self) -> dict[str, Any] | None:
        return await self.hosts["controller"].pool_view()

    def ping(self) -> str:
        return self.name


def control_plane_actor_class() -> Any:
    """ControlPlane as a Ray actor class. It reserves no CPU: the control plane is mostly waiting,
    and the CPUs are for the model workers. Ray is imported here so importing this module is
    cheap."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ControlPlane)


__all__ = [
    "DEFAULT_LEADER_TTL_S",
    "ROLES",
    "ControlPlane",
    "Role",
    "RoleHost",
    "control_plane_actor_class",
]
