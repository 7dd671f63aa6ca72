"""`bilevel evaluate` through typer's CliRunner, on a tiny scenario tuned on the fly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from scheduler.commands.evaluate import register


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture
def scenario_file(tmp_path: Path) -> Path:
    """Two queues with very unequal load: equal static shares starve the busy one."""
    data: dict[str, Any] = {
        "name": "lopsided",
        "queues": [
            {
                "name": "busy",
                "job_types": ["busy"],
                "service": {"kind": "exponential", "mean_s": 0.5},
                "model_load_s": 2.0,
            },
            {
                "name": "quiet",
                "job_types": ["quiet"],
                "service": {"kind": "exponential", "mean_s": 0.5},
                "model_load_s": 2.0,
            },
        ],
        "cluster": {"workers": 8, "initial_allocation": {"busy": 4, "quiet": 4}},
        "workload": {
            "generators": [{"kind": "poisson", "rate_per_s": 10.0, "mix": {"busy": 9, "quiet": 1}}]
        },
        "tick_s": 1.0,
        "duration_s": 40.0,
    }
    path = tmp_path / "lopsided.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _evaluate(app: typer.Typer, *args: str) -> Any:
    result = CliRunner().invoke(app, ["evaluate", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_reports_cis_and_gain_with_the_right_sign(
    app: typer.Typer, scenario_file: Path
) -> None:
    """--json: one object with per-policy mean/p99 CIs over the held-out seeds; static loses to
    tuned square-root staffing (negative gain), and the reverse comparison is a positive gain."""
    base = ["--scenario", str(scenario_file), "--json"]
    out = _evaluate(app, *base, "--policy", "static", "--baseline", "proportional")
    assert out["policy"] == "static"
    assert out["seeds"] == [1000, 1001, 1002, 1003, 1004]
    assert not set(out["seeds"]) & set(out["tuning_seeds"])
    s = out["scenarios"]["lopsided"]
    assert s["held_out"] == "held-out seeds"
    assert s["tuned_params"] == "tuned now"
    assert set(s["heuristics"]) == {"proportional"}
    assert "beta" in s["heuristics"]["proportional"]["params"]
    for stats in (s["policy"], s["heuristics"]["proportional"]):
        for key in ("mean_jct_s", "p99_jct_s"):
            assert stats[key]["n"] == 5
            assert stats[key]["mean"] > 0
            assert stats[key]["ci95"] >= 0
        assert stats["p99_jct_s"]["mean"] >= stats["mean_jct_s"]["mean"]
    assert s["best_heuristic"] == "proportional"
    assert s["gain_mean_jct"] < 0
    mine = s["policy"]["mean_jct_s"]["mean"]
    best = s["heuristics"]["proportional"]["mean_jct_s"]["mean"]
    assert s["gain_mean_jct"] == pytest.approx(1 - mine / best)

    out = _evaluate(app, *base, "--policy", "proportional", "--baseline", "static", "--seeds", "6")
    s = out["scenarios"]["lopsided"]
    assert s["best_heuristic"] == "static"
    assert s["gain_mean_jct"] > 0
    assert s["policy"]["mean_jct_s"]["n"] == 6


def test_table_output_names_the_gain(app: typer.Typer, scenario_file: Path) -> None:
    """Without --json, a table per scenario with the gain over the best heuristic."""
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--scenario",
            str(scenario_file),
            "--policy",
            "static",
            "--baseline",
            "maxweight",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "lopsided" in result.stdout
    assert "gain of static over the best heuristic (maxweight" in result.stdout


def test_bad_inputs_exit_2_with_clear_errors(
    app: typer.Typer, scenario_file: Path, tmp_path: Path
) -> None:
    """Fewer than 5 seeds, an unknown policy, a missing checkpoint, an unknown baseline."""
    base = ["evaluate", "--scenario", str(scenario_file)]
    cases = [
        (["--policy", "static", "--seeds", "4"], "at least 5"),
        (["--policy", "nonesuch"], "nonesuch"),
        (["--policy", str(tmp_path / "missing.pt")], "missing.pt"),
        (["--policy", "static", "--baseline", "oracle"], "oracle"),
        ([], "exactly one of --policy"),
        (["--policy", "static", "--router", "random"], "exactly one of --policy"),
        (["--router", "nonesuch"], "nonesuch"),
        (["--router", "random", "--baseline", "static"], "static"),
    ]
    for args, needle in cases:
        result = CliRunner().invoke(app, [*base, *args])
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output
        assert "Traceback" not in result.output


def test_router_mode_compares_routers_under_the_scenarios_allocator(tmp_path: Path) -> None:
    """--router: the router under test and every heuristic router, each run with the scenario's
    allocator at its tuned parameters on the same held-out jobs. Two identical replicas: the
    "first eligible" rule sends all of one type to one replica and loses to shortest-wait, and the
    router under test, shortest_wait itself, ties the best heuristic router exactly."""
    data: dict[str, Any] = {
        "name": "twins",
        "queues": [
            {"name": "a", "job_types": ["x"], "service": {"kind": "exponential", "mean_s": 0.5},
             "model_load_s": 2.0},
            {"name": "b", "job_types": ["x"], "service": {"kind": "exponential", "mean_s": 0.5},
             "model_load_s": 2.0},
        ],
        "cluster": {"workers": 8, "initial_allocation": {"a": 4, "b": 4}},
        "workload": {"generators": [{"kind": "poisson", "rate_per_s": 10.0, "mix": {"x": 1}}]},
        "tick_s": 1.0,
        "duration_s": 40.0,
        "allocator": "static",
    }  # fmt: skip
    path = tmp_path / "twins.yaml"
    path.write_text(yaml.safe_dump(data))
    app = typer.Typer()
    register(app)
    out = _evaluate(app, "--scenario", str(path), "--router", "shortest_wait", "--json")
    assert out["router"] == "shortest_wait"
    assert out["policy"] is None
    s = out["scenarios"]["twins"]
    assert s["compared"] == "routers"
    assert s["allocator"] == {"name": "static", "params": {}}
    assert set(s["heuristics"]) == {"rule", "shortest_wait", "power_of_two", "random"}
    means = {name: h["mean_jct_s"]["mean"] for name, h in s["heuristics"].items()}
    assert means["rule"] > 2 * means["shortest_wait"]
    assert s["best_heuristic"] in ("shortest_wait", "power_of_two")
    assert s["policy"]["mean_jct_s"]["mean"] == means["shortest_wait"]
    assert s["gain_mean_jct"] == 0.0
