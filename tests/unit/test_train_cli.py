"""`bilevel train` on a trace scenario of one's own, then `bilevel simulate` with the checkpoint."""

from __future__ import annotations

import dataclasses
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
from policies.learned.ppo import (
    Args,
    ForecastConfig,
    ImitationConfig,
    NetConfig,
    PPOConfig,
    RegimeConfig,
    ValidationConfig,
)
from policies.learned.rollout import RolloutTask, map_serial, run_rollout, with_traces
from policies.seeds import TRAIN_WINDOW_FRACTION
from policies.sim.scenario import parse_scenario
from scheduler.commands import simulate, train
from scheduler.commands._dataclass_cli import build, field_docs

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
         "--iterations", "2", "--eval-every", "2", "--eval-seeds", "1", "--minutes", "600"],
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
    assert meta["args"]["ppo"]["train_allocator"] is False
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
        ("--slo-penalty-s", "-1", "ppo.slo_penalty_s (--slo-penalty-s)"),
        ("--learning-rate", "0", "ppo.learning_rate (--learning-rate)"),
        ("--eval-seeds", "0", "validate.seeds (--eval-seeds)"),
        ("--distill-steps", "-1", "regimes.distill_steps (--distill-steps)"),
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


# --- options derived from Args ---------------------------------------------------------------------


def _train_command() -> typer.core.TyperCommand:
    app = typer.Typer()
    train.register(app)
    app.command("other")(lambda: None)  # a group, so the command keeps its name
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    command = group.commands["train"]
    assert isinstance(command, typer.core.TyperCommand)
    return command


def _leaf_fields(cls: type, path: str = "") -> list[str]:
    out: list[str] = []
    for f in dataclasses.fields(cls):
        dotted = f"{path}.{f.name}" if path else f.name
        value = getattr(cls(), f.name)
        out += _leaf_fields(type(value), dotted) if dataclasses.is_dataclass(value) else [dotted]
    return out


def test_every_training_argument_has_exactly_one_option_and_the_old_names_still_work() -> None:
    """Each leaf field of Args (nested configs included) is one option of `bilevel train`, no
    option name is taken twice, and the names the command had before keep their meaning."""
    command = _train_command()
    derived = {p.name for p in command.params} - {
        "scenario", "out", "trace", "workers", "address", "init"
    }  # fmt: skip
    assert derived == {f.replace(".", "__") for f in _leaf_fields(Args)}
    names = [n for p in command.params for n in (*p.opts, *p.secondary_opts)]
    assert len(names) == len(set(names))
    for old in (
        "--scenario", "--out", "--trace", "--minutes", "--workers", "--seed", "--iterations",
        "--address", "--init", "--eval-every", "--eval-seeds", "--max-moves", "--learning-rate",
        "--reconfiguration-penalty-s", "--slo-penalty-s", "--imitation-coef",
        "--imitation-fraction", "--base", "--stop-bias", "--gate-bias", "--router-only",
        "--target-head", "--forecast", "--no-forecast",
    ):  # fmt: skip
        assert old in names, old


def test_a_command_line_becomes_the_nested_args_it_spells() -> None:
    """Options of several stages, a repeated --base, a pair, a flag pair and the old names parse
    into the Args they name; everything not given keeps its default."""
    argv = [
        "--scenario", "s.yaml", "--out", "o", "--iterations", "3", "--minutes", "2.5",
        "--base", "switch_aware:horizon_s=80", "--base", "proportional", "--target-head",
        "--no-forecast", "--forecast-steps", "7", "--router-only", "--episode-s", "10", "20",
        "--eval-every", "2", "--eval-max-duration-s", "60", "--imitation-teacher-seeds", "3",
        "--regime-search-rounds", "1", "--no-anneal-lr", "--target-kl", "0.1",
    ]  # fmt: skip
    ctx = _train_command().make_context("train", argv)
    options = {
        k: v
        for k, v in ctx.params.items()
        if k not in {"scenario", "out", "trace", "workers", "address", "init"}
    }
    args = build(Args, options, parsers=train._PARSERS)
    expected = Args(
        minutes=2.5, max_iterations=3,
        net=NetConfig(
            bases=(("switch_aware", {"horizon_s": 80.0}), ("proportional", {})), target_head=True
        ),
        forecast=ForecastConfig(enabled=False, steps=7),
        regimes=RegimeConfig(search_rounds=1),
        imitation=ImitationConfig(teacher_seeds=3),
        ppo=PPOConfig(train_allocator=False, episode_s=(10.0, 20.0), anneal_lr=False, target_kl=0.1),
        validate=ValidationConfig(every=2, max_duration_s=60.0),
    )  # fmt: skip
    assert args == expected
    assert build(Args, {}, parsers=train._PARSERS) == Args()


def test_option_help_is_the_field_docstring() -> None:
    """An option's help is its field's docstring (whitespace collapsed), so it is written once."""
    command = _train_command()
    by_name = {p.name: p for p in command.params}
    option = by_name["validate__random_starts"]
    assert isinstance(option, typer.core.TyperOption)
    assert option.help == " ".join(field_docs(ValidationConfig)["random_starts"].split())
    assert option.help is not None
    assert option.help.startswith("also validate from a random")
