"""Ask the Ray autoscaler for nodes when the target allocation needs more than the cluster has.

Level 2 decides how many workers each queue gets; the pool then creates actors, and actors that do
not fit stay pending until the cluster grows. Ray's autoscaler grows it for pending actors too, but
at its `upscaling_speed` and only once they exist; `ray.autoscaler.sdk.request_resources` says what
the service needs up front (and bypasses that pacing). `AutoscaleRequester` turns a target
allocation into such a request:

    requester = AutoscaleRequester.from_config(config)           # shapes from the handlers
    decision = requester.update(target, held=workers_held(pool_view))   # every controller tick
    requester.withdraw()                                         # when the controller stops

A request is made when the target's total need (one bundle per worker, shaped like the queue's
workers) exceeds what the cluster has for it: the resources free now plus those the pool's
current workers hold (they move or go away as the target is applied). It is withdrawn once the
target fits again, which is how the autoscaler learns that the load fell: without a standing
request, idle nodes are removed after `idle_timeout_minutes`. Ray keeps a request until it is
replaced, so `request` is called only when the bundles change.

Approximation, on purpose: the comparison is of cluster-wide totals per resource, not a
node-by-node packing (Ray's autoscaler does the packing when it sizes the request). Ray sizes a
request against the cluster's total capacity, so the request is the whole target, not just the
missing part. Without an autoscaler (a local Ray, a fixed cluster) the call is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scheduler.logs import get_logger

if TYPE_CHECKING:
    from scheduler.config import ServiceConfig
    from workers.pool_view import PoolView
    from workers.registry import HandlerRegistry

log = get_logger("bilevel.autoscaling")

# A Ray resource bundle: {"CPU": 0.5, "GPU": 0.25, "memory": bytes}.
Bundle = dict[str, float]

MIB = 1024 * 1024
# Resource amounts are floats (fractional CPUs and GPUs); sums of them are compared with this slack
# so 10 x 0.1 CPU fits in 1 CPU.
_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class WorkerShape:
    """What one worker of a queue reserves in Ray (workers.registry.Resources, resolved)."""

    num_cpus: float
    num_gpus: float = 0.0
    memory_mb: int | None = None

    def bundle(self) -> Bundle:
        """The Ray bundle of one worker; zero amounts are left out (Ray rejects empty needs)."""
        out: Bundle = {}
        if self.num_cpus > 0:
            out["CPU"] = float(self.num_cpus)
        if self.num_gpus > 0:
            out["GPU"] = float(self.num_gpus)
        if self.memory_mb is not None:
            out["memory"] = float(self.memory_mb * MIB)
        return out


@dataclass(frozen=True, slots=True)
class AutoscaleDecision:
    """What one `update` saw and decided."""

    # The standing request after this update; empty when none stands.
    bundles: tuple[Bundle, ...]
    # Per resource, how much more the target needs than the cluster has for it (missing = 0).
    shortfall: dict[str, float] = field(default_factory=dict)
    # True when `request` was called (a new request, or a withdrawal).
    changed: bool = False

    @property
    def requesting(self) -> bool:
        return bool(self.bundles)


def ray_request(bundles: Sequence[Bundle]) -> None:
    """Ray's autoscaler request; an empty list withdraws the standing one."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[dict(b) for b in bundles])


def ray_available() -> dict[str, float]:
    """Resources free in the connected Ray cluster right now."""
    import ray

    free = ray.available_resources()  # type: ignore[no-untyped-call]
    return {str(k): float(v) for k, v in free.items()}


def workers_held(view: PoolView) -> dict[str, int]:
    """Workers per queue that hold Ray resources now: ready (busy included), loading, draining."""
    return {q: v.ready + v.loading + v.draining for q, v in view.queues.items()}


def _totals(counts: Mapping[str, int], shapes: Mapping[str, WorkerShape]) -> dict[str, float]:
    out: dict[str, float] = {}
    for queue, n in counts.items():
        if n <= 0 or queue not in shapes:
            continue
        for key, amount in shapes[queue].bundle().items():
            out[key] = out.get(key, 0.0) + amount * n
    return out


class AutoscaleRequester:
    """Keeps one autoscaler request in step with the target allocation (see the module doc).

    Where the controller calls it: in `ControllerLoop.tick()`, right after the guardrails decide
    `target` (and with the tick's pool view), `requester.update(target,
    held=workers_held(pool_view))`; and `requester.withdraw()` when the loop stops or loses the
    leader lock, so a dead controller's request does not keep nodes up. `update` makes one
    `available()` call (a GCS round trip) and at most one `request` call; from async code run it
    with `asyncio.to_thread`. It never raises for a failing Ray call (it logs and retries on the
    next update): scaling is a hint, and level 2 must keep ticking without it.

    `request(bundles)` and `available()` default to Ray's (`ray_request`, `ray_available`);
    tests inject their own.
    """

    def __init__(
        self,
        shapes: Mapping[str, WorkerShape],
        *,
        request: Callable[[Sequence[Bundle]], None] = ray_request,
        available: Callable[[], Mapping[str, float]] = ray_available,
    ) -> None:
        self.shapes = dict(shapes)
        self._request = request
        self._available = available
        # The request Ray holds for us (as last sent); () when none.
        self.standing: tuple[Bundle, ...] = ()
        self.last: AutoscaleDecision | None = None

    @classmethod
    def from_config(
        cls,
        config: ServiceConfig,
        registry: HandlerRegistry | None = None,
        *,
        request: Callable[[Sequence[Bundle]], None] = ray_request,
        available: Callable[[], Mapping[str, float]] = ray_available,
    ) -> AutoscaleRequester:
        """Shapes per queue as the WorkerPool computes them: the handlers' Resources, with
        `worker.num_cpus` where a handler names no CPU need. Imports the handler modules."""
        from workers.registry import REGISTRY, load_handler_modules

        reg = load_handler_modules(config.handlers, registry if registry is not None else REGISTRY)
        shapes = {}
        for q in config.queues:
            r = reg.resources_for(q.job_types, config.worker.num_cpus)
            shapes[q.name] = WorkerShape(
                num_cpus=r.num_cpus if r.num_cpus is not None else config.worker.num_cpus,
                num_gpus=r.gpu_fraction,
                memory_mb=r.memory_mb,
            )
        return cls(shapes, request=request, available=available)

    def bundles_for(self, target: Mapping[str, int]) -> tuple[Bundle, ...]:
        """One bundle per target worker, in queue order (stable, so equal targets compare equal)."""
        out: list[Bundle] = []
        for queue in sorted(target):
            if queue in self.shapes:
                bundle = self.shapes[queue].bundle()
                if bundle:
                    out.extend(dict(bundle) for _ in range(max(0, target[queue])))
        return tuple(out)

    def shortfall(self, target: Mapping[str, int], held: Mapping[str, int]) -> dict[str, float]:
        """Per resource, how much the target needs beyond free + held-by-the-pool (> 0 only)."""
        need = _totals(target, self.shapes)
        have = dict(self._available())
        for key, amount in _totals(held, self.shapes).items():
            have[key] = have.get(key, 0.0) + amount
        return {
            key: round(amount - have.get(key, 0.0), 6)
            for key, amount in need.items()
            if amount > have.get(key, 0.0) + _EPS
        }

    def update(self, target: Mapping[str, int], held: Mapping[str, int]) -> AutoscaleDecision:
        """Request the target's bundles while it is short of resources; withdraw when it is not.

        `target`: workers per queue (the allocation); `held`: workers per queue the pool has now
        (see `workers_held`).
        """
        try:
            missing = self.shortfall(target, held)
        except Exception:
            log.warning("autoscale_available_failed", exc_info=True)
            return self._keep()
        wanted = self.bundles_for(target) if missing else ()
        changed = False
        if wanted != self.standing:
            try:
                self._request(list(wanted))
            except Exception:
                log.warning("autoscale_request_failed", bundles=len(wanted), exc_info=True)
                return self._keep(missing)
            changed = True
            self.standing = wanted
            if wanted:
                log.info(
                    "autoscale_request",
                    bundles=len(wanted),
                    shortfall=missing,
                    target=dict(target),
                )
            else:
                log.info("autoscale_withdrawn", target=dict(target))
        self.last = AutoscaleDecision(self.standing, missing, changed)
        return self.last

    def withdraw(self) -> bool:
        """Drop the standing request (when the controller stops). True if one was dropped."""
        if not self.standing:
            return False
        try:
            self._request([])
        except Exception:
            log.warning("autoscale_withdraw_failed", exc_info=True)
            return False
        self.standing = ()
        self.last = AutoscaleDecision((), {}, True)
        log.info("autoscale_withdrawn", reason="stopped")
        return True

    def _keep(self, missing: dict[str, float] | None = None) -> AutoscaleDecision:
        self.last = AutoscaleDecision(self.standing, missing or {}, False)
        return self.last


__all__ = [
    "AutoscaleDecision",
    "AutoscaleRequester",
    "Bundle",
    "WorkerShape",
    "ray_available",
    "ray_request",
    "workers_held",
]
