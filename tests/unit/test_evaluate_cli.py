"""`bilevel evaluate` and `bilevel tune` through typer's CliRunner, on a tiny scenario tuned on
the fly."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from policies.evaluation import scenario_fingerprint
from policies.registry import HEURISTIC_ALLOCATORS
from policies.seeds import TUNING_SEEDS
from policies.sim.scenario import parse_scenario
from policies.tuned import TunedEntry
from policies.tuning import render_tuned_module, shipped_params
from scheduler.commands import tune
from scheduler.commands.evaluate import register


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    tune.register(app)
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
        "allocation": {
            "policy": "proportional",
            "tick_s": 1.0,
            "budget": 8,
            "initial": {"busy": 4, "quiet": 4},
        },
        "workload": {
            "generators": [{"kind": "poisson", "rate_per_s": 10.0, "mix": {"busy": 9, "quiet": 1}}]
        },
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
    """Fewer than 5 seeds, an unknown policy, a missing checkpoint, an unknown baseline, the same
    scenario twice."""
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
        (["--policy", "static", "--scenario", str(scenario_file)], "must be unique"),
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
    router under test, shortest_wait itself, runs exactly as the heuristic of that name (its gain
    is measured against the best of the heuristic routers)."""
    data: dict[str, Any] = {
        "name": "twins",
        "queues": [
            {"name": "a", "job_types": ["x"], "service": {"kind": "exponential", "mean_s": 0.5},
             "model_load_s": 2.0},
            {"name": "b", "job_types": ["x"], "service": {"kind": "exponential", "mean_s": 0.5},
             "model_load_s": 2.0},
        ],
        "allocation": {"policy": "static", "tick_s": 1.0, "budget": 8, "initial": {"a": 4, "b": 4}},
        "workload": {"generators": [{"kind": "poisson", "rate_per_s": 10.0, "mix": {"x": 1}}]},
        "duration_s": 40.0,
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
    best = means[s["best_heuristic"]]
    assert s["gain_mean_jct"] == pytest.approx((best - means["shortest_wait"]) / best)


# --- bilevel tune ---------------------------------------------------------------------------------


def test_tune_writes_the_values_evaluate_reads_and_keeps_other_entries(
    app: typer.Typer, scenario_file: Path, tmp_path: Path
) -> None:
    """--write merges the scenario's winning parameters into a tuned-values module, under the
    scenario's fingerprint and the tuning seeds, beside the entries the module already held; the
    JSON names the same winners, each the lowest-scoring point of its grid."""
    module = tmp_path / "tuned.py"
    other = TunedEntry("0123456789abcdef", (0,), {"static": {}})
    module.write_text(render_tuned_module({"other": other}))
    result = CliRunner().invoke(
        app, ["tune", "--scenario", str(scenario_file), "--write", str(module), "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)["lopsided"]
    assert out["seeds"] == list(TUNING_SEEDS)
    assert set(out["heuristics"]) == set(HEURISTIC_ALLOCATORS)
    for h in out["heuristics"].values():
        scored = [p for p in h["points"] if p["mean_sojourn_s"] is not None]
        if scored:
            assert h["best"] == min(scored, key=lambda p: p["mean_sojourn_s"])["params"]

    table = runpy.run_path(str(module))["TUNED"]
    assert table["other"].fingerprint == other.fingerprint
    scenario = parse_scenario(scenario_file.read_text())
    assert table["lopsided"].fingerprint == scenario_fingerprint(scenario)
    assert table["lopsided"].seeds == tuple(TUNING_SEEDS)
    assert shipped_params(scenario, table=table) == {
        name: h["best"] for name, h in out["heuristics"].items()
    }


def test_tune_refuses_a_bad_target_and_leaves_it_as_it_was(
    app: typer.Typer, scenario_file: Path, tmp_path: Path
) -> None:
    """--write to a directory, or to a file that is not a tuned-values module: exit 2 naming it,
    and the file is untouched; --seeds outside the training range is refused too."""
    broken = tmp_path / "broken.py"
    broken.write_text("TUNED = {  # cut short\n")
    stranger = tmp_path / "stranger.py"
    stranger.write_text("VALUES = {}\n")
    odd = tmp_path / "odd.py"
    odd.write_text("TUNED = {'lopsided': 1}\n")
    cases = (
        (tmp_path, "not a file"),
        (broken, "cannot read"),
        (stranger, "defines no TUNED"),
        (odd, "other than tuned entries"),
    )
    for target, needle in cases:
        before = target.read_text() if target.is_file() else None
        result = CliRunner().invoke(
            app, ["tune", "--scenario", str(scenario_file), "--write", str(target)]
        )
        assert result.exit_code == 2, result.output
        assert needle in result.output
        assert target.name in result.output
        assert "Traceback" not in result.output
        if before is not None:
            assert target.read_text() == before
    for bad in ("0", "1001"):
        result = CliRunner().invoke(app, ["tune", "--scenario", str(scenario_file), "--seeds", bad])
        assert result.exit_code == 2, result.output
        assert f"--seeds must be between 1 and 1000, got {bad}" in result.output


def test_tune_seeds_picks_the_first_training_seeds(app: typer.Typer, scenario_file: Path) -> None:
    """--seeds N tunes on training seeds 0..N-1, as the JSON and the table say."""
    result = CliRunner().invoke(app, ["tune", "--scenario", str(scenario_file), "--seeds", "2"])
    assert result.exit_code == 0, result.output
    assert "tuned on seeds [0, 1]" in result.stdout
    result = CliRunner().invoke(
        app, ["tune", "--scenario", str(scenario_file), "--seeds", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["lopsided"]["seeds"] == [0, 1, 2]
