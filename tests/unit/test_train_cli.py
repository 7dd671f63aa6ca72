"""`bilevel train` on a trace scenario of one's own, then `bilevel simulate` with the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from policies.evaluation import TraceInput
from policies.learned.policy import LearnedPolicy
from policies.learned.rollout import RolloutTask, map_serial, run_rollout, with_traces
from policies.seeds import TRAIN_WINDOW_FRACTION
from policies.sim.scenario import parse_scenario
from scheduler.commands import simulate, train

TRACE_SCENARIO = {
    "name": "my_trace",
    "queues": [
        {"name": n, "job_types": [n], "service": {"kind": "exponential", "mean_s": 0.4},
         "model_load_s": 1.0}
        for n in ("a", "b")
    ],
    "allocation": {"policy": "proportional", "tick_s": 1.0, "budget": 3},
    "workload": {"trace": {"format": "generic_csv", "path": "my_trace.csv"}},
}  # fmt: skip


def _trace_text(n: int = 400) -> str:
    rng = np.random.default_rng(3)
    times = np.cumsum(rng.exponential(0.25, n))
    types = rng.choice(["a", "b"], n, p=[0.7, 0.3])
    return "arrival_s,job_type\n" + "".join(
        f"{t:.3f},{k}\n" for t, k in zip(times, types, strict=True)
    )


def test_rollouts_of_a_trace_scenario_replay_its_training_window_only() -> None:
    """Episodes get the trace through with_traces and replay its first part; without the trace
    an episode of a trace scenario is refused, naming what is missing."""
    scenario = parse_scenario(TRACE_SCENARIO)
    trace = TraceInput(lines=tuple(_trace_text().splitlines(keepends=True)), source="t.csv")
    policy = LearnedPolicy.create(seed=0)
    run_with = with_traces(map_serial, {"my_trace": trace})
    [result] = run_with([RolloutTask(scenario, 0, policy=policy)])
    # The window is the first part of the trace's time span: about that share of the arrivals.
    replayed = result.jobs + result.unfinished
    assert 0.9 * TRAIN_WINDOW_FRACTION * 400 <= replayed <= 1.1 * TRAIN_WINDOW_FRACTION * 400
    with pytest.raises(ValueError, match="replays a trace: its lines are needed"):
        run_rollout(RolloutTask(scenario, 0, policy=policy))


def _cli_with_trace(tmp_path: Path) -> tuple[typer.Typer, Path]:
    """A CLI with `train` and `simulate`, and TRACE_SCENARIO written beside its trace file."""
    scenario = tmp_path / "my_trace.yaml"
    scenario.write_text(yaml.safe_dump(TRACE_SCENARIO))
    (tmp_path / "my_trace.csv").write_text(_trace_text())
    app = typer.Typer()
    train.register(app)
    simulate.register(app)
    return app, scenario


def test_train_on_a_trace_then_simulate_with_the_checkpoint(tmp_path: Path) -> None:
    app, scenario = _cli_with_trace(tmp_path)
    out = tmp_path / "ckpt" / "mine"
    trained = CliRunner().invoke(
        app,
        ["train", "--scenario", str(scenario), "--out", str(out), "--workers", "0",
         "--iterations", "2", "--eval-every", "2", "--eval-seeds", "1"],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["traces"]["my_trace"]["source"].endswith("my_trace.csv")
    assert meta["iterations"] == 2
    simulated = CliRunner().invoke(
        app,
        ["simulate", "--scenario", str(scenario), "--policy", str(out.with_suffix(".pt")),
         "--json"],
    )  # fmt: skip
    assert simulated.exit_code == 0, simulated.output
    assert json.loads(simulated.stdout)["jobs"] == 400


def test_router_only_step_keeps_the_earlier_step_and_refuses_what_it_cannot_train(
    tmp_path: Path,
) -> None:
    """`--router-only --init CKPT` on a scenario with a routing choice writes a checkpoint whose
    allocator and forecaster weights are the initial ones and whose metadata keeps the initial
    checkpoint's under `initialized_from`; without --init, or without a routing choice, it exits 2
    naming the problem, before any training."""
    app, own = _cli_with_trace(tmp_path)
    shared = {**TRACE_SCENARIO, "name": "shared"}
    shared["queues"] = [{**q, "job_types": ["a", "b"]} for q in TRACE_SCENARIO["queues"]]
    (tmp_path / "shared.yaml").write_text(yaml.safe_dump(shared))
    first = tmp_path / "first"
    common = ["--workers", "0", "--iterations", "1", "--eval-every", "1", "--eval-seeds", "1"]
    trained = CliRunner().invoke(
        app, ["train", "--scenario", str(tmp_path / "shared.yaml"), "--out", str(first), *common]
    )
    assert trained.exit_code == 0, trained.output
    second = tmp_path / "second"
    step = CliRunner().invoke(
        app,
        ["train", "--scenario", str(tmp_path / "shared.yaml"), "--out", str(second),
         "--init", str(first.with_suffix(".pt")), "--router-only", *common],
    )  # fmt: skip
    assert step.exit_code == 0, step.output
    meta = json.loads(second.with_suffix(".json").read_text())
    assert meta["initialized_from"] == {
        "path": str(first.with_suffix(".pt")),
        "metadata": json.loads(first.with_suffix(".json").read_text()),
    }
    assert meta["args"]["train_allocator"] is False
    before = LearnedPolicy.from_hyperparameters(meta["hyperparameters"])
    start = torch.load(first.with_suffix(".pt"), weights_only=True)
    after = torch.load(second.with_suffix(".pt"), weights_only=True)
    assert set(start) == set(after) == set(before.state_dict())
    for key in start:
        if not key.startswith("router."):
            assert torch.equal(start[key], after[key]), key

    for args, needle in (
        (["--scenario", str(tmp_path / "shared.yaml"), "--router-only"], "--init"),
        (["--scenario", str(own), "--router-only",
          "--init", str(first.with_suffix(".pt"))], "two or more eligible queues"),
    ):  # fmt: skip
        refused = CliRunner().invoke(app, ["train", *args, "--out", str(tmp_path / "x"), *common])
        assert refused.exit_code == 2, refused.output
        assert needle in refused.output
        assert not (tmp_path / "x.pt").exists()


def test_bad_training_numbers_exit_2_naming_the_field(tmp_path: Path) -> None:
    app, scenario = _cli_with_trace(tmp_path)
    for flag, value, needle in (
        ("--slo-penalty-s", "-1", "slo_penalty_s"),
        ("--learning-rate", "0", "learning_rate"),
        ("--eval-seeds", "0", "eval_seeds"),
    ):
        result = CliRunner().invoke(
            app,
            ["train", "--scenario", str(scenario), "--out", str(tmp_path / "x"), "--workers", "0",
             flag, value],
        )  # fmt: skip
        assert result.exit_code == 2, result.output
        assert needle in result.output
        assert "Traceback" not in result.output
        assert not (tmp_path / "x.pt").exists()


def test_a_target_head_without_bases_is_refused_naming_the_flag(tmp_path: Path) -> None:
    """The target head is a gate option, so it needs --base; nothing is written."""
    app, scenario = _cli_with_trace(tmp_path)
    result = CliRunner().invoke(
        app,
        ["train", "--scenario", str(scenario), "--out", str(tmp_path / "x"), "--workers", "0",
         "--target-head"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "target_head" in result.output
    assert "bases" in result.output
    assert not (tmp_path / "x.pt").exists()
