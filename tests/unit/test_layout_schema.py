"""One layout for the service and a scenario: the same validation on both sides, old files
translated or refused, and a scenario served as it is (ServiceConfig.from_scenario)."""

from __future__ import annotations

import copy
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from policies.evaluation import scenario_fingerprint
from policies.guardrails import guardrails_for
from policies.legacy_layout import LayoutDeprecationWarning
from policies.registry import make_allocator
from policies.schema import QUEUE_NAME_PATTERN
from policies.sim.scenario import ScenarioError, parse_scenario
from policies.tuned import TUNED
from policies.views import ClusterView, QueueView
from scheduler import keys
from scheduler.config import ConfigError, ServiceConfig

SCENARIO_DIR = Path(str(resources.files("policies") / "scenarios"))

QUEUES: list[dict[str, Any]] = [
    {"name": "a", "job_types": ["x"], "min_workers": 1},
    {"name": "b", "job_types": ["y"], "max_workers": 3},
]
ALLOCATION: dict[str, Any] = {"policy": "proportional", "tick_s": 1.0, "budget": 4}


def _scenario_raw(queues: list[dict[str, Any]], allocation: dict[str, Any]) -> dict[str, Any]:
    """A scenario around the layout: every queue gets a service model, plus a workload."""
    with_service = [{**q, "service": {"kind": "exponential", "mean_s": 0.5}} for q in queues]
    return {
        "queues": with_service,
        "allocation": allocation,
        "workload": {"generators": [{"kind": "poisson", "rate_per_s": 1.0, "mix": {"x": 1}}]},
        "duration_s": 10.0,
    }


def _service_raw(queues: list[dict[str, Any]], allocation: dict[str, Any]) -> dict[str, Any]:
    return {"handlers": [], "queues": queues, "allocation": allocation}


def _both_problems(
    queues: list[dict[str, Any]], allocation: dict[str, Any]
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The problems the service loader and the scenario loader report for one layout."""
    with pytest.raises(ConfigError) as service:
        ServiceConfig.from_mapping(_service_raw(queues, allocation), source="service.yaml")
    with pytest.raises(ScenarioError) as scenario:
        parse_scenario(_scenario_raw(queues, allocation), source="scenario.yaml")
    return service.value.problems, scenario.value.problems


def _q(i: int, **changes: Any) -> list[dict[str, Any]]:
    queues = copy.deepcopy(QUEUES)
    queues[i].update(changes)
    return queues


class TestOneValidation:
    @pytest.mark.parametrize(
        ("queues", "allocation", "path", "message"),
        [
            (_q(1, name="a"), ALLOCATION, "queues.1.name", "duplicate queue name 'a'"),
            (_q(1, name="b c"), ALLOCATION, "queues.1.name", "queue name 'b c' is invalid"),
            (
                _q(1, min_workers=4),
                ALLOCATION,
                "queues.1.max_workers",
                "3 is below min_workers (4)",
            ),
            (
                _q(1, min_workers=4, max_workers=None),
                ALLOCATION,
                "allocation.budget",
                "4 is below the sum of the queues' min_workers (5)",
            ),
            (_q(0, min_workers=-1), ALLOCATION, "queues.0.min_workers", "greater than or equal"),
            (_q(0, job_types=[]), ALLOCATION, "queues.0.job_types", "at least 1 item"),
            (
                QUEUES,
                {**ALLOCATION, "initial": {"zz": 1}},
                "allocation.initial.zz",
                "unknown queue",
            ),
            (
                QUEUES,
                {**ALLOCATION, "initial": {"a": 3, "b": 2}},
                "allocation.initial",
                "allocates 5 workers, more than allocation.budget (4)",
            ),
            (
                QUEUES,
                {**ALLOCATION, "hysteresis_workers": 5},
                "allocation.hysteresis_workers",
                "5 is above allocation.budget (4)",
            ),
            (QUEUES, {**ALLOCATION, "hysteresis_workers": -1}, "allocation.hysteresis_workers", ""),
            (QUEUES, {**ALLOCATION, "tick_s": 0}, "allocation.tick_s", "greater than 0"),
            (QUEUES, {**ALLOCATION, "max_moves_per_tick": -1}, "allocation.max_moves_per_tick", ""),
            (
                QUEUES,
                {**ALLOCATION, "budget": 0},
                "allocation.budget",
                "greater than or equal to 1",
            ),
            (QUEUES, {**ALLOCATION, "budgt": 4}, "allocation.budgt", "Extra inputs"),
        ],
    )
    def test_same_bad_layout_same_problems_from_both_loaders(
        self, queues: list[dict[str, Any]], allocation: dict[str, Any], path: str, message: str
    ) -> None:
        """A layout mistake gets the same field path and message from `serve` and `simulate`."""
        service, scenario = _both_problems(queues, allocation)
        assert service == scenario
        assert any(p == path and message in m for p, m in service), service

    def test_every_problem_is_reported_at_once(self) -> None:
        """Several cross-field mistakes are listed together, each under its own path."""
        queues = _q(1, name="a", min_workers=4)
        service, scenario = _both_problems(queues, {**ALLOCATION, "initial": {"zz": 1}})
        assert service == scenario
        assert [p for p, _ in service] == [
            "queues.1.name",
            "queues.1.max_workers",
            "allocation.budget",
            "allocation.initial.zz",
        ]

    def test_a_bad_only_queue_is_one_problem(self) -> None:
        """The queue's own error, not also "queues: at least 1 item" for the list it empties."""
        service, scenario = _both_problems([{**QUEUES[0], "bogus": 1}], ALLOCATION)
        assert service == scenario == [("queues.0.bogus", "Extra inputs are not permitted")]

    def test_the_error_names_the_file_and_the_path(self) -> None:
        """The message of both errors starts from the file and lists `path: message` lines."""
        with pytest.raises(ConfigError, match=r"service\.yaml: invalid configuration\n"):
            ServiceConfig.from_mapping(
                _service_raw(_q(1, name="a"), ALLOCATION), source="service.yaml"
            )
        with pytest.raises(ScenarioError) as info:
            parse_scenario(_scenario_raw(_q(1, name="a"), ALLOCATION), source="s.yaml")
        assert "invalid scenario s.yaml:\n  queues.1.name: duplicate queue name 'a'" in str(
            info.value
        )

    def test_budget_is_required(self) -> None:
        """A scenario without allocation.budget is refused naming it (no default fits all)."""
        with pytest.raises(ScenarioError) as info:
            parse_scenario(_scenario_raw(QUEUES, {"policy": "static"}))
        assert ("allocation.budget", "Field required") in info.value.problems

    def test_queue_names_follow_the_redis_key_rule(self) -> None:
        """The layout's queue-name rule is the one scheduler.keys applies to names in keys."""
        assert keys._NAME_RE.pattern == QUEUE_NAME_PATTERN

    def test_both_sides_build_the_same_guardrails(self) -> None:
        """A scenario and the service config made from it constrain a proposal identically."""
        scenario = parse_scenario(
            _scenario_raw(
                _q(1, max_workers=2),
                {**ALLOCATION, "max_moves_per_tick": 1, "hysteresis_workers": 2},
            )
        )
        config = ServiceConfig.from_scenario(scenario)
        assert config.bounds() == scenario.bounds()
        view = ClusterView(
            now_s=0.0,
            tick_s=1.0,
            budget=4,
            queues=tuple(
                QueueView(
                    name=n,
                    job_types=frozenset({t}),
                    depth=d,
                    backlog_s=d * 0.5,
                    oldest_wait_s=0.0,
                    arrival_rate_per_s=r,
                    service_time_s=0.5,
                    workers_ready=w,
                    workers_busy=w,
                    workers_loading=0,
                    model_load_s=1.0,
                    slo_s=None,
                )
                for n, t, d, r, w in (("a", "x", 40, 9.0, 1), ("b", "y", 0, 0.1, 2))
            ),
        )
        decisions = [
            guardrails_for(layout, make_allocator("maxweight")).allocate(view)
            for layout in (scenario, config)
        ]
        # maxweight alone proposes {"a": 4, "b": 0}; the move cap lets one worker through.
        assert decisions[0] == decisions[1] == {"a": 2, "b": 2}


# The shipped bursty_switch scenario as it was written before the one layout.
OLD_BURSTY_SWITCH = """\
name: bursty_switch
description: Three queues with MMPP bursts and 20-40 s model loads.
queues:
  - name: llm_small
    job_types: [small]
    service: {kind: lognormal, mean_s: 0.5, cv: 1.0}
    model_load_s: 20.0
    slo_s: 5.0
  - name: llm_large
    job_types: [large]
    service: {kind: lognormal, mean_s: 2.0, cv: 1.0}
    model_load_s: 40.0
    slo_s: 20.0
  - name: rerank
    job_types: [rerank]
    service: {kind: exponential, mean_s: 0.2}
    model_load_s: 10.0
    slo_s: 2.0
cluster:
  workers: 24
workload:
  generators:
    - kind: mmpp
      states:
        - {rate_per_s: 10.0, mean_sojourn_s: 120.0}
        - {rate_per_s: 30.0, mean_sojourn_s: 30.0}
      mix: {small: 1}
    - kind: mmpp
      states:
        - {rate_per_s: 2.0, mean_sojourn_s: 150.0}
        - {rate_per_s: 7.0, mean_sojourn_s: 40.0}
      mix: {large: 1}
    - kind: poisson
      rate_per_s: 15.0
      mix: {rerank: 1}
tick_s: 2.0
duration_s: 1800.0
allocator: switch_aware
guardrails:
  min_workers: {llm_small: 1, llm_large: 1, rerank: 1}
"""

OLD_TINY: dict[str, Any] = {
    "queues": [
        {"name": "a", "job_types": ["x"], "service": {"kind": "constant", "mean_s": 1.0}},
        {"name": "b", "job_types": ["y"], "service": {"kind": "constant", "mean_s": 1.0}},
    ],
    "cluster": {"workers": 4},
    "workload": {"generators": [{"kind": "poisson", "rate_per_s": 1.0, "mix": {"x": 1}}]},
    "duration_s": 10.0,
}


def _parse_old(data: str | dict[str, Any]) -> tuple[Any, str]:
    """The scenario, and the one deprecation warning its loading raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scenario = parse_scenario(data, source="old.yaml")
    assert [w.category for w in caught] == [LayoutDeprecationWarning]
    return scenario, str(caught[0].message)


class TestOldScenarios:
    def test_an_old_shipped_scenario_reads_as_the_converted_one(self) -> None:
        """The old bursty_switch translates to exactly the shipped file, so it has the same
        fingerprint and `bilevel evaluate` finds the shipped tuned values for it."""
        old, message = _parse_old(OLD_BURSTY_SWITCH)
        shipped = parse_scenario((SCENARIO_DIR / "bursty_switch.yaml").read_text())
        assert old == shipped
        assert scenario_fingerprint(old) == TUNED["bursty_switch"].fingerprint
        assert "old.yaml is in the old layout and was translated" in message
        for line in (
            "cluster.workers is now allocation.budget: 24",
            "tick_s is now allocation.tick_s: 2.0",
            'allocator is now allocation.policy: "switch_aware"',
            "guardrails.min_workers.llm_large is now queues.1.min_workers: 1",
        ):
            assert line in message

    def test_no_allocator_keeps_meaning_proportional(self) -> None:
        """An old file without an allocator ran proportional; it still does (the layout's own
        default is switch_aware), and the warning says so."""
        old, message = _parse_old(OLD_TINY)
        assert old.allocation.policy == "proportional"
        assert "allocator (not given) meant proportional" in message
        fresh = parse_scenario(_scenario_raw(QUEUES, {"budget": 4}))
        assert fresh.allocation.policy == "switch_aware"

    def test_every_old_key_is_translated(self) -> None:
        """Policies with params, the initial allocation, the per-queue maps and their defaults,
        the move cap and hysteresis all land on their new keys."""
        data = {
            **OLD_TINY,
            "queues": [*OLD_TINY["queues"], {**OLD_TINY["queues"][0], "name": "c"}],
            "cluster": {"workers": 6, "initial_allocation": {"a": 2, "b": 1}},
            "tick_s": 3.0,
            "allocator": {"name": "switch_aware", "params": {"horizon_s": 60.0}},
            "router": {"name": "rule", "params": {"tie_break": "round_robin"}},
            "guardrails": {
                "min_workers": {"a": 2},
                "max_workers": {"b": 2},
                "default_min": 1,
                "default_max": 4,
                "max_moves_per_tick": 2,
                "hysteresis_workers": 2,
            },
        }
        old, _ = _parse_old(data)
        a = old.allocation
        assert (a.budget, a.tick_s, a.initial) == (6, 3.0, {"a": 2, "b": 1})
        assert (a.policy, a.params) == ("switch_aware", {"horizon_s": 60.0})
        assert (old.routing.policy, old.routing.params) == ("rule", {"tie_break": "round_robin"})
        assert (a.max_moves_per_tick, a.hysteresis_workers) == (2, 2)
        assert [(q.min_workers, q.max_workers) for q in old.queues] == [(2, 4), (1, 2), (1, 4)]

    @pytest.mark.parametrize(
        ("change", "path", "message"),
        [
            (
                {"allocation": {"budget": 4}},
                "cluster.workers",
                "is now allocation.budget, which this file also sets: write only allocation.budget",
            ),
            (
                {"guardrails": {"min_workers": {"zz": 1}}},
                "guardrails.min_workers.zz",
                "unknown queue; queues are ['a', 'b']",
            ),
            (
                {
                    "queues": [{**OLD_TINY["queues"][0], "min_workers": 1}, OLD_TINY["queues"][1]],
                    "guardrails": {"min_workers": {"a": 2}},
                },
                "guardrails.min_workers.a",
                "is now queues.0.min_workers, which this file also sets",
            ),
            (
                {"cluster": {"workers": 4, "gpus": 2}},
                "cluster.gpus",
                "unknown key; cluster is now allocation",
            ),
            ({"guardrails": {"min": 1}}, "guardrails.min", "unknown key; guardrails are now"),
            (
                {"router": {"name": "rule", "tie": "first"}},
                "router.tie",
                "unknown key (router was a name or {name, params}); write routing",
            ),
        ],
    )
    def test_what_cannot_be_translated_is_refused_saying_what_to_write(
        self, change: dict[str, Any], path: str, message: str
    ) -> None:
        """Both forms of one key, a map naming no queue, or a key that never existed: refused
        under the path the file wrote, with what to write instead."""
        with pytest.raises(ScenarioError) as info:
            parse_scenario({**OLD_TINY, **change})
        assert any(p == path and message in m for p, m in info.value.problems), info.value

    def test_a_bad_translated_value_is_reported_where_the_file_wrote_it(self) -> None:
        """`cluster.workers: 0` is checked as allocation.budget and reported as cluster.workers;
        a min_workers map over the budget names the budget's old key too."""
        with pytest.raises(ScenarioError) as info:
            _parse_old({**OLD_TINY, "cluster": {"workers": 0}})
        assert info.value.problems == [
            ("cluster.workers", "Input should be greater than or equal to 1")
        ]
        with pytest.raises(ScenarioError) as info:
            _parse_old({**OLD_TINY, "guardrails": {"min_workers": {"a": 3, "b": 2}}})
        assert info.value.problems == [
            ("cluster.workers", "4 is below the sum of the queues' min_workers (5)")
        ]

    def test_hysteresis_zero_reads_as_one_on_both_sides(self) -> None:
        """hysteresis_workers 0 held nothing, as 1 does: both loaders read it as 1 and warn."""
        allocation = {**ALLOCATION, "hysteresis_workers": 0}
        with pytest.warns(LayoutDeprecationWarning, match="0 let every change through"):
            scenario = parse_scenario(_scenario_raw(QUEUES, allocation))
        with pytest.warns(LayoutDeprecationWarning, match="0 let every change through"):
            config = ServiceConfig.from_mapping(_service_raw(QUEUES, allocation))
        assert scenario.allocation.hysteresis_workers == config.allocation.hysteresis_workers == 1


class TestOldServiceFiles:
    def test_a_missing_budget_keeps_the_old_default_with_a_warning(self) -> None:
        """A service file without allocation.budget ran 2 workers; it still does, and says so."""
        with pytest.warns(LayoutDeprecationWarning, match=r"allocation\.budget \(not given\)"):
            config = ServiceConfig.from_mapping({"handlers": [], "queues": QUEUES})
        assert config.allocation.budget == 2

    def test_the_environment_wins_over_the_file(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """BILEVEL_ALLOCATION__BUDGET overrides the file's budget, and a file without one is
        not warned about when the environment gives it."""
        monkeypatch.setenv("BILEVEL_ALLOCATION__BUDGET", "7")
        config = ServiceConfig.from_mapping(_service_raw(QUEUES, ALLOCATION))
        assert (config.allocation.budget, config.allocation.policy) == (7, "proportional")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            config = ServiceConfig.from_mapping({"handlers": [], "queues": QUEUES})
        assert config.allocation.budget == 7

    def test_the_shipped_service_file_is_in_the_new_layout(self) -> None:
        """deploy/service.yaml loads without a deprecation warning."""
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ServiceConfig.load(Path(__file__).parents[2] / "deploy" / "service.yaml")


class TestServeAScenario:
    def test_from_scenario_takes_the_layout_and_leaves_the_models(self) -> None:
        """Queues (without service models), routing and allocation come from the scenario; the
        service-only keys from the arguments."""
        scenario = parse_scenario((SCENARIO_DIR / "replicas.yaml").read_text())
        config = ServiceConfig.from_scenario(
            scenario,
            store={"namespace": "replicas"},
            handlers=["tests.integration.handlers_for_tests"],
            routing={"batch_size": 50},
            allocation={"idle_tick_s": 5.0},
        )
        assert [q.name for q in config.queues] == ["llm_a", "llm_b", "embed"]
        assert [q.job_types for q in config.queues] == [("llm",), ("llm",), ("embed",)]
        assert [(q.min_workers, q.slo_s) for q in config.queues] == [(1, 10.0), (1, 10.0), (1, 1.0)]
        assert (config.routing.policy, config.routing.batch_size) == ("shortest_wait", 50)
        a = config.allocation
        assert (a.policy, a.tick_s, a.budget, a.idle_tick_s) == ("switch_aware", 2.0, 20, 5.0)
        assert config.store.namespace == "replicas"
        assert config.handlers == ("tests.integration.handlers_for_tests",)
        assert config.bounds() == scenario.bounds()

    def test_initial_allocation_carries_over(self) -> None:
        """allocation.initial is part of the layout: the service starts from it too."""
        scenario = parse_scenario(_scenario_raw(QUEUES, {**ALLOCATION, "initial": {"a": 3}}))
        assert ServiceConfig.from_scenario(scenario).allocation.initial == {"a": 3}

    @pytest.mark.parametrize(
        ("service_only", "path"),
        [
            ({"queues": QUEUES}, "queues"),
            ({"allocation": {"budget": 9}}, "allocation.budget"),
            ({"routing": {"policy": "random"}}, "routing.policy"),
        ],
    )
    def test_what_the_scenario_gives_cannot_come_from_the_config(
        self, service_only: dict[str, Any], path: str
    ) -> None:
        """The config beside a scenario gives service settings only; a layout key is refused
        naming it, rather than one of the two silently winning."""
        scenario = parse_scenario(_scenario_raw(QUEUES, ALLOCATION))
        with pytest.raises(ConfigError) as info:
            ServiceConfig.from_scenario(scenario, source="extra.yaml", **service_only)
        assert [p for p, _ in info.value.problems] == [path]
        assert "extra.yaml" in str(info.value)


class TestShadowFields:
    """allocation.shadow, shadow_params and shadow_promote belong to the shared layout."""

    def test_a_scenario_and_a_service_accept_a_shadow_and_serving_keeps_it(self) -> None:
        """Both loaders take the same shadow keys; a served scenario keeps its shadow."""
        allocation = {
            **ALLOCATION,
            "shadow": "switch_aware",
            "shadow_params": {"horizon_s": 60.0},
            "shadow_promote": {"after_s": 300.0, "min_gain": 0.1},
        }
        scenario = parse_scenario(_scenario_raw(QUEUES, allocation), source="scenario.yaml")
        service = ServiceConfig.from_mapping(_service_raw(QUEUES, allocation))
        served = ServiceConfig.from_scenario(scenario, handlers=[])
        for a in (scenario.allocation, service.allocation, served.allocation):
            assert a.shadow == "switch_aware"
            assert a.shadow_params == {"horizon_s": 60.0}
            assert a.shadow_promote is not None
            assert (a.shadow_promote.after_s, a.shadow_promote.min_gain) == (300.0, 0.1)

    def test_automatic_promotion_is_off_by_default(self) -> None:
        """A shadow without shadow_promote is promoted only by a person."""
        config = ServiceConfig.from_mapping(
            _service_raw(QUEUES, {**ALLOCATION, "shadow": "static"})
        )
        assert config.allocation.shadow_promote is None

    def test_shadow_keys_without_a_shadow_are_named_by_both_loaders(self) -> None:
        """shadow_params or shadow_promote with no shadow: the same problem from either loader."""
        allocation = {**ALLOCATION, "shadow_params": {"x": 1}, "shadow_promote": {"after_s": 60}}
        service, scenario = _both_problems(QUEUES, allocation)
        assert service == scenario
        assert (
            "allocation.shadow_params",
            "given without allocation.shadow to apply to",
        ) in service
        assert (
            "allocation.shadow_promote",
            "given without allocation.shadow to promote",
        ) in service

    def test_a_bad_promotion_rule_names_its_field(self) -> None:
        """min_gain is a fraction below 1 and after_s is required."""
        allocation = {**ALLOCATION, "shadow": "static", "shadow_promote": {"min_gain": 2.0}}
        service, scenario = _both_problems(QUEUES, allocation)
        assert service == scenario
        paths = {path for path, _ in service}
        assert paths == {"allocation.shadow_promote.after_s", "allocation.shadow_promote.min_gain"}
