"""Rollout executors for `policies.learned.ppo.train`: Ray tasks in production, serial for tests.

Training in `policies/` never starts processes; it takes a `map_rollouts` function. Here that
function submits each rollout as a Ray task, so the same `bilevel train` runs on one laptop (a local
Ray) or a `ray up` cluster (`ray.init(address="auto")`) without change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from policies.learned.rollout import (
    MapRollouts,
    RolloutResult,
    RolloutTask,
    map_serial,
    run_rollout,
)

__all__ = ["RayRollouts", "map_serial"]


def _rollout_in_worker(task: RolloutTask) -> RolloutResult:
    """Runs one rollout single-threaded: rollouts are many and small, so parallelism comes from
    running several at once, and torch's intra-op threads would only fight over the cores."""
    import torch

    torch.set_num_threads(1)
    return run_rollout(task)


class RayRollouts:
    """A `MapRollouts` that runs each rollout as a Ray task and gathers the results in order.

    Uses the Ray the caller connected to (`ray.init` before constructing). The policy weights in a
    batch are put into the object store once per distinct policy rather than once per task.
    """

    def __init__(self, *, num_cpus_per_task: float = 1.0) -> None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("RayRollouts needs ray.init() first")
        self._ray: Any = ray
        self._remote: Any = ray.remote(num_cpus=num_cpus_per_task)(_rollout_in_worker)

    def __call__(self, tasks: Sequence[RolloutTask]) -> list[RolloutResult]:
        refs = [self._remote.remote(task) for task in tasks]
        results: list[RolloutResult] = self._ray.get(refs)
        return results


def serial_rollouts() -> MapRollouts:
    """The in-process executor (tests, debugging, machines without Ray)."""
    return map_serial
