"""Sim against live, the pure parts: time compression, shrinking, the calibration model, the
comparison of summaries, and `bilevel replay`'s refusals of bad inputs (before anything starts)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from policies.sim.calibration import Calibration, calibrated
from policies.sim.metrics import summarize
from policies.sim.scenario import (
    LIVE_MODELS,
    ScenarioError,
    make_allocator_for,
    make_router_for,
    parse_scenario,
    prepare,
)
from policies.sim.timescale import compress, cut, shrink
from policies.sim2real import (
    live_record,
    moves_in_history,
    plan_replay,
    rank,
    rankings_agree,
    real_model_loads,
    relative_error,
    relative_errors,
    rescaled,
    within,
)
from scheduler.cli import app
from tests.conftest import REPO_ROOT
from workers.registry import HandlerRegistry, PayloadError
from workers.synthetic import (
    DEMO_MODELS,
    ModelWork,
    parse_handlers,
    register_synthetic,
    service_seconds,
)

SCENARIOS = REPO_ROOT / "policies" / "scenarios"

TINY: dict[str, Any] = {
    "name": "tiny",
    "queues": [
        {"name": "a", "job_types": ["a"], "service": {"kind": "exponential", "mean_s": 0.5},
         "model_load_s": 2.0, "slo_s": 2.0},
        {"name": "b", "job_types": ["b"], "service": {"kind": "lognormal", "mean_s": 0.5, "cv": 1},
         "model_load_s": 4.0},
    ],
    "allocation": {"policy": "proportional", "tick_s": 1.0, "budget": 4},
    "workload": {"generators": [{"kind": "poisson", "rate_per_s": 4.0, "mix": {"a": 2, "b": 1}}]},
    "duration_s": 120.0,
}  # fmt: skip


def _summary(prepared: Any, policy: str | None = None) -> dict[str, Any]:
    run = prepared.start(make_router_for(prepared.scenario))
    record = run.run(make_allocator_for(prepared.scenario, policy))
    out: dict[str, Any] = summarize(record).to_dict()
    return out


class TestTimeCompression:
    """Running a scenario K times faster is a change of time unit for the simulator."""

    def test_compressed_run_rescaled_gives_the_same_metrics(self) -> None:
        """Every JCT of the compressed run times K is the uncompressed JCT; counts are equal."""
        prepared = prepare(parse_scenario(TINY), seed=3)
        base = _summary(prepared, "switch_aware")
        fast = rescaled(_summary(compress(prepared, 8.0), "switch_aware"), 8.0)
        assert fast["jobs"] == base["jobs"]
        assert fast["reconfigurations"] == base["reconfigurations"]
        for key in ("mean_jct_s", "p50_jct_s", "p99_jct_s", "duration_s"):
            assert fast[key] == pytest.approx(base[key], rel=1e-6)
        assert fast["slo_attainment"] == pytest.approx(base["slo_attainment"])
        assert fast["utilization"] == pytest.approx(base["utilization"], rel=1e-6)

    def test_compression_keeps_the_draws(self) -> None:
        """The compressed jobs are the same draws divided by K (same types, same order)."""
        prepared = prepare(parse_scenario(TINY), seed=1)
        fast = compress(prepared, 4.0)
        np.testing.assert_allclose(fast.jobs.service_s * 4.0, prepared.jobs.service_s)
        np.testing.assert_allclose(
            fast.jobs.arrivals.arrival_s * 4.0, prepared.jobs.arrivals.arrival_s
        )
        assert fast.spec.tick_s == 0.25
        assert fast.scenario.queues[1].model_load_s == 1.0

    def test_cut_keeps_the_whole_runs_first_jobs(self) -> None:
        """Cutting at D keeps exactly the arrivals before D of the full run (no new draws)."""
        prepared = prepare(parse_scenario(TINY), seed=2)
        short = cut(prepared, 30.0)
        n = len(short.jobs.arrivals)
        assert n > 0
        assert short.spec.horizon_s == 30.0
        assert np.all(short.jobs.arrivals.arrival_s < 30.0)
        np.testing.assert_array_equal(short.jobs.service_s, prepared.jobs.service_s[:n])
        assert prepared.jobs.arrivals.arrival_s[n] >= 30.0

    @pytest.mark.parametrize("speed", [0.0, -1.0, math.inf, math.nan])
    def test_bad_speed_is_refused(self, speed: float) -> None:
        """A speed that is not a finite positive number is a ValueError naming it."""
        with pytest.raises(ValueError, match="speed"):
            compress(prepare(parse_scenario(TINY), seed=0), speed)


class TestShrink:
    """A shipped scenario shrunk to a few workers keeps its utilisation and its shape."""

    def test_rates_follow_the_budget(self) -> None:
        """steady on 4 of its 32 workers at 0.5 load: an eighth of the rate, halved."""
        steady = parse_scenario((SCENARIOS / "steady.yaml").read_text())
        small = shrink(steady, 4, duration_s=120.0, load_scale=0.5)
        assert small.allocation.budget == 4
        assert small.duration_s == 120.0
        g = small.workload.generators[0]
        assert g.mean_rate_per_s == pytest.approx(136.0 / 8 * 0.5)

    def test_every_synthetic_scenario_shrinks_to_four(self) -> None:
        """The shipped synthetic scenarios all shrink to 4 workers and prepare."""
        for name in ("steady", "bursty_switch", "diurnal", "heavy_tailed", "replicas"):
            s = shrink(parse_scenario((SCENARIOS / f"{name}.yaml").read_text()), 4, duration_s=60)
            assert len(prepare(s, seed=0).jobs.arrivals) > 0

    def test_many_queues_shrinks_to_eight(self) -> None:
        """many_queues keeps its sixty queues on 8 workers, at 8/128 of its rates."""
        many = parse_scenario((SCENARIOS / "many_queues.yaml").read_text())
        small = shrink(many, 8, duration_s=60.0, load_scale=0.6)
        assert len(small.queues) == len(many.queues) == 60
        assert small.allocation.budget == 8
        rate = sum(g.mean_rate_per_s for g in small.workload.generators)
        full = sum(g.mean_rate_per_s for g in many.workload.generators)
        assert rate == pytest.approx(full * 8 / many.allocation.budget * 0.6)
        assert len(prepare(small, seed=0).jobs.arrivals) > 0

    def test_a_trace_scenario_keeps_its_target_or_scales_its_load(self) -> None:
        """A trace at a target utilisation keeps it (times the share kept); one at a load
        multiplier has it scaled with the budget, as generators' rates are."""
        llm = parse_scenario((SCENARIOS / "trace_azure_llm.yaml").read_text())
        assert llm.workload.trace is not None
        small = shrink(llm, 4, load_scale=0.5)
        assert small.workload.trace is not None
        assert small.workload.trace.target_utilization == pytest.approx(0.35)
        raw = llm.model_copy(
            update={
                "workload": llm.workload.model_copy(
                    update={
                        "trace": llm.workload.trace.model_copy(
                            update={"target_utilization": None, "load_scale": 2.0}
                        )
                    }
                )
            }
        )
        scaled = shrink(raw, 4).workload.trace
        assert scaled is not None
        assert scaled.load_scale == pytest.approx(2.0 * 4 / 16)

    def test_minimums_over_the_budget_are_refused(self) -> None:
        """bursty_switch's three queues of min 1 cannot shrink to two workers."""
        bursty = parse_scenario((SCENARIOS / "bursty_switch.yaml").read_text())
        with pytest.raises(ValueError, match="min_workers add up to 3"):
            shrink(bursty, 2)


class TestCalibrationModel:
    """The live overheads as the simulator models them."""

    def _one_job(self, calibration: Calibration | None) -> dict[str, Any]:
        raw = {
            **TINY,
            "queues": [{**TINY["queues"][0], "service": {"kind": "constant", "mean_s": 0.5}}],
            "workload": {"generators": [{"kind": "poisson", "rate_per_s": 0.01, "mix": {"a": 1}}]},
            "duration_s": 400.0,
            "allocation": {"policy": "static", "tick_s": 1.0, "budget": 1},
        }
        if calibration is not None:
            raw["calibration"] = calibration.model_dump()
        return _summary(prepare(parse_scenario(raw), seed=0))

    def test_an_idle_worker_adds_dispatch_and_overhead(self) -> None:
        """Jobs that find the worker idle take service + dispatch + job overhead."""
        ideal = self._one_job(None)
        assert ideal["mean_jct_s"] == pytest.approx(0.5)
        cal = Calibration(dispatch_s=0.03, job_overhead_s=0.02, switch_s=0.0)
        assert self._one_job(cal)["mean_jct_s"] == pytest.approx(0.55)

    def test_ideal_calibration_changes_nothing(self) -> None:
        """All-zero overheads leave spec and jobs as they were."""
        prepared = prepare(parse_scenario(TINY), seed=0)
        spec, jobs = calibrated(prepared.spec, prepared.jobs, Calibration())
        assert spec is prepared.spec
        assert jobs is prepared.jobs

    def test_switch_adds_to_every_model_load(self) -> None:
        """switch_s is paid on every load, also of a queue whose model loads in 0 s."""
        raw = {**TINY, "queues": [{**q, "model_load_s": 0.0} for q in TINY["queues"]]}
        prepared = prepare(parse_scenario(raw), seed=0)
        spec, _ = calibrated(prepared.spec, prepared.jobs, Calibration(switch_s=0.25))
        assert [q.model_load_s for q in spec.queues] == [0.25, 0.25]

    def test_overheads_cost_more_at_higher_speed(self) -> None:
        """The same real-second overheads weigh K times more in scenario seconds."""
        prepared = prepare(parse_scenario(TINY), seed=0)
        cal = Calibration(dispatch_s=0.005, job_overhead_s=0.005)
        slow = plan_replay(prepared, speed=1.0, calibration=cal)
        fast = plan_replay(prepared, speed=20.0, calibration=cal)
        jct_slow = rescaled(_summary(slow.sim), 1.0)["mean_jct_s"]
        jct_fast = rescaled(_summary(fast.sim), 20.0)["mean_jct_s"]
        assert jct_fast > jct_slow

    def test_plan_refuses_a_calibrated_run(self) -> None:
        """Overheads go in after compression: a calibrated prepared run is refused."""
        raw = {**TINY, "calibration": {"dispatch_s": 0.01}}
        with pytest.raises(ValueError, match="without calibration"):
            plan_replay(prepare(parse_scenario(raw), 0), speed=2.0, calibration=Calibration())

    def test_a_plan_starts_where_the_live_service_settled(self) -> None:
        """starting_from sets both runs' initial allocation; unknown queues and an allocation
        over the budget are refused."""
        plan = plan_replay(prepare(parse_scenario(TINY), 0), speed=2.0, calibration=Calibration())
        moved = plan.starting_from({"b": 3})
        assert moved.live.spec.initial_allocation == (0, 3)
        assert moved.sim.spec.initial_allocation == (0, 3)
        assert moved.live.jobs is plan.live.jobs
        with pytest.raises(ValueError, match="unknown queues"):
            plan.starting_from({"zz": 1})
        with pytest.raises(ValueError, match="over the budget"):
            plan.starting_from({"a": 3, "b": 2})

    def test_load_times_split_a_queues_load_over_its_types(self) -> None:
        """A queue of two job types loads half its model_load_s per type."""
        raw = {
            **TINY,
            "queues": [{**TINY["queues"][0], "job_types": ["a", "c"], "model_load_s": 3.0}],
            "workload": {"generators": [{"kind": "poisson", "rate_per_s": 1, "mix": {"a": 1}}]},
        }
        plan = plan_replay(prepare(parse_scenario(raw), 0), speed=3.0, calibration=Calibration())
        assert plan.load_times_s() == {"a": 0.5, "c": 0.5}


class TestComparison:
    """Live and simulated summaries compared metric by metric, policies ranked."""

    def test_relative_error_signs_and_gaps(self) -> None:
        """Positive when the simulator says more; None without a live value or for 0 vs not 0."""
        assert relative_error(1.1, 1.0) == pytest.approx(0.1)
        assert relative_error(0.8, 1.0) == pytest.approx(-0.2)
        assert relative_error(None, 1.0) is None
        assert relative_error(1.0, 0.0) is None
        assert relative_error(0.0, 0.0) == 0.0
        errors = relative_errors({"mean_jct_s": 2.0, "p99_jct_s": 9.0}, {"mean_jct_s": 2.5})
        assert errors["mean_jct_s"] == pytest.approx(-0.2)
        assert errors["p99_jct_s"] is None
        assert within(errors, {"mean_jct_s": 0.2, "p99_jct_s": 0.2}) == {
            "mean_jct_s": True,
            "p99_jct_s": False,
        }

    def test_rankings(self) -> None:
        """Policies ordered by mean JCT; agreement only when the order is the same."""
        sim = {"a": {"mean_jct_s": 1.0}, "b": {"mean_jct_s": 2.0}, "c": {"mean_jct_s": None}}
        live = {"a": {"mean_jct_s": 1.5}, "b": {"mean_jct_s": 1.7}}
        assert rank(sim) == ["a", "b", "c"]
        assert rankings_agree(sim, live)
        assert not rankings_agree(sim, {"a": {"mean_jct_s": 3.0}, "b": {"mean_jct_s": 1.0}})

    def test_ties_agree_with_any_order(self) -> None:
        """Two policies the simulator cannot tell apart agree with either live order; a tie
        tolerance makes near-equal live values a tie too."""
        sim = {"a": {"mean_jct_s": 1.0}, "b": {"mean_jct_s": 1.0}, "c": {"mean_jct_s": 3.0}}
        live = {"a": {"mean_jct_s": 1.2}, "b": {"mean_jct_s": 1.1}, "c": {"mean_jct_s": 2.0}}
        assert rankings_agree(sim, live)
        flipped = {"a": {"mean_jct_s": 1.0}, "b": {"mean_jct_s": 1.03}}
        assert not rankings_agree({"a": {"mean_jct_s": 1.1}, "b": {"mean_jct_s": 1.0}}, flipped)
        assert rankings_agree(
            {"a": {"mean_jct_s": 1.1}, "b": {"mean_jct_s": 1.0}}, flipped, tie=0.05
        )

    def test_moves_count_each_gained_worker(self) -> None:
        """2 -> 1 and 0 -> 1 is one move; back again another."""
        history = [{"x": 2, "y": 0}, {"x": 1, "y": 1}, {"x": 2, "y": 0}]
        assert moves_in_history(history) == 2
        assert moves_in_history(history[:1]) == 0

    def test_rescaled_touches_durations_only(self) -> None:
        """JCTs and durations times K (per queue too); rates, counts and wall time kept."""
        summary = {"mean_jct_s": 0.1, "utilization": 0.5, "jobs": 3, "wall_s": 2.0,
                   "per_queue": {"q": {"p99_jct_s": 0.2, "jobs": 3}}}  # fmt: skip
        out = rescaled(summary, 10.0)
        assert out["mean_jct_s"] == pytest.approx(1.0)
        assert out["per_queue"]["q"]["p99_jct_s"] == pytest.approx(2.0)
        assert (out["utilization"], out["jobs"], out["wall_s"]) == (0.5, 3, 2.0)

    def test_live_record_counts_and_busy_time(self) -> None:
        """A live record: finished jobs complete, an unfinished one stays in the system, busy
        time is start -> finish clipped to the end."""
        record = live_record(
            queue_names=("q",),
            arrival_s=np.array([0.0, 1.0, 2.0]),
            start_s=np.array([0.5, 1.0, 3.0]),
            finish_s=np.array([1.0, 2.0, math.nan]),
            queue_idx=np.array([0, 0, 0]),
            slo_target_s=np.array([1.0, 1.0, 1.0]),
            end_s=4.0,
            budget=1,
            reconfigurations=0,
        )
        s = summarize(record)
        assert (s.completed, s.in_system, s.arrived) == (2, 1, 3)
        assert s.jct.mean_s == pytest.approx(1.0)
        assert s.utilization == pytest.approx((0.5 + 1.0 + 1.0) / 4.0)
        # Job 0 met its 1 s target, job 1 too, job 2 is 2 s late and unfinished.
        assert s.jct.slo_attainment == pytest.approx(2 / 3)


class TestSyntheticHandlers:
    """The sleeping handlers a replay serves its jobs with."""

    def test_handlers_from_the_environment(self) -> None:
        """The JSON object parses (load seconds, or a demo model's name); a bad entry is named."""
        assert parse_handlers('{"a": 0.5, "b": 0, "c": "embed"}') == {
            "a": 0.5,
            "b": 0.0,
            "c": "embed",
        }
        with pytest.raises(ValueError, match=r"BILEVEL_SYNTHETIC_HANDLERS\.b"):
            parse_handlers('{"a": 1, "b": -1}')
        with pytest.raises(
            ValueError, match=r"BILEVEL_SYNTHETIC_HANDLERS\.c: unknown demo model 'bert'"
        ):
            parse_handlers('{"c": "bert"}')
        with pytest.raises(ValueError, match="not valid JSON"):
            parse_handlers("{")

    def test_the_scenario_and_the_workers_know_the_same_demo_models(self) -> None:
        assert LIVE_MODELS == DEMO_MODELS

    @pytest.mark.parametrize("name", DEMO_MODELS)
    def test_a_demo_model_job_computes_for_its_service_time(self, name: str) -> None:
        """A job on a demo-model handler lasts its service time (within one pass of the model)
        and spends it in forward passes of the real model, not asleep."""
        import time

        registry = HandlerRegistry()
        register_synthetic(registry, {"x": name})
        handler = registry.get("x")
        work = handler.loader()
        assert isinstance(work, ModelWork)
        assert work.pass_s > 0
        seconds = max(0.2, 5 * work.pass_s)
        started = time.perf_counter()
        assert handler.run_batch(work, [{"service_s": seconds}]) == [seconds]
        took = time.perf_counter() - started
        # Generous above: a busy machine may preempt the last pass.
        assert seconds <= took < seconds + 4 * work.pass_s + 0.25
        assert work.run_for(seconds) >= 2
        # Shorter than a pass: it sleeps, and still lasts the time asked for.
        assert work.run_for(work.pass_s / 2) == 0

    def test_a_job_sleeps_what_its_payload_says(self) -> None:
        """The registered handler returns the service seconds it slept; bad payloads are
        PayloadErrors (never retried)."""
        registry = HandlerRegistry()
        register_synthetic(registry, {"a": 0.0})
        handler = registry.get("a")
        model = handler.loader()
        assert handler.run_batch(model, [{"service_s": 0.001}]) == [0.001]
        for bad in (None, {"service_s": -1}, {"service_s": "1"}, {"service_s": 1e9}):
            with pytest.raises(PayloadError, match="service_s"):
                service_seconds(bad)


class TestLiveModels:
    """Queues whose replay runs a torch demo model: the plan's handlers and its real loads."""

    RAW: ClassVar[dict[str, Any]] = {
        **TINY,
        "queues": [
            {**TINY["queues"][0], "live_model": "embed"},
            {**TINY["queues"][1], "job_types": ["b", "b2"], "live_model": "generate"},
        ],
        "workload": {"generators": [{"kind": "poisson", "rate_per_s": 4.0,
                                     "mix": {"a": 2, "b": 1, "b2": 1}}]},
    }  # fmt: skip

    def test_live_models_leave_the_fingerprint_alone(self) -> None:
        """Only a live replay reads live_model: the tuned values of a scenario still apply."""
        from policies.evaluation import scenario_fingerprint

        plain = {**self.RAW, "queues": [
            {k: v for k, v in q.items() if k != "live_model"} for q in self.RAW["queues"]]}  # fmt: skip
        assert scenario_fingerprint(parse_scenario(self.RAW)) == scenario_fingerprint(
            parse_scenario(plain)
        )

    def test_an_unknown_live_model_is_named(self) -> None:
        raw = {**TINY, "queues": [{**TINY["queues"][0], "live_model": "bert"}, TINY["queues"][1]]}
        with pytest.raises(ScenarioError, match=r"queues\.0\.live_model"):
            parse_scenario(raw)

    def test_handlers_name_the_models_and_real_loads_replace_the_scenarios(self) -> None:
        """Each job type of a live_model queue runs that model; the queue's load in both runs is
        the timed load (once per job type), not compressed, and the simulator adds its switch."""
        prepared = prepare(parse_scenario(self.RAW), 0)
        loads = real_model_loads(prepared, {"embed": 0.3, "generate": 2.0})
        assert loads == {"a": 0.3, "b": 4.0}
        cal = Calibration(switch_s=0.25)
        plan = plan_replay(prepared, speed=10.0, calibration=cal, model_loads_s=loads)
        assert plan.handlers() == {"a": "embed", "b": "generate", "b2": "generate"}
        assert [q.model_load_s for q in plan.live.spec.queues] == [0.3, 4.0]
        assert [q.model_load_s for q in plan.sim.spec.queues] == pytest.approx([0.55, 4.25])
        # Without live models the sleeps are the scenario's loads, compressed.
        plain = plan_replay(prepare(parse_scenario(TINY), 0), speed=10.0, calibration=cal)
        assert plain.handlers() == {"a": pytest.approx(0.2), "b": pytest.approx(0.4)}

    def test_bad_model_loads_are_named(self) -> None:
        prepared = prepare(parse_scenario(self.RAW), 0)
        with pytest.raises(ValueError, match="no load time of live_model 'generate'"):
            real_model_loads(prepared, {"embed": 0.3})
        with pytest.raises(ValueError, match=r"unknown queues \['zz'\]"):
            plan_replay(prepared, speed=2.0, calibration=Calibration(), model_loads_s={"zz": 1.0})

    def test_a_job_type_shared_by_queues_of_different_models_is_refused(self) -> None:
        raw = {**TINY, "queues": [{**TINY["queues"][0], "live_model": "embed"},
                                  {**TINY["queues"][0], "name": "a2"}, TINY["queues"][1]]}  # fmt: skip
        plan = plan_replay(prepare(parse_scenario(raw), 0), speed=2.0, calibration=Calibration())
        with pytest.raises(ValueError, match="job type 'a' is in queues with different live_model"):
            plan.handlers()


class TestReplayInputs:
    """`bilevel replay` refuses bad inputs with one line and exit 2, before starting anything."""

    @pytest.fixture
    def scenario_file(self, tmp_path: Path) -> Path:
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(TINY), encoding="utf-8")
        return path

    def test_unknown_scenario_file(self, tmp_path: Path) -> None:
        """A scenario file that does not exist is named."""
        result = CliRunner().invoke(app, ["replay", "--scenario", str(tmp_path / "nope.yaml")])
        assert result.exit_code == 2
        assert "cannot read scenario" in result.output
        assert "Traceback" not in result.output

    @pytest.mark.parametrize("speed", ["0", "-2", "inf"])
    def test_speed_must_be_positive(self, scenario_file: Path, speed: str) -> None:
        """--speed 0, negative or infinite is refused naming --speed."""
        result = CliRunner().invoke(
            app, ["replay", "--scenario", str(scenario_file), "--speed", speed]
        )
        assert result.exit_code == 2
        assert "--speed must be a number > 0" in result.output

    def test_unknown_policy(self, scenario_file: Path) -> None:
        """An unknown --policy is named with the known names."""
        result = CliRunner().invoke(
            app, ["replay", "--scenario", str(scenario_file), "--policy", "nope"]
        )
        assert result.exit_code == 2
        assert "nope" in result.output

    def test_bad_duration(self, scenario_file: Path) -> None:
        """--duration-s must be positive."""
        result = CliRunner().invoke(
            app, ["replay", "--scenario", str(scenario_file), "--duration-s", "0"]
        )
        assert result.exit_code == 2
        assert "--duration-s must be a number > 0" in result.output

    @pytest.mark.parametrize(
        ("option", "value", "message"),
        [
            ("--workers", "0", "--workers must be >= 1"),
            ("--load-scale", "0", "--load-scale must be a number > 0"),
            ("--load-scale", "nan", "--load-scale must be a number > 0"),
        ],
    )
    def test_bad_shrink(self, scenario_file: Path, option: str, value: str, message: str) -> None:
        """--workers below 1 and a --load-scale that is not a positive number are named."""
        result = CliRunner().invoke(
            app, ["replay", "--scenario", str(scenario_file), option, value]
        )
        assert result.exit_code == 2
        assert message in result.output

    def test_minimums_over_the_shrunk_budget(self) -> None:
        """Shrinking below the queues' min_workers says so, before anything starts."""
        result = CliRunner().invoke(
            app,
            ["replay", "--scenario", str(SCENARIOS / "bursty_switch.yaml"), "--workers", "2"],
        )
        assert result.exit_code == 2
        assert "min_workers add up to 3" in result.output
