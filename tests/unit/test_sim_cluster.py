"""Worker moves: drain without preemption, model loads, and what the views and metrics count."""

from __future__ import annotations

import numpy as np
import pytest

from policies.registry import make_router
from policies.sim.metrics import conservation_gap, littles_law_gap, summarize
from policies.sim.run import Jobs, QueueSpec, SimRun, SimSpec
from policies.sim.workloads import ArrivalTable


def _run(
    arrivals_s: list[float],
    types: list[int],
    service_s: list[float],
    *,
    budget: int = 1,
    initial: tuple[int, int] = (1, 0),
    load_s: float = 5.0,
) -> SimRun:
    n = len(arrivals_s)
    nan = np.full(n, np.nan)
    table = ArrivalTable(
        arrival_s=np.array(arrivals_s),
        type_idx=np.array(types, dtype=np.int64),
        job_types=("a", "b"),
        service_s=nan,
        tokens_in=nan,
        tokens_out=nan,
        priority=np.zeros(n, dtype=np.int64),
        deadline_s=nan,
    )
    jobs = Jobs(table, np.array(service_s), np.array(service_s))
    spec = SimSpec(
        queues=(
            QueueSpec("qa", frozenset({"a"}), model_load_s=load_s),
            QueueSpec("qb", frozenset({"b"}), model_load_s=load_s),
        ),
        budget=budget,
        initial_allocation=initial,
        tick_s=1.0,
        horizon_s=max(arrivals_s) if arrivals_s else 0.0,
    )
    return SimRun(spec, jobs, make_router("rule"), np.random.default_rng(0))


def test_moved_busy_worker_finishes_its_job_then_loads() -> None:
    """No preemption: the job in service completes, then the worker loads and serves the new queue."""
    # Job 0 (type a) runs 0.5..3.5; job 1 (type b) waits at qb which has no worker.
    run = _run([0.5, 0.6], [0, 1], [3.0, 1.0])
    view = run.advance_to_next_tick()
    assert view is not None
    assert [q.workers_busy for q in view.queues] == [1, 0]
    assert run.apply({"qa": 0, "qb": 1}) == 1
    view = run.advance_to_next_tick()  # t = 2: still draining
    assert view is not None
    assert [q.workers_loading for q in view.queues] == [0, 1]
    assert view.allocation() == {"qa": 0, "qb": 1}
    while (v := run.advance_to_next_tick()) is not None:
        run.apply(v.allocation())
    record = run.record()
    # Job 0 ends at 3.5; the load takes 5 s (until 8.5); job 1 then runs 1 s.
    assert record.completion_s.tolist() == [3.5, 9.5]
    assert record.loading_worker_s == pytest.approx(5.0)
    assert record.reconfigurations == 1
    assert record.model_loads == 1
    assert conservation_gap(record) == 0
    assert littles_law_gap(record) < 1e-12


def test_moving_back_before_the_load_starts_costs_nothing() -> None:
    """A draining worker returned to its own queue keeps its model: no load is paid."""
    run = _run([0.5, 0.6], [0, 0], [3.0, 1.0])
    assert run.advance_to_next_tick() is not None
    run.apply({"qa": 0, "qb": 1})
    assert run.advance_to_next_tick() is not None
    run.apply({"qa": 1, "qb": 0})
    while (v := run.advance_to_next_tick()) is not None:
        run.apply(v.allocation())
    record = run.record()
    assert record.model_loads == 0
    assert record.loading_worker_s == 0.0
    assert record.completion_s.tolist() == [3.5, 4.5]


def test_idle_worker_loads_immediately_and_counts_as_loading() -> None:
    """An idle worker moved at a tick starts loading at once; utilisation excludes loading."""
    run = _run([1.5], [1], [2.0])
    assert run.advance_to_next_tick() is not None
    run.apply({"qa": 0, "qb": 1})
    view = run.advance_to_next_tick()
    assert view is not None
    assert view.queues[1].workers_loading == 1
    assert view.queues[1].workers_ready == 0
    while (v := run.advance_to_next_tick()) is not None:
        run.apply(v.allocation())
    record = run.record()
    assert record.completion_s.tolist() == [8.0]  # load 1..6, wait from 1.5, serve 6..8
    summary = summarize(record)
    assert summary.utilization == pytest.approx(2.0 / record.end_s)
    assert summary.loading_worker_s == pytest.approx(5.0)


def test_allocation_over_budget_or_unknown_queue_is_refused() -> None:
    """The simulator enforces the budget itself, whatever the policy returns."""
    run = _run([0.5], [0], [1.0])
    assert run.advance_to_next_tick() is not None
    with pytest.raises(ValueError, match="exceeds budget"):
        run.apply({"qa": 1, "qb": 1})
    with pytest.raises(ValueError, match="unknown queues"):
        run.apply({"nope": 1})


def test_unaccepted_job_type_is_rejected_and_counted() -> None:
    """A job no queue accepts is rejected by the router and counted; conservation still holds."""
    run = _run([0.5, 0.7], [0, 1], [1.0, 1.0])
    spec = run.spec
    narrowed = SimSpec(
        queues=(spec.queues[0], QueueSpec("qb", frozenset({"c"}))),
        budget=1,
        initial_allocation=(1, 0),
        tick_s=1.0,
        horizon_s=spec.horizon_s,
    )
    run = SimRun(narrowed, run.jobs, make_router("rule"), np.random.default_rng(0))
    while (v := run.advance_to_next_tick()) is not None:
        run.apply(v.allocation())
    record = run.record()
    assert record.rejected == 1
    assert summarize(record).completed == 1
    assert conservation_gap(record) == 0
    assert sum(run.rejection_reasons.values()) == 1
