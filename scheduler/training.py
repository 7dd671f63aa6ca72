"""Rollout executors for `policies.learned.ppo.train`: Ray tasks in production, serial for tests.

Training in `policies/` never starts processes; it takes a `map_rollouts` function. Here that
function submits each rollout as a Ray task, so the same `bilevel train` runs on one laptop (a local
Ray) or a `ray up` cluster (`ray.init(address="auto")`) without change. Given a `should_stop`
(`scheduler.stopping.StopSignals.requested`), both executors raise `TrainingStopped` between
rollouts and while they wait, which is how Ctrl-C reaches the training loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from policies.evaluation import TraceInput
from policies.learned.ppo import TrainingStopped
from policies.learned.rollout import (
    MapRollouts,
    RolloutResult,
    RolloutTask,
    map_serial,
    run_rollout,
)

__all__ = ["RayRollouts", "map_serial", "serial_rollouts"]

# How often a wait for Ray results looks at the stop flag: well under a person's patience, and
# cheap (one `ray.wait` call).
STOP_POLL_S = 0.2


def _rollout_in_worker(task: RolloutTask, trace: TraceInput | None = None) -> RolloutResult:
    """Runs one rollout single-threaded: rollouts are many and small, so parallelism comes from
    running several at once, and torch's intra-op threads would only fight over the cores.
    `trace` arrives separately from the task (see RayRollouts)."""
    import torch

    torch.set_num_threads(1)
    if trace is not None:
        task = dataclasses.replace(task, trace=trace)
    return run_rollout(task)


class RayRollouts:
    """A `MapRollouts` that runs each rollout as a Ray task and gathers the results in order.

    Uses the Ray the caller connected to (`ray.init` before constructing). A task's trace (tens of
    megabytes for a real one) goes into the object store once per distinct trace, and every task
    replaying it gets a reference, not a copy.
    """

    def __init__(
        self,
        *,
        num_cpus_per_task: float = 1.0,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("RayRollouts needs ray.init() first")
        self._ray: Any = ray
        self._should_stop = should_stop
        self._remote: Any = ray.remote(num_cpus=num_cpus_per_task)(_rollout_in_worker)
        # id(trace) -> (the trace, kept alive so its id stays its own; its object reference).
        self._traces: dict[int, tuple[TraceInput, Any]] = {}

    def _trace_ref(self, trace: TraceInput) -> Any:
        if id(trace) not in self._traces:
            self._traces[id(trace)] = (trace, self._ray.put(trace))
        return self._traces[id(trace)][1]

    def _stop_if_asked(self, pending: Sequence[Any]) -> None:
        if self._should_stop is not None and self._should_stop():
            for ref in pending:
                self._ray.cancel(ref)
            raise TrainingStopped()

    def __call__(self, tasks: Sequence[RolloutTask]) -> list[RolloutResult]:
        self._stop_if_asked(())
        refs = []
        for task in tasks:
            if task.trace is None:
                refs.append(self._remote.remote(task))
            else:
                trace_ref = self._trace_ref(task.trace)
                refs.append(self._remote.remote(dataclasses.replace(task, trace=None), trace_ref))
        if self._should_stop is not None:
            # Waits in short slices: a plain ray.get would sit through every rollout after Ctrl-C.
            pending = list(refs)
            while pending:
                self._stop_if_asked(pending)
                _, pending = self._ray.wait(pending, num_returns=len(pending), timeout=STOP_POLL_S)
        results: list[RolloutResult] = self._ray.get(refs)
        return results


def serial_rollouts(should_stop: Callable[[], bool] | None = None) -> MapRollouts:
    """The in-process executor (tests, debugging, machines without Ray); with `should_stop`, it
    raises TrainingStopped before any rollout once a stop is asked for."""
    if should_stop is None:
        return map_serial

    def run(tasks: Sequence[RolloutTask]) -> list[RolloutResult]:
        results = []
        for task in tasks:
            if should_stop():
                raise TrainingStopped()
            results.append(run_rollout(task))
        return results

    return run
