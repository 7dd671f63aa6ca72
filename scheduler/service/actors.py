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
from collections.abc import Callable
from typing import Any, Literal

from scheduler.config import ServiceConfig
from scheduler.connection import client_from_url
from scheduler.logs import configure_logging, get_logger
from scheduler.service.autoscaling import AutoscaleRequester
from scheduler.service.controller_loop import ControllerLoop, Pool
from scheduler.service.leader import LeaderLock
from scheduler.service.policies import (
    LoadedPolicies,
    configured_allocator,
    configured_router,
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
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._store: Store | None = None
        self._lock: LeaderLock | None = None
        self._router: RouterLoop | None = None
        self._controller: ControllerLoop | None = None
        self._terms = 0
        # Set whenever leadership changes, so the controller's supervisor reacts at once.
        self._leadership_changed = asyncio.Event()

    async def start(self) -> None:
        """Connect to Redis and start campaigning and the role's loop (returns at once)."""
        if self._tasks:
            return
        configure_logging(self.config.store.log_format, self.config.store.log_level)
        self._store = Store(client_from_url(self.redis_url), self.config.store)
        self._lock = LeaderLock(
            self._store.redis, self._store.keys, self.role, ttl_s=self.leader_ttl_s
        )
        self._tasks.append(asyncio.create_task(self._lock.keep(self._stop, self._on_change)))
        if self.role == "router":
            self._router = RouterLoop(
                self._store,
                self.config,
                router=configured_router(self.config, self.policies),
                leader=self._lock,
            )
            self._tasks.append(asyncio.create_task(self._router.run(self._stop)))
        else:
            self._tasks.append(asyncio.create_task(self._supervise_controller()))
        log.info("role_started", role=self.role, name=self.name, token=self._lock.token[:8])

    def _on_change(self, held: bool) -> None:
        log.info("leadership_changed", role=self.role, name=self.name, leading=held)
        self._leadership_changed.set()

    async def _supervise_controller(self) -> None:
        """One term per leadership: a fresh pool and loop while the lock is held."""
        assert self._store is not None
        assert self._lock is not None
        lock = self._lock
        while not self._stop.is_set():
            if not lock.held:
                self._leadership_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._leadership_changed.wait(), lock.renew_interval_s)
                continue
            self._terms += 1
            prefix = f"bilevel:{self.config.store.namespace}:w{self._terms}:{lock.token[:6]}:"
            pool = self.pool_factory(self.config, prefix)
            term_stop = asyncio.Event()
            self._controller = ControllerLoop(
                self._store,
                self.config,
                pool,
                allocator=configured_allocator(self.config, self.policies),
                leader=lock,
                autoscaler=AutoscaleRequester.from_config(self.config),
            )
            watcher = asyncio.create_task(self._end_term_when_lost(term_stop))
            try:
                await self._controller.run(term_stop)
            finally:
                watcher.cancel()
                log.info("controller_term_ended", name=self.name, term=self._terms)
                await pool.shutdown()

    async def _end_term_when_lost(self, term_stop: asyncio.Event) -> None:
        assert self._lock is not None
        while not self._stop.is_set() and self._lock.held:
            self._leadership_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._leadership_changed.wait(), self._lock.renew_interval_s)
        term_stop.set()

    async def stop(self) -> None:
        """Stop the loop, drain and shut down the pool (controller), release the lock."""
        self._stop.set()
        if self.role == "router" and self._store is not None:
            # The router may be blocked on the ingress signal: a token wakes it now.
            await self._store.redis.rpush(self._store.keys.ingress_signal, "stop")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._store is not None:
            await self._store.redis.aclose()
            self._store = None
        log.info("role_stopped", role=self.role, name=self.name)

    async def status(self) -> dict[str, Any]:
        """A small JSON-able summary: role, name, whether it leads, and its loop's counters."""
        out: dict[str, Any] = {
            "role": self.role,
            "name": self.name,
            "running": bool(self._tasks),
            "leading": self._lock is not None and self._lock.held,
        }
        if self._router is not None:
            out["routed"] = self._router.routed_total
            out["rejected"] = self._router.rejected_total
        if self._controller is not None:
            out["ticks"] = self._controller.ticks
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
