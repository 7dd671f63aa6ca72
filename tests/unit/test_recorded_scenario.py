"""A recording as a trace and a scenario (scheduler.recorded_scenario), without Redis: the trace's
rows, the service-time fits, model-load times, and a scenario that validates."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from policies.sim.scenario import Scenario
from policies.sim.traces import parse_generic_csv
from scheduler.models import JobStatus
from scheduler.recorded_scenario import (
    budget_seen,
    fit_service,
    model_load_s,
    scenario_mapping,
    trace_csv,
    traced,
)
from scheduler.recording import ModelLoad, ServedJob

BASE = ServedJob(
    job_id="j0",
    created_ms=1_000_000,
    started_ms=1_000_010,
    finished_ms=1_000_050,
    queue="q",
    job_type="embed",
    priority=0,
    tenant=None,
    deadline_s=None,
    attempts=1,
    status=JobStatus.SUCCEEDED,
    run_s=0.04,
    tokens_in=None,
    tokens_out=None,
)


def job(i: int, **changes: Any) -> ServedJob:
    return dataclasses.replace(
        BASE, job_id=f"j{i}", created_ms=BASE.created_ms + 250 * i, **changes
    )


class TestTrace:
    def test_rows_round_trip_through_the_generic_loader(self) -> None:
        """Arrivals from 0 in ms steps, measured service, tokens, a tenant needing quotes,
        priority and deadline come back from parse_generic_csv as written."""
        jobs = [
            job(0),
            job(1, job_type="gen", tokens_in=12, tokens_out=30, tenant='a,"b"', priority=7),
            job(2, run_s=None, deadline_s=2.5),
        ]
        arrivals = parse_generic_csv(trace_csv(jobs).splitlines(keepends=True))
        assert [a.arrival_s for a in arrivals] == [0.0, 0.25, 0.5]
        assert [a.service_s for a in arrivals] == [0.04, 0.04, None]
        assert (arrivals[1].tokens_in, arrivals[1].tokens_out) == (12, 30)
        assert (arrivals[1].tenant, arrivals[1].priority) == ('a,"b"', 7)
        assert arrivals[2].deadline_s == 2.5

    def test_only_jobs_that_ran_to_an_end_on_a_queue_are_traced(self) -> None:
        """Cancelled jobs and jobs without a queue are left out; the rest in arrival order."""
        jobs = [
            job(3),
            job(1, status=JobStatus.CANCELLED),
            job(2, queue=None, status=JobStatus.DEAD),
            job(0, status=JobStatus.DEAD),
        ]
        assert [j.job_id for j in traced(jobs)] == ["j0", "j3"]


class TestFits:
    def test_spread_run_times_fit_a_lognormal_with_their_mean_and_cv(self) -> None:
        """Mean and coefficient of variation of the samples, to six significant digits."""
        fit = fit_service([0.1, 0.2, 0.3], fallback_mean_s=1.0)
        assert fit.service == {"kind": "lognormal", "mean_s": 0.2, "cv": 0.5}
        assert fit.samples == 3

    def test_one_sample_or_no_spread_is_constant_and_none_is_the_fallback(self) -> None:
        """A lognormal needs a spread; with nothing measured the fallback mean stands."""
        assert fit_service([0.3], 1.0).service == {"kind": "constant", "mean_s": 0.3}
        assert fit_service([0.3, 0.3], 1.0).service == {"kind": "constant", "mean_s": 0.3}
        assert fit_service([], 0.7).service == {"kind": "constant", "mean_s": 0.7}
        assert fit_service([0.0, 0.0], 1.0).service["mean_s"] > 0

    def test_model_load_is_the_sum_of_each_type_s_median(self) -> None:
        """A queue of two types pays both; each type's loads are taken by their median."""
        loads = [
            ModelLoad("q", 1, {"a": 1.0}),
            ModelLoad("q", 2, {"a": 9.0, "b": 0.5}),
            ModelLoad("r", 3, {"a": 2.0}),
        ]
        assert model_load_s(["a", "b"], loads) == 2.5
        assert model_load_s(["c"], loads) == 0.0

    def test_budget_is_the_most_workers_placed_at_once(self) -> None:
        """From the allocation history; None without one."""
        assert budget_seen([{"a": 1, "b": 1}, {"a": 3, "b": 0}, {"a": 2}]) == 3
        assert budget_seen([]) is None


class TestScenario:
    def test_types_sharing_queues_share_one_model_and_the_scenario_validates(self) -> None:
        """A type on two queues and a queue of two types join one group, fitted together, so
        the scenario's rule (one model per job type) holds."""
        jobs = [
            job(0, queue="a", job_type="x", run_s=0.1),
            job(1, queue="b", job_type="x", run_s=0.3),
            job(2, queue="b", job_type="y", run_s=0.2),
            job(3, queue="c", job_type="z", run_s=1.0),
        ]
        mapping = scenario_mapping(jobs, [], name="rec", description="d")
        scenario = Scenario.model_validate(mapping)
        services = {q.name: q.service for q in scenario.queues}
        assert services["a"] == services["b"]
        assert services["a"].nominal_mean_s == pytest.approx(0.2)
        assert services["c"].nominal_mean_s == 1.0
        assert scenario.allocation.budget == 3
        assert mapping["workload"] == {"trace": {"format": "generic_csv", "path": "trace.csv"}}
