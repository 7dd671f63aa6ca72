"""WorkerPool: the ModelWorker actors of one service, placed on queues as level 2 decides.

The controller calls `apply(target)` with a worker count per queue. The pool moves workers it can
spare to queues that need them (each move costs the new queue's model load), then removes the rest
(drained before they are killed) and only then creates new actors, so the pool never holds more
workers than the target's total. `view()` reports what the controller's policies see; dead actors
are found and replaced on their queue by `replace_dead()`.

Ownership: by default the actors are owned by the process that created the pool (the controller).
If the controller dies they die with it; their leases then expire and their jobs run again on the
next controller's workers, so no job is lost, at the price of reloading every model. With
`detached=True` the actors outlive the controller, and a standby controller takes them over with
`adopt()` (models still loaded); the price is that someone must kill them (`shutdown`) when the
service goes away for good. Both work; owned is the default because a crashed service then leaves
nothing behind on the cluster.

Operations on one actor run in order (each waits for the previous one), and calls to different
actors run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import ray
from ray.exceptions import ActorDiedError, RayActorError

from scheduler.config import ServiceConfig
from scheduler.logs import get_logger
from scheduler.settings import Settings
from workers.actor import ModelWorkerActor
from workers.model_worker import Phase, WorkerState
from workers.pool_view import PoolView, QueuePoolView
from workers.registry import REGISTRY, HandlerRegistry, Resources, load_handler_modules

T = TypeVar("T")

log = get_logger("workers.pool")

MIB = 1024 * 1024
# How old a state replace_dead() read may be for view() to use it instead of asking again: a tick
# reads the store's stats in between (milliseconds); a view called on its own asks.
STATE_REUSE_S = 0.5


@dataclass(frozen=True, slots=True)
class PoolChange:
    """What one `apply` decided (and, with wait=True, did)."""

    created: int = 0
    removed: int = 0
    # (from queue, to queue) per worker moved; from is None for a worker that had no queue.
    moves: tuple[tuple[str | None, str], ...] = ()

    @property
    def moved(self) -> int:
        return len(self.moves)

    @property
    def reconfigurations(self) -> int:
        """Model loads this change costs: every move and every new worker loads a model."""
        return self.moved + self.created


@dataclass(eq=False)
class _Member:
    name: str
    # The queue the pool wants this actor on (it may still be draining or loading towards it).
    queue: str | None
    shape: Resources
    # None until the actor is created (creations wait for removals to finish).
    handle: Any = None
    # The latest operation on the actor; the next one waits for it.
    op: asyncio.Task[None] | None = None
    dead: bool = False
    last_state: WorkerState | None = None
    history: list[str] = field(default_factory=list)


class WorkerPool:
    """Places ModelWorker actors on the queues of one service. Use from one event loop."""

    def __init__(
        self,
        config: ServiceConfig,
        *,
        name_prefix: str,
        registry: HandlerRegistry = REGISTRY,
        settings: Settings | None = None,
        detached: bool = False,
        drain_timeout_s: float = 30.0,
        call_timeout_s: float = 5.0,
    ) -> None:
        self.config = config
        self.name_prefix = name_prefix
        # The actors connect to this store; it must name a reachable Redis (not a private
        # embedded one).
        self.settings = settings or config.store
        self.detached = detached
        self.drain_timeout_s = drain_timeout_s
        self.call_timeout_s = call_timeout_s
        # Resource needs come from the handlers, so this process imports them too.
        self.registry = load_handler_modules(config.handlers, registry)
        self._queues = {q.name: q for q in config.queues}
        self._shapes = {
            q.name: self.registry.resources_for(q.job_types, config.worker.num_cpus)
            for q in config.queues
        }
        self._members: list[_Member] = []
        # Removed from the pool, draining before they are killed.
        self._leaving: list[_Member] = []
        self._counter = itertools.count()
        self._replaced_since_view = 0
        # States replace_dead() read, for the view() that follows it in a tick: by member, when
        # read, the member's operation then, and the state.
        self._asked: dict[_Member, tuple[float, asyncio.Task[None] | None, WorkerState]] = {}
        self._load_s: dict[str, float] = {}
        self._service_s: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()

    # -- placing ----------------------------------------------------------------------------

    async def apply(self, target: Mapping[str, int], *, wait: bool = False) -> PoolChange:
        """Make the pool match `target` (workers per queue; queues left out get none).

        Decides at once and returns what it decided; the moves, removals and creations run in
        the background (visible in `view()` as loading and draining) unless `wait` is True, in
        which case it returns when they are done. Idle workers are moved before busy ones.
        """
        for queue, n in target.items():
            if queue not in self._queues:
                raise KeyError(f"unknown queue {queue!r} (configured: {', '.join(self._queues)})")
            if n < 0:
                raise ValueError(f"target for queue {queue!r} is negative: {n}")
        async with self._lock:
            change, work = self._plan(target)
        task = asyncio.create_task(work())
        self._track(task)
        if wait:
            await task
        return change

    def _plan(
        self, target: Mapping[str, int]
    ) -> tuple[PoolChange, Callable[[], Coroutine[Any, Any, None]]]:
        by_queue: dict[str | None, list[_Member]] = {}
        for m in self._members:
            if not m.dead:
                by_queue.setdefault(m.queue, []).append(m)
        spare: list[_Member] = list(by_queue.get(None, []))
        need: dict[str, int] = {}
        for name in self._queues:
            have = by_queue.get(name, [])
            want = target.get(name, 0)
            if len(have) > want:
                # Give up the least useful first: not yet created, idle, then busy.
                have = sorted(have, key=_busyness)
                spare += have[: len(have) - want]
            elif want > len(have):
                need[name] = want - len(have)
        moves: list[tuple[_Member, str]] = []
        for name in sorted(need, key=lambda q: -need[q]):
            shape = self._shapes[name]
            for m in sorted(spare, key=_busyness):
                if need[name] == 0:
                    break
                if m.handle is not None and _fits(m.shape, shape):
                    spare.remove(m)
                    moves.append((m, name))
                    need[name] -= 1
        removes = spare
        creates = [(name, n) for name, n in need.items() for _ in range(n)]
        change = PoolChange(
            created=len(creates),
            removed=len(removes),
            moves=tuple((m.queue, q) for m, q in moves),
        )
        for m in removes:
            self._members.remove(m)
            self._leaving.append(m)
        for m, q in moves:
            m.queue = q
        new_members = [self._new_member(q) for q, _ in creates]
        self._members += new_members

        async def work() -> None:
            moving = [self._then(m, self._assign_op(m, q)) for m, q in moves]
            await asyncio.gather(*(self._remove(m) for m in removes))
            creating = [self._then(m, self._create_op(m)) for m in new_members]
            await asyncio.gather(*moving, *creating)

        if moves or removes or creates:
            log.info(
                "pool.apply",
                target=dict(target),
                moved=change.moved,
                created=change.created,
                removed=change.removed,
            )
        return change, work

    def _new_member(self, queue: str) -> _Member:
        return _Member(name="", queue=queue, shape=self._shapes[queue])

    def _then(self, m: _Member, op: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run `op` on member `m` after its previous operation; failures are logged, not raised
        (the member is then left without a queue, or marked dead, for the next tick to fix)."""
        previous = m.op

        async def run() -> None:
            if previous is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await previous
            try:
                await op()
            except (RayActorError, ActorDiedError):
                m.dead = True
                log.warning("pool.worker_died", worker=m.name, queue=m.queue)
            except Exception:
                log.exception("pool.worker_op_failed", worker=m.name, queue=m.queue)
                m.queue = None

        task = asyncio.create_task(run())
        m.op = task
        self._track(task)
        return task

    def _assign_op(self, m: _Member, queue: str) -> Callable[[], Awaitable[None]]:
        async def op() -> None:
            job_types = list(self._queues[queue].job_types)
            load_s = await _call(m.handle.assign.remote(queue, job_types))
            m.history.append(queue)
            log.info("pool.assigned", worker=m.name, queue=queue, load_s=round(load_s, 3))

        return op

    def _create_op(self, m: _Member) -> Callable[[], Awaitable[None]]:
        async def op() -> None:
            if m.queue is None:
                return
            self._create_actor(m)
            await self._assign_op(m, m.queue)()

        return op

    def _create_actor(self, m: _Member) -> None:
        options: dict[str, Any] = {
            "num_cpus": m.shape.num_cpus,
            "num_gpus": m.shape.gpu_fraction,
            "max_restarts": 0,
        }
        if m.shape.memory_mb is not None:
            options["memory"] = m.shape.memory_mb * MIB
        if self.detached:
            options["lifetime"] = "detached"
        # A name may still be held by an actor of an earlier pool with this prefix: skip it.
        for _ in range(1000):
            name = f"{self.name_prefix}worker-{next(self._counter)}"
            try:
                m.handle = ModelWorkerActor.options(name=name, **options).remote(
                    name,
                    self.settings,
                    self.config.worker,
                    list(self.config.handlers),
                    self.drain_timeout_s,
                )
            except ValueError as exc:
                if "already" not in str(exc).lower():
                    raise
                continue
            m.name = name
            return
        raise RuntimeError(f"no free actor name with prefix {self.name_prefix!r}")

    async def _remove(self, m: _Member) -> None:
        """Drain (bounded), then kill. Waits for the member's pending operation first, except a
        creation not yet started, which is called off."""
        if m.op is not None and m.handle is None:
            m.op.cancel()
        if m.op is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await m.op
        try:
            if m.handle is not None and not m.dead:
                with contextlib.suppress(RayActorError, TimeoutError):
                    async with asyncio.timeout(self.drain_timeout_s + self.call_timeout_s):
                        await _call(m.handle.stop.remote(self.drain_timeout_s))
        finally:
            self._kill(m)
            await self._await_death(m)

    async def _await_death(self, m: _Member) -> None:
        """ray.kill only asks; wait (bounded) until calls to the actor fail, so that a caller of
        shutdown() finds no actor left."""
        if m.handle is None:
            return
        deadline = asyncio.get_running_loop().time() + self.call_timeout_s
        while asyncio.get_running_loop().time() < deadline:
            try:
                async with asyncio.timeout(self.call_timeout_s):
                    await _call(m.handle.ping.remote())
            except RayActorError:
                return
            except TimeoutError:
                continue
            await asyncio.sleep(0.05)
        log.warning("pool.kill_unconfirmed", worker=m.name)

    def _kill(self, m: _Member) -> None:
        if m.handle is not None:
            with contextlib.suppress(Exception):
                ray.kill(m.handle, no_restart=True)
        if m in self._leaving:
            self._leaving.remove(m)
        if m in self._members:
            self._members.remove(m)

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait until every operation started so far (moves, loads, drains, creations) is done."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- observing --------------------------------------------------------------------------

    async def _state(self, m: _Member) -> WorkerState | None:
        """The member's state; None while it is being created or does not answer in time."""
        if m.handle is None or m.dead:
            return None
        if m.last_state is None and m.op is not None and not m.op.done():
            # Still starting (a new process imports torch): asking would only wait.
            return None
        try:
            async with asyncio.timeout(self.call_timeout_s):
                state = cast(WorkerState, await _call(m.handle.state.remote()))
        except TimeoutError:
            return None
        except RayActorError:
            m.dead = True
            return None
        m.last_state = state
        return state

    async def _state_for_view(self, m: _Member) -> WorkerState | None:
        """The state replace_dead() has just read, when it is fresh and nothing was started on
        the member since; else the member is asked."""
        asked = self._asked.get(m)
        if asked is not None:
            at_s, op, state = asked
            fresh = asyncio.get_running_loop().time() - at_s <= STATE_REUSE_S
            if fresh and op is m.op and not m.dead:
                return state
        return await self._state(m)

    async def view(self) -> PoolView:
        """Per queue: workers ready (busy among them), loading, draining; measured model-load
        seconds and service seconds per job. Asks every actor at once, except those whose state
        replace_dead() read just before (a controller tick calls both: one round of calls to
        the workers per tick, not two)."""
        members = [*self._members, *self._leaving]
        states = await asyncio.gather(*(self._state_for_view(m) for m in members))
        self._asked = {}
        counts = {
            name: {"ready": 0, "busy": 0, "loading": 0, "draining": 0} for name in self._queues
        }
        service: dict[str, list[float]] = {}
        unassigned = 0
        for m, st in zip(members, states, strict=True):
            leaving = m in self._leaving
            if m.dead:
                continue
            if st is None:
                if leaving:
                    continue
                if m.queue is None:
                    unassigned += 1
                else:
                    counts[m.queue]["loading"] += 1
                continue
            q = st.queue
            if st.phase is Phase.DRAINING and q in counts:
                counts[q]["draining"] += 1
            elif leaving:
                continue
            elif st.phase is Phase.LOADING and q in counts:
                counts[q]["loading"] += 1
            elif st.phase in (Phase.READY, Phase.BUSY) and q in counts:
                if q != m.queue and m.queue is not None:
                    # Told to move, not started yet: it is about to drain and load.
                    counts[m.queue]["loading"] += 1
                    continue
                counts[q]["ready"] += 1
                counts[q]["busy"] += st.phase is Phase.BUSY
                if st.load_s > 0:
                    self._load_s[q] = st.load_s
                if st.service_time_s > 0:
                    service.setdefault(q, []).append(st.service_time_s)
            elif m.queue is not None:
                counts[m.queue]["loading"] += 1  # idle, assignment on its way
            else:
                unassigned += 1
        for q, values in service.items():
            self._service_s[q] = sum(values) / len(values)
        replaced, self._replaced_since_view = self._replaced_since_view, 0
        return PoolView(
            queues={
                q: QueuePoolView(
                    queue=q,
                    model_load_s=self._load_s.get(q, 0.0),
                    service_time_s=self._service_s.get(q, 0.0),
                    **c,
                )
                for q, c in counts.items()
            },
            unassigned=unassigned,
            replaced=replaced,
        )

    def handles(self) -> dict[str, Any]:
        """Actor handles by name (created actors only), e.g. for tests and diagnostics."""
        return {m.name: m.handle for m in self._members if m.handle is not None}

    def placement(self) -> dict[str, str | None]:
        """Which queue the pool wants each created actor on, by actor name."""
        return {m.name: m.queue for m in self._members if m.handle is not None}

    # -- failures ---------------------------------------------------------------------------

    async def replace_dead(self) -> int:
        """Find actors that died (or report themselves unhealthy) and put a fresh actor on the
        same queue in place of each. Returns how many were replaced."""
        members = [
            m for m in self._members if m.handle is not None and (m.op is None or m.op.done())
        ]
        states = await asyncio.gather(*(self._state(m) for m in members))
        now_s = asyncio.get_running_loop().time()
        self._asked = {
            m: (now_s, m.op, st) for m, st in zip(members, states, strict=True) if st is not None
        }
        replaced = 0
        async with self._lock:
            for m, st in zip(members, states, strict=True):
                unhealthy = st is not None and not st.healthy
                if not (m.dead or unhealthy) or m not in self._members:
                    continue
                log.warning("pool.replacing", worker=m.name, queue=m.queue, dead=m.dead)
                self._members.remove(m)
                if unhealthy:
                    self._leaving.append(m)
                    self._track(asyncio.create_task(self._remove(m)))
                else:
                    self._kill(m)
                if m.queue is not None:
                    fresh = self._new_member(m.queue)
                    self._members.append(fresh)
                    self._then(fresh, self._create_op(fresh))
                replaced += 1
        self._replaced_since_view += replaced
        return replaced

    async def adopt(self) -> int:
        """Take over live actors named with this pool's prefix (detached ones left by a previous
        controller). Returns how many were adopted."""
        prefix = f"{self.name_prefix}worker-"
        known = {m.name for m in self._members}
        names = [n for n in ray.util.list_named_actors() if n.startswith(prefix) and n not in known]
        adopted = 0
        highest = -1
        for name in names:
            with contextlib.suppress(ValueError):
                highest = max(highest, int(name[len(prefix) :]))
            try:
                handle = ray.get_actor(name)
            except ValueError:
                continue
            m = _Member(name=name, queue=None, shape=Resources(), handle=handle)
            st = await self._state(m)
            if st is None:
                continue
            m.queue = st.queue if st.queue in self._queues else None
            if m.queue is not None:
                m.shape = self._shapes[m.queue]
            self._members.append(m)
            adopted += 1
        self._counter = itertools.count(max(highest + 1, next(self._counter)))
        return adopted

    async def shutdown(self) -> None:
        """Drain and kill every actor this pool created or adopted."""
        async with self._lock:
            members = [*self._members, *self._leaving]
            for task in list(self._background):
                task.cancel()
            await asyncio.gather(*list(self._background), return_exceptions=True)
            self._leaving = []
            self._members = []
            await asyncio.gather(*(self._remove_now(m) for m in members))

    async def _remove_now(self, m: _Member) -> None:
        m.op = None
        await self._remove(m)


def _busyness(m: _Member) -> tuple[int, int]:
    """Sort key: members cheapest to take away first."""
    st = m.last_state
    if m.handle is None:
        return (0, 0)
    if st is None:
        return (1, 0)
    return (2 + (st.phase is Phase.BUSY), st.in_flight)


def _fits(have: Resources, need: Resources) -> bool:
    return (
        (have.num_cpus or 0.0) >= (need.num_cpus or 0.0)
        and have.gpu_fraction >= need.gpu_fraction
        and (need.memory_mb is None or (have.memory_mb or 0) >= need.memory_mb)
    )


async def _call(ref: Any) -> Any:
    """Await a Ray ObjectRef (awaitable in async code) as a plain coroutine."""
    return await ref


__all__ = ["PoolChange", "WorkerPool"]
