"""Stopping `bilevel train` early (Ctrl-C, SIGTERM): the best policy validated so far is written,
with its curve and metrics, the path is printed, and the exit code is the signal's; before any
validation nothing is written. Real signals, real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from policies.learned.ppo import (
    Args,
    ForecastConfig,
    PPOConfig,
    TrainingStopped,
    ValidationConfig,
    evaluate,
    train,
)
from policies.sim.scenario import parse_scenario
from scheduler.checkpoints import load_checkpoint
from scheduler.stopping import StopSignals
from scheduler.training import serial_rollouts
from tests.train_process import FAST, TINY, finish, signal_when, training, wait_for

# --- train() hands over what it kept --------------------------------------------------------------


def _args() -> Args:
    return Args(
        seed=0, minutes=10.0,
        ppo=PPOConfig(inputs_per_iteration=2, replays=2, episode_s=(40.0, 60.0), update_epochs=1),
        validate=ValidationConfig(every=1, seeds=1), forecast=ForecastConfig(enabled=False),
    )  # fmt: skip


def test_a_stop_before_the_first_validation_hands_over_nothing() -> None:
    """A stop asked for from the start ends `train` with TrainingStopped whose partial is None."""
    with pytest.raises(TrainingStopped) as stopped:
        train(_args(), [parse_scenario(TINY)], serial_rollouts(should_stop=lambda: True))
    assert stopped.value.partial is None


def test_a_stop_after_validations_hands_over_the_best_one_and_the_history() -> None:
    """Asked to stop after iteration 2, `train` raises TrainingStopped with the best of the
    evaluations so far, the metrics of both finished iterations, and a policy that is the best
    evaluation's (it scores the same when validated again)."""
    asked = [False]

    def after_two(iteration: int, fraction: float, metrics: object, ev: object) -> None:
        asked[0] = asked[0] or iteration >= 2

    with pytest.raises(TrainingStopped) as stopped:
        train(
            _args(),
            [parse_scenario(TINY)],
            serial_rollouts(should_stop=lambda: asked[0]),
            on_iteration=after_two,
        )
    partial = stopped.value.partial
    assert partial is not None
    assert partial.iterations == 2
    assert len(partial.history) == 2
    assert [e.iteration for e in partial.evaluations] == [0, 1, 2]
    assert partial.best is not None
    assert partial.best.score == min(e.score for e in partial.evaluations)
    again, _ = evaluate(
        partial.policy, [parse_scenario(TINY)], [10_000], serial_rollouts(), partial.best.iteration
    )
    assert again.mean_jct_s["tiny"]["learned"] == partial.best.mean_jct_s["tiny"]["learned"]


# --- the signal handler ----------------------------------------------------------------------


def test_first_signal_asks_the_second_quits_and_held_signals_are_only_recorded() -> None:
    """Under StopSignals a real SIGINT sets the request; a second one raises KeyboardInterrupt;
    after hold() a SIGTERM is recorded and nothing else; leaving restores the old handlers."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    told: list[int] = []
    with StopSignals(on_request=told.append) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        assert told == [signal.SIGINT]
        assert stop.exit_code() == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        stop.hold()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.name() == "SIGINT"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# --- the command, as a user runs it -----------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_after_a_validation_writes_the_best_checkpoint_and_exits_130(
    tmp_path: Path,
) -> None:
    """SIGINT once a validation has run: exit 130; the best validated policy is written as a
    checkpoint that loads, with its metadata (the stop, the metrics so far) and its curve; the
    output names the checkpoint's path."""
    out = tmp_path / "ckpt" / "mine"
    run = signal_when(
        tmp_path, out, "iteration 1: validated", signal.SIGINT, "--workers", "0", *FAST
    )
    assert run.returncode == 130, run.stderr
    weights = out.with_suffix(".pt")
    assert f"checkpoint: {weights}" in run.stdout
    assert "stopped by SIGINT" in run.stderr
    assert "Traceback" not in run.stderr
    policy, meta = load_checkpoint(weights)
    assert policy.allocator_net is not None
    assert meta["stopped_early"]["signal"] == "SIGINT"
    assert meta["iterations"] == meta["stopped_early"]["after_iterations"] >= 1
    assert meta["best_evaluation"]["per_scenario"]["tiny"]["learned_mean_jct_s"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert json.loads(out.with_suffix(".json").read_text())["format"] == "bilevel-learned-policy"
    assert not list(out.parent.glob(".*.tmp"))


@pytest.mark.slow
def test_sigterm_before_any_validation_says_so_and_writes_nothing(tmp_path: Path) -> None:
    """SIGTERM while the first validation is still running (sixty validation seeds of a long
    scenario): exit 143 (128 + SIGTERM), a plain line saying nothing was validated, no files."""
    out = tmp_path / "ckpt" / "mine"
    long = ["--eval-seeds", "60", "--no-forecast", "--workers", "0", "--minutes", "10"]
    run = signal_when(tmp_path, out, "Ctrl-C stops", signal.SIGTERM, *long)
    assert run.returncode == 143, run.stderr
    assert "stopped by SIGTERM before the first validation" in run.stderr
    assert "nothing written" in run.stderr
    assert "Traceback" not in run.stderr
    assert not out.parent.exists()


@pytest.mark.slow
def test_a_checkpoint_that_cannot_go_to_out_is_kept_in_a_temporary_directory(
    tmp_path: Path,
) -> None:
    """When --out's directory can no longer be made at the end (a file took its name while
    training ran), the checkpoint goes to a new temporary directory, named in one error line;
    it loads; exit 1."""
    out = tmp_path / "ckpt" / "mine"
    with training(tmp_path, out, "--workers", "0", *FAST) as (proc, lines):
        seen: list[str] = []
        wait_for(lines, "iteration 1: validated", seen)
        (tmp_path / "ckpt").write_text("in the way")
        os.killpg(proc.pid, signal.SIGINT)
        run = finish(proc, lines, seen)
    assert run.returncode == 1, run.stderr
    [error] = [line for line in run.stderr_lines if line.startswith("error: ")]
    assert error.startswith(f"error: --out {out.with_suffix('.pt')}: could not write it")
    rescued = Path(error.split("the checkpoint is in ", 1)[1].split(" ", 1)[0])
    try:
        assert rescued.name == "mine.pt"
        _, meta = load_checkpoint(rescued)
        assert meta["stopped_early"]["signal"] == "SIGINT"
    finally:
        shutil.rmtree(rescued.parent, ignore_errors=True)
    assert "Traceback" not in run.stderr
