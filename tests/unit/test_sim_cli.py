"""`bilevel simulate` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from policies.registry import HEURISTIC_ALLOCATORS
from scheduler.commands.simulate import register

REQUIRED_KEYS = {
    "jobs",
    "mean_jct_s",
    "p50_jct_s",
    "p99_jct_s",
    "slo_attainment",
    "utilization",
    "reconfigurations",
    "wall_s",
    "sim_jobs_per_s",
}


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture
def scenario_file(tmp_path: Path) -> Path:
    data = {
        "name": "tiny",
        "queues": [
            {
                "name": "a",
                "job_types": ["a"],
                "service": {"kind": "exponential", "mean_s": 0.5},
                "model_load_s": 2.0,
                "slo_s": 2.0,
            },
            {
                "name": "b",
                "job_types": ["b"],
                "service": {"kind": "lognormal", "mean_s": 0.5, "cv": 1.0},
                "model_load_s": 2.0,
            },
        ],
        "allocation": {"policy": "proportional", "tick_s": 1.0, "budget": 6},
        "workload": {
            "generators": [{"kind": "poisson", "rate_per_s": 6.0, "mix": {"a": 2, "b": 1}}]
        },
        "duration_s": 60.0,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_json_prints_one_object_with_the_contract_keys(
    app: typer.Typer, scenario_file: Path
) -> None:
    """--json prints exactly one JSON object holding the documented keys."""
    result = CliRunner().invoke(app, ["simulate", "--scenario", str(scenario_file), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) >= REQUIRED_KEYS
    assert payload["jobs"] > 0
    assert 0 < payload["utilization"] < 1


def test_same_seed_same_json(app: typer.Typer, scenario_file: Path) -> None:
    """--seed fixes the run: only wall-clock numbers differ."""
    args = ["simulate", "--scenario", str(scenario_file), "--json", "--seed", "4"]
    first = json.loads(CliRunner().invoke(app, args).stdout)
    second = json.loads(CliRunner().invoke(app, args).stdout)
    for payload in (first, second):
        payload.pop("wall_s")
        payload.pop("sim_jobs_per_s")
    assert first == second


def test_compare_runs_every_heuristic_ranked(
    app: typer.Typer, scenario_file: Path, tmp_path: Path
) -> None:
    """--compare --json gives one object per heuristic allocator, best mean JCT first; --plot
    writes a PNG."""
    plot = tmp_path / "out.png"
    result = CliRunner().invoke(
        app,
        ["simulate", "--scenario", str(scenario_file), "--compare", "--json", "--plot", str(plot)],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) == set(HEURISTIC_ALLOCATORS)
    means = [p["mean_jct_s"] for p in payload.values()]
    assert means == sorted(means)
    assert len({p["jobs"] for p in payload.values()}) == 1  # same arrivals for every policy
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_output_without_json(app: typer.Typer, scenario_file: Path) -> None:
    """Without --json a table names the policy."""
    result = CliRunner().invoke(
        app, ["simulate", "--scenario", str(scenario_file), "--policy", "maxweight"]
    )
    assert result.exit_code == 0, result.output
    assert "maxweight" in result.stdout


def test_bad_scenario_exits_2_with_field_path(app: typer.Typer, tmp_path: Path) -> None:
    """A bad file exits with code 2 and the field path, without a traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("queues: []\nallocation: {budget: 0}\nworkload: {}\n")
    result = CliRunner().invoke(app, ["simulate", "--scenario", str(bad)])
    assert result.exit_code == 2
    assert "allocation.budget" in result.output
    assert "Traceback" not in result.output


def test_checkpoint_path_and_unknown_policy_are_clear_errors(
    app: typer.Typer, scenario_file: Path, tmp_path: Path
) -> None:
    """A corrupt checkpoint file is an error naming it; an unknown name lists the known ones."""
    checkpoint = tmp_path / "policy.pt"
    checkpoint.write_bytes(b"x")
    result = CliRunner().invoke(
        app, ["simulate", "--scenario", str(scenario_file), "--policy", str(checkpoint)]
    )
    assert result.exit_code == 2
    assert "policy" in result.output
    assert "checkpoint" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(
        app, ["simulate", "--scenario", str(scenario_file), "--policy", "nonesuch"]
    )
    assert result.exit_code == 2
    assert "maxweight" in result.output
    assert "nonesuch" in result.output


def test_trace_scenario_takes_trace_from_cli(app: typer.Typer, tmp_path: Path) -> None:
    """--trace supplies the file of a trace scenario; without it the error says what to pass."""
    scenario = tmp_path / "t.yaml"
    scenario.write_text(
        yaml.safe_dump(
            {
                "queues": [
                    {
                        "name": "q",
                        "job_types": ["x", "y"],
                        "service": {"kind": "constant", "mean_s": 0.2},
                    }
                ],
                "allocation": {"policy": "proportional", "budget": 2},
                "workload": {"trace": {"format": "generic_csv"}},
            }
        )
    )
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,job_type\n" + "".join(f"{i * 0.3},x\n" for i in range(30)))
    missing = CliRunner().invoke(app, ["simulate", "--scenario", str(scenario)])
    assert missing.exit_code == 2
    assert "--trace" in missing.output
    result = CliRunner().invoke(
        app, ["simulate", "--scenario", str(scenario), "--trace", str(trace), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["jobs"] == 30
