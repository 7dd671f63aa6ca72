"""One way to run an episode: a prepared run's arrivals, a router, and an allocator inside the
scenario's guardrails, watched by recorders.

`bilevel simulate`, evaluation and tuning (`policies.evaluation.run_policy`) and the training
rollouts (`policies.learned.rollout.run_rollout`) all run their episodes here, so the guardrails
wrap an allocator in exactly one place and every caller's episode is the same loop:

    at each tick: every recorder's `tick`, the guarded allocator's decision (or `act`'s
    replacement of it), the move, every recorder's `decided`; at the end every recorder's `end`.

Recorders only watch (a progress bar, the training rollout's per-tick transitions); the run's
own outcome is the `RunRecord` every episode returns in its `Episode`. Pure: nothing here does I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from policies.guardrails import Guardrails, guardrails_for
from policies.sim.metrics import RunRecord
from policies.sim.run import SimRun
from policies.sim.scenario import PreparedRun, make_router_for
from policies.views import Allocation, Allocator, ClusterView, Router


class Recorder(Protocol):
    """Watches an episode; every method is called in the episode's order (module docstring)."""

    def tick(self, run: SimRun, view: ClusterView) -> None:
        """At a tick, before the allocator decides."""

    def decided(self, run: SimRun, view: ClusterView, allocation: Allocation, moved: int) -> None:
        """After the tick's allocation was applied, moving `moved` workers."""

    def end(self, run: SimRun, record: RunRecord) -> None:
        """Once, with the final record."""


class BaseRecorder:
    """A recorder that ignores everything: subclass it and override what you need."""

    def tick(self, run: SimRun, view: ClusterView) -> None:
        return None

    def decided(self, run: SimRun, view: ClusterView, allocation: Allocation, moved: int) -> None:
        return None

    def end(self, run: SimRun, record: RunRecord) -> None:
        return None


class ProgressReport(BaseRecorder):
    """Calls `report(sim time)` after every tick's move (for a progress bar)."""

    def __init__(self, report: Callable[[float], None]) -> None:
        self.report = report

    def decided(self, run: SimRun, view: ClusterView, allocation: Allocation, moved: int) -> None:
        self.report(view.now_s)


@dataclass(frozen=True, eq=False)
class Episode:
    """What an episode produced: its record, and how often the guardrails fell back."""

    record: RunRecord
    # Ticks on which the guarded allocator's proposal was replaced by the fallback's.
    fallbacks: int
    guardrails: Guardrails


# Replaces the guarded allocation of a tick (e.g. a teacher acting in place of the policy).
Act = Callable[[ClusterView, Allocation], Allocation]


def run_episode(
    prepared: PreparedRun,
    allocator: Allocator,
    router: Router | None = None,
    *,
    recorders: Sequence[Recorder] = (),
    act: Act | None = None,
) -> Episode:
    """Runs `prepared` to its end with `allocator` inside the scenario's guardrails (built here,
    the only place an episode's allocator is wrapped) and `router` (default: the scenario's).
    `act`, when given, replaces each tick's guarded allocation before it is applied; the guarded
    allocator still decides (and records) first. The record's wall time runs from the start."""
    guarded = guardrails_for(prepared.scenario, allocator)
    started_s = time.perf_counter()
    run = prepared.start(router if router is not None else make_router_for(prepared.scenario))
    while (view := run.advance_to_next_tick()) is not None:
        for recorder in recorders:
            recorder.tick(run, view)
        allocation = guarded.allocate(view)
        if act is not None:
            allocation = act(view, allocation)
        moved = run.apply(allocation)
        for recorder in recorders:
            recorder.decided(run, view, allocation, moved)
    record = run.record(wall_s=time.perf_counter() - started_s)
    for recorder in recorders:
        recorder.end(run, record)
    return Episode(record=record, fallbacks=guarded.fallback_count, guardrails=guarded)
